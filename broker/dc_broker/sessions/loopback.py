"""The loopback redirect listener of a browser login (RFC 8252 7.3): take the browser's one request
to ``/callback`` on 127.0.0.1, answer it with a page saying the window may be closed, and return its
query parameters. Anything else (a ``/favicon.ico``) gets 404 and waiting goes on. Requests are read
with a bound (8 KiB, 10 s per connection), never logged: the query holds the authorization code.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import parse_qsl, urlsplit

import trio

MAX_REQUEST: Final = 8192
PER_CONNECTION: Final = 10.0

_DONE: Final = (
    "<!doctype html><html><head><meta charset=utf-8><title>dc-broker</title></head><body>"
    "<h1>dc-broker received the login</h1><p>You can close this window and return to the terminal.</p>"
    "</body></html>"
)


def _response(status: str, body: str) -> bytes:
    data = body.encode()
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {len(data)}\r\n"
        "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + data


async def _read_head(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data and len(data) < MAX_REQUEST:
        chunk = await stream.receive_some(MAX_REQUEST)
        if not chunk:
            break
        data += chunk
    return data


async def one_redirect(listener: trio.SocketListener) -> dict[str, str]:
    """Wait for the redirect; its query parameters (last value wins)."""
    while True:
        stream = await listener.accept()
        try:
            with trio.move_on_after(PER_CONNECTION):
                head = await _read_head(stream)
                line = head.split(b"\r\n", 1)[0].decode("latin-1")
                parts = line.split(" ")
                target = urlsplit(parts[1]) if len(parts) == 3 and parts[0] == "GET" else None
                if target is None or target.path != "/callback":
                    await stream.send_all(_response("404 Not Found", "<p>Not found</p>"))
                    continue
                await stream.send_all(_response("200 OK", _DONE))
                return dict(parse_qsl(target.query, keep_blank_values=True))
        except (trio.BrokenResourceError, trio.ClosedResourceError, UnicodeDecodeError):
            continue
        finally:
            await stream.aclose()
