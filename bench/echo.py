"""The floor a trio server on a Unix socket can reach: a bare echo server, the yardstick of bench/compare.py.

One task per connection, the same non-blocking ``recv``/``send`` the broker uses (parking on trio's
epoll only when the socket is empty), and no work at all per request: every whole frame (4-byte
length + body) is answered at once with the same fixed reply frame, ``REPLY_BYTES`` long (the size of
the broker's token reply, so that both servers move the same bytes and the clients read the same).
No msgpack, no checks, no deadlines, no identity: whatever the broker spends beyond this is its own.

    python bench/echo.py SOCKET REPLY_BYTES      (prints "ready" once it listens)
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys

import trio

RECEIVE_SIZE = 65536


async def serve_one(conn: socket.socket, reply: bytes) -> None:
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
            buf += data
            frames = 0
            while len(buf) >= 4:
                end = 4 + int.from_bytes(buf[:4], "big")
                if len(buf) < end:
                    break
                buf = buf[end:]
                frames += 1
            if frames:
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


async def main(path: str, reply_bytes: int) -> None:
    body = b"\xa0" * max(1, reply_bytes - 4)  # msgpack fixstr bytes: the content does not matter
    reply = len(body).to_bytes(4, "big") + body
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4096)
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
                nursery.start_soon(serve_one, conn, reply)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], int(sys.argv[2]))
