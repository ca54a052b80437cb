"""A test upstream API for the proxy and client tests: streamed upload and download, header echo.

    python -m tests.upstream [--idp BASE_URL] [--port P] [--certfile PEM --keyfile PEM]
                                        prints its base URL, serves until SIGTERM

With ``--idp`` every request's ``Authorization`` header is checked against the dev IdP's demo API
(so a revoked token gets 401 here as there); without it any bearer token passes (the bench).

    GET  /echo                   200 {"headers": {...}, "method": ..., "path": ...}
    POST|PUT /upload             streams the body: 200 {"bytes": N, "sha256": HEX}
    GET  /download?size=N        N bytes of a fixed pattern, streamed (sha256 in X-Sha256)
    GET  /seen                   200 ["METHOD /path?query authorized|anonymous", ...]: every request
                                 to the routes above so far, in order (what reached the upstream)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import httpx
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

CHUNK = 64 * 1024
PATTERN = bytes(range(256)) * (CHUNK // 256)
DEMO_API = "/dp/api/v1/aiconnections/types"


def pattern_digest(size: int) -> str:
    digest = hashlib.sha256()
    left = size
    while left:
        piece = PATTERN[: min(left, CHUNK)]
        digest.update(piece)
        left -= len(piece)
    return digest.hexdigest()


def build_app(idp: str | None) -> Starlette:
    client = httpx.AsyncClient(timeout=10) if idp else None
    seen: list[str] = []

    async def denied(request: Request) -> Response | None:
        header = request.headers.get("authorization", "")
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        seen.append(f"{request.method} {target} {'authorized' if header else 'anonymous'}")
        if not header.startswith("Bearer "):
            return JSONResponse({"error": "unauthorized"}, 401, headers={"WWW-Authenticate": "Bearer"})
        if client is not None:
            status = (await client.get(f"{idp}{DEMO_API}", headers={"Authorization": header})).status_code
            if status != 200:
                return JSONResponse({"error": "invalid_token"}, status, headers={"WWW-Authenticate": "Bearer"})
        return None

    async def echo(request: Request) -> Response:
        refused = await denied(request)
        if refused is not None:
            return refused
        body: dict[str, Any] = {
            "method": request.method,
            "path": request.url.path,
            "query": request.url.query,
            "headers": dict(request.headers),
        }
        return JSONResponse(body)

    async def upload(request: Request) -> Response:
        refused = await denied(request)
        if refused is not None:
            return refused
        digest, size = hashlib.sha256(), 0
        async for piece in request.stream():
            digest.update(piece)
            size += len(piece)
        return JSONResponse({"bytes": size, "sha256": digest.hexdigest()})

    async def download(request: Request) -> Response:
        refused = await denied(request)
        if refused is not None:
            return refused
        size = int(request.query_params.get("size", "0"))

        async def body() -> AsyncIterator[bytes]:
            left = size
            while left:
                piece = PATTERN[: min(left, CHUNK)]
                left -= len(piece)
                yield piece

        headers = {"X-Sha256": pattern_digest(size), "Content-Length": str(size)}
        return StreamingResponse(body(), headers=headers, media_type="application/octet-stream")

    async def seen_so_far(request: Request) -> Response:
        return JSONResponse(seen)

    return Starlette(
        routes=[
            Route("/seen", seen_so_far, methods=["GET"]),
            Route("/echo", echo, methods=["GET", "POST"]),
            Route("/upload", upload, methods=["POST", "PUT"]),
            Route("/download", download, methods=["GET"]),
        ]
    )


@contextmanager
def running_upstream(idp: str | None = None, *tls: str) -> Iterator[str]:
    """This module as a process; yields its base URL. ``tls``: certfile, keyfile (https)."""
    cmd = [sys.executable, "-m", "tests.upstream", *(["--idp", idp] if idp else [])]
    if tls:
        cmd += ["--certfile", tls[0], "--keyfile", tls[1]]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("http"), f"the test upstream did not start: {line!r}"
        yield line
    finally:
        proc.terminate()
        proc.wait(10)


async def _main(idp: str | None, port: int, certfile: str | None = None, keyfile: str | None = None) -> None:
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    if certfile:
        config.certfile, config.keyfile = certfile, keyfile
    config.loglevel = "WARNING"
    config.accesslog = None
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(partial(serve, build_app(idp), config, mode="asgi"))  # type: ignore[arg-type]
            print(binds[0].replace("http://", "https://") if certfile else binds[0], flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.upstream")
    parser.add_argument("--idp", default=None)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--certfile", default=None, help="serve https with this certificate (PEM)")
    parser.add_argument("--keyfile", default=None)
    args = parser.parse_args(argv)
    trio.run(_main, args.idp, args.port, args.certfile, args.keyfile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
