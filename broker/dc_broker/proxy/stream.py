"""``RawStream``: a trio ``Stream`` over a non-blocking stdlib socket that calls the socket first and
parks on trio's epoll only when the call would block, for every connection of the proxy's process:
its clients', the upstream's, the broker's.

trio's ``SocketStream`` passes through the scheduler on every ``receive_some``/``send_all``, even
when the data is there (a checkpoint before and one after): on the proxy's path (a request read, a
token asked, the request sent upstream, the answer read, the answer written) those passes were a
large share of its time per request. The broker's server does the same for the same reason
(docs/architecture.md, "Why the server does its own non-blocking I/O").

Kept from trio's contract: a pending cancellation is honoured on every call
(``checkpoint_if_cancelled``), and a stream whose calls never block still lets other tasks run
every ``CALLS_PER_CHECKPOINT`` calls, so a client and an upstream that keep their sockets full
cannot starve the rest of the proxy. Socket errors become ``trio.BrokenResourceError`` (as trio's);
a closed stream's calls ``trio.ClosedResourceError``. ``trio.SSLStream`` runs over it unchanged.

Must never: spin (every would-block parks in epoll); be used by two tasks in the same direction at
once (the proxy's connections are one task each).
"""

from __future__ import annotations

import socket
from typing import Final

import trio

#: calls that did not block before the stream lets other tasks run once
CALLS_PER_CHECKPOINT: Final = 16
#: bytes one ``receive_some`` reads when not told
DEFAULT_RECEIVE: Final = 64 * 1024


class RawStream(trio.abc.HalfCloseableStream):
    """A connected stdlib socket (set non-blocking here, and TCP_NODELAY on TCP) as a trio stream."""

    __slots__ = ("_calls", "_closed", "socket")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as trio's SocketStream
        self.socket = sock
        self._calls = 0
        self._closed = False

    async def _fair(self) -> None:
        """A checkpoint every ``CALLS_PER_CHECKPOINT`` calls that did not park; else only a pending
        cancellation is taken."""
        self._calls += 1
        if self._calls >= CALLS_PER_CHECKPOINT:
            self._calls = 0
            await trio.lowlevel.checkpoint()
        else:
            await trio.lowlevel.checkpoint_if_cancelled()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await self._fair()
        while True:
            if self._closed:
                raise trio.ClosedResourceError("the stream is closed")
            try:
                return self.socket.recv(max_bytes or DEFAULT_RECEIVE)
            except BlockingIOError:
                self._calls = 0
                await trio.lowlevel.wait_readable(self.socket)
            except OSError as exc:
                raise trio.BrokenResourceError(str(exc)) from exc

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._fair()
        view = memoryview(data)
        while view:
            if self._closed:
                raise trio.ClosedResourceError("the stream is closed")
            try:
                view = view[self.socket.send(view) :]
            except BlockingIOError:
                self._calls = 0
                await trio.lowlevel.wait_writable(self.socket)
            except OSError as exc:
                raise trio.BrokenResourceError(str(exc)) from exc

    async def wait_send_all_might_not_block(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        await trio.lowlevel.wait_writable(self.socket)

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        """Close now (a task parked on this socket is woken with ``ClosedResourceError``)."""
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()
