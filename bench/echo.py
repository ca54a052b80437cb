"""Bare trio echo servers on a Unix socket: the yardsticks of bench/compare.py.

Both answer every whole frame (4-byte length + body) at once with the same fixed reply frame,
``REPLY_BYTES`` long (the size of the broker's token reply, so that every server moves the same
bytes and the clients read the same), and do no work at all per request: no msgpack, no checks, no
deadlines, no identity. Whatever the broker spends beyond them is its own.

  stream   plain trio, the way its docs write a server: ``trio.serve_listeners`` over a
           ``SocketListener``, one task per connection, ``receive_some`` / ``send_all`` on its
           ``SocketStream`` (each of which passes through trio's scheduler, data ready or not)
  raw      the floor a trio server can reach: one task per connection, non-blocking ``recv`` /
           ``send`` on the socket itself, parking on trio's epoll only when it is empty (what the
           broker's own I/O does)

    python bench/echo.py stream|raw SOCKET REPLY_BYTES      (prints "ready" once it listens)
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import sys

import trio

RECEIVE_SIZE = 65536


def frames_in(buf: bytes) -> tuple[int, bytes]:
    """How many whole frames ``buf`` starts with, and what is left after them."""
    n = 0
    while len(buf) >= 4:
        end = 4 + int.from_bytes(buf[:4], "big")
        if len(buf) < end:
            break
        buf = buf[end:]
        n += 1
    return n, buf


async def serve_raw(conn: socket.socket, reply: bytes) -> None:
    buf = b""
    try:
        while True:
            try:
                data = conn.recv(RECEIVE_SIZE)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(conn)
                continue
            except OSError:
                return
            if not data:
                return
            frames, buf = frames_in(buf + data)
            out = memoryview(reply * frames)
            while out:
                try:
                    out = out[conn.send(out) :]
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(conn)
                except OSError:
                    return
    finally:
        trio.lowlevel.notify_closing(conn)
        conn.close()


async def serve_stream(stream: trio.SocketStream, reply: bytes) -> None:
    buf = b""
    async with stream:
        while True:
            try:
                data = await stream.receive_some(RECEIVE_SIZE)
                if not data:
                    return
                frames, buf = frames_in(buf + data)
                if frames:
                    await stream.send_all(reply * frames)
            except trio.BrokenResourceError:
                return


def listening(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4096)
    return listener


async def main(mode: str, path: str, reply_bytes: int) -> None:
    body = b"\xa0" * max(1, reply_bytes - 4)  # msgpack fixstr bytes: the content does not matter
    reply = len(body).to_bytes(4, "big") + body
    listener = listening(path)
    if mode == "stream":
        trio_listener = trio.SocketListener(trio.socket.from_stdlib_socket(listener))
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, functools.partial(serve_stream, reply=reply), [trio_listener])
            print("ready", flush=True)
        return
    listener.setblocking(False)
    print("ready", flush=True)
    async with trio.open_nursery() as nursery:
        while True:
            await trio.lowlevel.wait_readable(listener)
            while True:
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    break
                conn.setblocking(False)
                nursery.start_soon(serve_raw, conn, reply)


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("stream", "raw"):
        sys.exit(__doc__)
    trio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]))
