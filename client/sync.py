"""``TokenClient``: the blocking client. One connection, reused, reconnected once after a broker restart.

Thread-safe (one request at a time per client, under a lock). Errors are the ``client.errors`` tree:
``BrokerUnavailable`` when nothing listens, one ``BrokerError`` subclass per wire error code.
Imports only the standard library, msgpack and ``client.protocol``: cheap enough for dc-token.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

from client.errors import BrokerUnavailable, RemoteProtocolError, error_for_code
from client.paths import default_socket_path
from client.protocol import NEED_DATA, ErrorReply, FrameDecoder, Request, encode, reply_from_wire

__all__ = ["TokenClient"]

_RECV = 65536


class TokenClient:
    """Blocking client for one broker socket.

    >>> with TokenClient() as broker:
    ...     token = broker.token("acme", min_ttl=60)
    """

    def __init__(self, socket_path: str | None = None, *, timeout: float | None = 60.0) -> None:
        self.socket_path = socket_path or default_socket_path()
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._decoder = FrameDecoder()
        self._next_id = 1
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"TokenClient({self.socket_path!r})"

    def __enter__(self) -> TokenClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._decoder = FrameDecoder()

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            raise BrokerUnavailable(f"no dc-broker is running on {self.socket_path}") from None
        except PermissionError:
            sock.close()
            raise BrokerUnavailable(f"no permission to use the broker socket {self.socket_path}") from None
        except OSError as exc:
            sock.close()
            raise BrokerUnavailable(f"cannot connect to {self.socket_path}: {exc.strerror or exc}") from None
        return sock

    def request(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one request and return its result map, or raise the error it came back with."""
        with self._lock:
            rid = self._next_id
            self._next_id += 1
            frame = encode(Request(rid, op, args))
            fresh = self._sock is None
            try:
                return self._roundtrip(rid, frame)
            except (BrokenPipeError, ConnectionResetError, _ClosedByPeer):
                self._drop()
                if fresh:
                    raise BrokerUnavailable(f"the broker on {self.socket_path} closed the connection") from None
            # the broker restarted since our last request: one fresh attempt
            try:
                return self._roundtrip(rid, frame)
            except (BrokenPipeError, ConnectionResetError, _ClosedByPeer):
                self._drop()
                raise BrokerUnavailable(f"the broker on {self.socket_path} closed the connection") from None

    def _roundtrip(self, rid: int, frame: bytes) -> dict[str, Any]:
        if self._sock is None:
            self._sock = self._connect()
        sock = self._sock
        try:
            sock.sendall(frame)
            while True:
                obj = self._decoder.next_frame()
                if obj is NEED_DATA:
                    data = sock.recv(_RECV)
                    if not data:
                        raise _ClosedByPeer
                    self._decoder.receive_data(data)
                    continue
                assert isinstance(obj, dict)
                reply = reply_from_wire(obj)
                if isinstance(reply, ErrorReply):
                    if reply.id not in (rid, None):
                        continue
                    if reply.id is None:
                        self._drop()
                    raise error_for_code(reply.code.value)(reply.message, retry_after=reply.retry_after)
                if reply.id != rid:
                    continue  # a late reply to a request we gave up on
                return dict(reply.result)
        except TimeoutError:
            self._drop()
            raise BrokerUnavailable(
                f"the broker on {self.socket_path} did not answer within {self.timeout} s"
            ) from None
        except RemoteProtocolError:
            self._drop()
            raise

    # convenience wrappers -----------------------------------------------------------------

    def hello(self) -> dict[str, Any]:
        return self.request("hello")

    def token_info(self, profile: str, *, min_ttl: float = 0.0) -> dict[str, Any]:
        """The token and its metadata: token, type, expires_in, expires_at (unix), scope."""
        return self.request("token", profile=profile, min_ttl=min_ttl)

    def token(self, profile: str, *, min_ttl: float = 0.0) -> str:
        """A bearer token for ``profile`` with at least ``min_ttl`` seconds left."""
        token = self.token_info(profile, min_ttl=min_ttl)["token"]
        assert isinstance(token, str)
        return token

    def invalidate(self, profile: str, token: str) -> bool:
        """Tell the broker the API answered 401 to ``token``; returns whether it refreshes."""
        return bool(self.request("invalidate", profile=profile, token=token)["refreshing"])

    def status(self, profile: str | None = None) -> dict[str, Any]:
        return self.request("status", profile=profile) if profile else self.request("status")


class _ClosedByPeer(Exception):
    pass
