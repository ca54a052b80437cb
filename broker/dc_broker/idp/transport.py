"""The IdP transport: the one place that sends an ``HttpRequest`` (``dc_broker.idp.oidc``) over the
network and returns an ``HttpResponse``. httpx under bounded timeouts (a total deadline too, so a
server that drips its answer cannot hold a refresh for ever), TLS verification on (optionally a
per-profile CA bundle), no redirects, no proxy from the environment; every httpx failure becomes
``UpstreamTransient`` here, so nothing above it sees an httpx exception.

Must never: parse a token response (``oidc.parse_*`` does), log a request body, or put more of an
OS error than ``_safe`` allows into a message.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Final

import httpx
import trio

from dc_broker.errors import UpstreamGarbage, UpstreamTransient
from dc_broker.idp.oidc import HttpRequest, HttpResponse

#: the largest IdP answer read (a token response is a few KiB)
_MAX_BODY: Final = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 5.0
    read: float = 10.0
    write: float = 5.0
    pool: float = 5.0
    #: the whole request, connect to last byte: a server that drips its answer cannot hold a
    #: refresh for ever (httpx's read timeout applies per chunk)
    total: float = 20.0


class IdpTransport:
    """Sends HttpRequests with httpx. One AsyncClient per CA bundle, kept for connection reuse."""

    def __init__(self, timeouts: Timeouts = Timeouts(), *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._timeout = httpx.Timeout(timeouts.read, connect=timeouts.connect, write=timeouts.write, pool=timeouts.pool)
        self._total = timeouts.total
        self._transport = transport
        self._clients: dict[str | None, httpx.AsyncClient] = {}

    def _client(self, ca_bundle: str | None) -> httpx.AsyncClient:
        client = self._clients.get(ca_bundle)
        if client is None:
            verify: ssl.SSLContext | bool = True
            if ca_bundle is not None:
                verify = ssl.create_default_context(cafile=ca_bundle)
            client = httpx.AsyncClient(
                timeout=self._timeout,
                verify=verify,
                transport=self._transport,
                follow_redirects=False,
                trust_env=False,
                headers={"User-Agent": "dc-broker"},
            )
            self._clients[ca_bundle] = client
        return client

    async def send(self, req: HttpRequest, *, ca_bundle: str | None = None) -> HttpResponse:
        try:
            client = self._client(ca_bundle)
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamTransient(f"CA bundle {ca_bundle} cannot be loaded: {exc}") from None
        content = req.body() if req.form else None
        with trio.move_on_after(self._total):
            return await self._send(client, req, content)
        raise UpstreamTransient(
            f"identity provider did not finish answering within {self._total:g} s at {_origin(req.url)}"
        )

    async def _send(self, client: httpx.AsyncClient, req: HttpRequest, content: bytes | None) -> HttpResponse:
        try:
            async with client.stream(req.method, req.url, headers=dict(req.headers), content=content) as resp:
                body = b""
                async for chunk in resp.aiter_bytes():
                    body += chunk
                    if len(body) > _MAX_BODY:
                        raise UpstreamGarbage(f"identity provider answer exceeds {_MAX_BODY} bytes")
                headers = {k.lower(): v for k, v in resp.headers.items()}
                return HttpResponse(resp.status_code, headers, body)
        except httpx.TimeoutException as exc:
            raise UpstreamTransient(
                f"identity provider timed out ({type(exc).__name__}) at {_origin(req.url)}"
            ) from None
        except httpx.TransportError as exc:
            raise UpstreamTransient(
                f"identity provider unreachable at {_origin(req.url)}: {type(exc).__name__}: {_safe(exc)}"
            ) from None

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()


def _origin(url: str) -> str:
    parts = httpx.URL(url)
    return f"{parts.scheme}://{parts.host}{':' + str(parts.port) if parts.port else ''}"


def _safe(exc: BaseException) -> str:
    # httpx transport errors carry OS-level messages, never the request body; keep them short anyway
    return str(exc)[:200]
