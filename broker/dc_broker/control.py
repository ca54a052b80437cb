"""The management CLI's side of the broker socket: one-shot requests and streamed replies.

``dc-broker status/login/unlock/...`` talk to the running daemon through here. Blocking and small:
a socket, ``dc_token.protocol`` framing, and the error tree (an error reply raises its
``dc_token.errors`` class; no daemon raises ``BrokerUnavailable``).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

from dc_token.errors import BrokerUnavailable, error_for_code
from dc_token.paths import default_socket_path
from dc_token.protocol import NEED_DATA, ErrorReply, FrameDecoder, Request, encode, reply_from_wire


def stream(
    op: str, socket_path: str | None = None, *, timeout: float | None = None, **args: Any
) -> Iterator[dict[str, Any]]:
    """Send one request; yield each result of its reply (a stream yields several) until the last."""
    path = socket_path or default_socket_path()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise BrokerUnavailable(f"no dc-broker is running on {path}") from None
        except OSError as exc:
            raise BrokerUnavailable(f"cannot connect to {path}: {exc.strerror or exc}") from None
        sock.sendall(encode(Request(1, op, args)))
        decoder = FrameDecoder()
        while True:
            frame = decoder.next_frame()
            if frame is NEED_DATA:
                data = sock.recv(65536)
                if not data:
                    raise BrokerUnavailable(f"the broker on {path} closed the connection")
                decoder.receive_data(data)
                continue
            assert isinstance(frame, dict)
            reply = reply_from_wire(frame)
            if isinstance(reply, ErrorReply):
                raise error_for_code(reply.code.value)(reply.message, retry_after=reply.retry_after)
            if reply.more:
                yield dict(reply.result)
                continue
            if not reply.result.get("end"):
                yield dict(reply.result)
            return
    finally:
        sock.close()


def request(op: str, socket_path: str | None = None, **args: Any) -> dict[str, Any]:
    """One request, one result."""
    for result in stream(op, socket_path, timeout=60.0, **args):
        return result
    return {}
