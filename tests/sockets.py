"""Blocking socket servers for tests: a listener's connections handed over in a thread, and an HTTP
request head read off a connection (or off a trio stream)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

import trio


def accept_in_thread(listener: socket.socket, take: Callable[[socket.socket], None]) -> threading.Thread:
    """Call ``take`` with each connection ``listener`` accepts, one after another in a daemon thread
    (started here), until the listener is closed."""

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            take(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    return thread


def each_in_thread(handle: Callable[[socket.socket], None]) -> Callable[[socket.socket], None]:
    """A ``take`` for ``accept_in_thread`` that serves each connection in a daemon thread of its own."""
    return lambda conn: threading.Thread(target=handle, args=(conn,), daemon=True).start()


def read_head(conn: socket.socket, buf: bytes) -> tuple[bytes, bytes] | None:
    """The next request head on ``conn`` (``buf``: what was read after the last one) and what came
    after it; None when the client closes first."""
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return None
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


async def receive_head(stream: trio.abc.ReceiveStream, buf: bytes) -> tuple[bytes, bytes] | None:
    """``read_head`` for a trio stream."""
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest
