"""The IdP transport: the one place that sends an ``HttpRequest`` (``dc_broker.idp.oidc``) over the
network and returns an ``HttpResponse``. httpx under bounded timeouts (a total deadline too, so a
server that drips its answer cannot hold a refresh for ever), TLS verification on (optionally a
per-profile CA bundle), no redirects; the HTTP proxy that ``dc_broker.idp.proxies`` picks from the
profile's ``proxy`` setting or the standard variables (read once, when the transport is made: nothing
else of httpx's ``trust_env`` applies, no ``.netrc``, no ``SSL_CERT_FILE``). Every httpx failure
becomes ``UpstreamTransient`` here, naming the proxy it went through, so nothing above it sees an
httpx exception.

A request that spends a single-use credential (``HttpRequest.precious``: a refresh token Keycloak
may rotate) is read patiently (``Timeouts.precious_read`` / ``precious_total``): once it is sent, its
answer carries the only copy of the next refresh token, and a 30 s stall of the IdP must not make the
broker walk away from it. If it is lost anyway after it went out, the failure is ``AnswerLost``.

Must never: parse a token response (``oidc.parse_*`` does), log a request body, put more of an OS
error than ``_safe`` allows into a message, or a proxy's credentials (``proxies.shown`` only; a
proxy's answer that quotes them back, e.g. in a 407's reason phrase, is ``proxies.scrub``bed in every
encoding they travel in). Only a tunnel (CONNECT) carries them: a proxy is never given a plain-http
request with credentials, since plain http goes only to loopback, and loopback goes direct.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import httpx
import trio

from dc_broker.errors import AnswerLost, UpstreamGarbage, UpstreamTransient, causes, telling
from dc_broker.idp import proxies
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
    #: a precious request (one that spends a refresh token): per chunk, and connect to last byte
    precious_read: float = 120.0
    precious_total: float = 180.0


class IdpTransport:
    """Sends HttpRequests with httpx. One AsyncClient per (CA bundle, proxy), kept for connection reuse.

    ``environ`` (default ``os.environ``) is read once, here: a proxy variable that is no usable
    proxy URL is a ``ConfigError`` at start-up, not a failure of every refresh."""

    def __init__(
        self,
        timeouts: Timeouts = Timeouts(),
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._timeout = httpx.Timeout(timeouts.read, connect=timeouts.connect, write=timeouts.write, pool=timeouts.pool)
        self._precious_timeout = httpx.Timeout(
            timeouts.precious_read, connect=timeouts.connect, write=timeouts.write, pool=timeouts.pool
        )
        self._total = timeouts.total
        self._precious_total = timeouts.precious_total
        self._transport = transport
        self._env = proxies.EnvProxies.from_environ(os.environ if environ is None else environ)
        self._clients: dict[tuple[str | None, str | None], httpx.AsyncClient] = {}

    def _client(self, ca_bundle: str | None, via: str | None) -> httpx.AsyncClient:
        client = self._clients.get((ca_bundle, via))
        if client is None:
            verify: ssl.SSLContext | bool = True
            if ca_bundle is not None:
                verify = ssl.create_default_context(cafile=ca_bundle)
            client = httpx.AsyncClient(
                timeout=self._timeout,
                verify=verify,
                transport=self._transport,
                proxy=via,
                follow_redirects=False,
                trust_env=False,
                headers={"User-Agent": "dc-broker"},
            )
            self._clients[(ca_bundle, via)] = client
        return client

    def via(self, url: str, proxy: str | None) -> str | None:
        """The proxy a request to ``url`` goes through, as messages show it (None: direct)."""
        route = proxies.route(url, proxy, self._env)
        return None if route is None else proxies.shown(route)

    async def send(self, req: HttpRequest, *, ca_bundle: str | None = None, proxy: str | None = None) -> HttpResponse:
        """``proxy``: the profile's setting (a URL, ``direct``, or None for the environment's)."""
        via = proxies.route(req.url, proxy, self._env)
        try:
            client = self._client(ca_bundle, via)
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamTransient(f"CA bundle {ca_bundle} cannot be loaded: {exc}") from None
        content = req.body() if req.form else None
        where = _origin(req.url) + ("" if via is None else f" via proxy {proxies.shown(via)}")
        total = self._precious_total if req.precious else self._total
        with trio.move_on_after(total):
            resp = await self._send(client, req, content, where, via)
            if via is not None and resp.status == 407:  # a plain-http IdP: the proxy answers in its stead
                raise _proxy_refused(via, req.url, "407 Proxy Authentication Required")
            return resp
        lost = AnswerLost if req.precious else UpstreamTransient
        raise lost(f"identity provider did not finish answering within {total:g} s at {where}")

    async def _send(
        self, client: httpx.AsyncClient, req: HttpRequest, content: bytes | None, where: str, via: str | None
    ) -> HttpResponse:
        timeout = self._precious_timeout if req.precious else self._timeout
        try:
            async with client.stream(
                req.method, req.url, headers=dict(req.headers), content=content, timeout=timeout
            ) as resp:
                body = b""
                async for chunk in resp.aiter_bytes():
                    body += chunk
                    if len(body) > _MAX_BODY:
                        raise UpstreamGarbage(f"identity provider answer exceeds {_MAX_BODY} bytes")
                headers = {k.lower(): v for k, v in resp.headers.items()}
                return HttpResponse(resp.status_code, headers, body)
        except httpx.TimeoutException as exc:
            lost = AnswerLost if req.precious and _maybe_sent(exc) else UpstreamTransient
            raise lost(f"identity provider timed out ({type(exc).__name__}) at {where}") from None
        except httpx.ProxyError as exc:  # the proxy's answer to CONNECT, e.g. "502 Bad Gateway"
            raise _proxy_refused(via or "", req.url, _safe(exc, via, named=False)) from None
        except httpx.TransportError as exc:
            hint = ""
            if any(isinstance(e, ssl.SSLCertVerificationError) for e in causes(exc)):
                hint = "; if the IdP's certificate comes from a private CA, give the profile its CA (ca_bundle = PATH)"
            lost = AnswerLost if req.precious and _maybe_sent(exc) else UpstreamTransient
            raise lost(f"identity provider unreachable at {where}: {_safe(exc, via)}{hint}") from None

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()


def _maybe_sent(exc: httpx.TransportError) -> bool:
    """Whether the request may have reached the IdP: anything but a failure to connect (or to get
    a connection from the pool) may have come after the request went out."""
    return not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)


def _proxy_refused(via: str, url: str, answer: str) -> UpstreamTransient:
    proxy, target = proxies.shown(via), _origin(url)
    if answer.startswith("407"):
        return UpstreamTransient(
            f"the proxy {proxy} refused to reach {target} without valid credentials ({answer}): proxy "
            "credentials come from the broker's environment, https_proxy=http://USER:PASSWORD@HOST:PORT "
            "(with the profile's proxy unset)"
        )
    return UpstreamTransient(
        f"the proxy {proxy} could not reach {target} ({answer}): check the IdP's host name, or let it "
        'bypass the proxy (no_proxy, or the profile\'s proxy = "direct")'
    )


def _origin(url: str) -> str:
    parts = httpx.URL(url)
    return f"{parts.scheme}://{parts.host}{':' + str(parts.port) if parts.port else ''}"


def _safe(exc: BaseException, via: str | None = None, *, named: bool = True) -> str:
    """The exception's telling message (httpx transport errors carry OS-level ones, never the request
    body), short, and should one ever quote the proxy URL, without its credentials."""
    return proxies.scrub(telling(exc, named=named), via)[:200]
