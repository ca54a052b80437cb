"""The metrics endpoint (``[daemon] metrics_listen``): a small HTTP/1.1 server, h11 for the protocol,
trio for the sockets, answering ``GET /metrics`` with the exposition and nothing else.

- GET (and HEAD) only: anything else is 405 with ``Allow: GET, HEAD``; any path but ``/metrics``
  (and ``/``, a pointer to it) is 404. No request body is read; no token is ever on it.
- One request per connection (``Connection: close``), at most ``MAX_CONNECTIONS`` at once (more are
  closed unanswered), a request head of at most 8 KiB, ``TIMEOUT`` seconds for a whole exchange.
- Listens on a loopback address or a Unix socket (0660) unless the config says otherwise on purpose
  (``config.values.metrics_address`` refuses the rest before the broker starts).

Must never: serve a token or secret; let a slow scraper hold the broker (each connection is its own
task with its own deadline, and the exposition is made from memory).
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable

import h11
import trio

from dc_broker.config.values import MetricsAddress
from dc_broker.errors import ConfigError

log = logging.getLogger("dc_broker.metrics")

MAX_CONNECTIONS = 16
TIMEOUT = 10.0
MAX_HEAD = 8 * 1024
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

Render = Callable[[], Awaitable[bytes]]


def open_listener(where: MetricsAddress) -> socket.socket:
    """The listening socket for ``where``; a ConfigError naming the address when it cannot be had."""
    try:
        if where.path is not None:
            try:
                if stat.S_ISSOCK(os.lstat(where.path).st_mode):
                    os.unlink(where.path)  # a socket a previous run left: ours to replace
            except FileNotFoundError:
                pass
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old = os.umask(0o117)
            try:
                sock.bind(where.path)
            finally:
                os.umask(old)
        else:
            assert where.host is not None
            family = socket.AF_INET6 if ":" in where.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((where.host, where.port))
        sock.listen(64)
    except OSError as exc:
        raise ConfigError(
            f"daemon.metrics_listen = {str(where)!r}: cannot listen there: {exc.strerror or exc}"
        ) from None
    return sock


class MetricsServer:
    def __init__(self, render: Render) -> None:
        self.render = render
        self.open = 0

    async def serve(self, sock: socket.socket, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        name = sock.getsockname()
        shown = name if isinstance(name, str) else f"http://{name[0]}:{name[1]}/metrics"
        log.info("metrics served on %s", shown)
        async with listener, trio.open_nursery() as nursery:
            task_status.started(shown)
            while True:
                stream = await listener.accept()
                if self.open >= MAX_CONNECTIONS:
                    await stream.aclose()
                    continue
                self.open += 1
                nursery.start_soon(self._connection, stream)

    async def _connection(self, stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(TIMEOUT):
                await self._exchange(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        except Exception:
            log.exception("metrics request failed")
        finally:
            self.open -= 1
            await trio.aclose_forcefully(stream)

    async def _exchange(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(4096)
                conn.receive_data(data)
                continue
            break
        if not isinstance(event, h11.Request):
            return  # the peer left, or a ProtocolError was raised above
        method = event.method.upper()
        target = event.target.split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            status, body, extra = 405, b"only GET\n", [(b"Allow", b"GET, HEAD")]
        elif target == b"/metrics":
            status, body, extra = 200, await self.render(), []
        elif target == b"/":
            status, body, extra = 200, b"dc-broker metrics: /metrics\n", []
        else:
            status, body, extra = 404, b"not found; the metrics are at /metrics\n", []
        headers = [
            (b"Content-Type", CONTENT_TYPE if status == 200 and target == b"/metrics" else b"text/plain"),
            (b"Content-Length", str(len(body)).encode()),
            (b"Connection", b"close"),
            (b"Cache-Control", b"no-store"),
            *extra,
        ]
        out = conn.send(h11.Response(status_code=status, headers=headers))
        if method != b"HEAD":
            out += conn.send(h11.Data(data=body))
        out += conn.send(h11.EndOfMessage())
        await stream.send_all(out)
