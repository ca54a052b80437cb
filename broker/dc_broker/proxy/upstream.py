"""The proxy's side toward the upstream API: the base URL's checks, verified TLS, and the httpx
transports that carry the requests (``Upstreams``).

Upstream TLS is always verified, against the profile's ``ca_bundle`` (or ``--ca-bundle``) when
given, else the system's CAs. Requests take the route the profile's IdP requests take
(``dc_broker.idp.proxies``: its ``proxy``, else ``https_proxy`` / ``no_proxy``, loopback direct),
decided once at start (``via``).

Must never: follow redirects, keep cookies, read a proxy or netrc from the environment by itself,
or turn off certificate checks.
"""

from __future__ import annotations

import ssl
from urllib.parse import urlsplit

import httpx
import trio

from dc_broker.errors import ConfigError


def tls_context(ca_bundle: str | None) -> ssl.SSLContext:
    """Verified TLS: the given CA bundle, else the system's CAs."""
    try:
        return ssl.create_default_context(cafile=ca_bundle)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"CA bundle {ca_bundle}: cannot be used: {exc}") from None


def check_upstream(url: str) -> str:
    from dc_broker.config import check_url

    check_url(url, "--upstream")
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise ConfigError(f"--upstream {url!r}: give a base URL without query or fragment")
    return url.rstrip("/")


class Upstreams:
    """httpx transports to the upstream, one per client connection at a time, each holding at most
    one keep-alive connection, kept on a free list between client connections (so a client that
    connects per request still reuses an upstream connection, TLS handshake done).

    The transport is used directly (no client layer: the request is forwarded as it came, with none
    of httpx's default headers, cookies or redirects); verified TLS, no proxy or netrc from the
    environment (``via``: the HTTP proxy to the upstream, or None). One small pool per client
    connection rather than one shared pool: httpcore's pool checks every connection it holds on each
    request, which at 16 busy connections costs more than the rest of the proxy. A transport whose
    exchange failed (a broken answer, a timeout, a cancelled request) is closed, never reused."""

    def __init__(self, ca_bundle: str | None, keep: int = 32, *, via: str | None = None) -> None:
        self._tls = tls_context(ca_bundle)
        self.via = via
        self._free: list[httpx.AsyncHTTPTransport] = []
        self._keep = keep

    def take(self) -> httpx.AsyncHTTPTransport:
        if self._free:
            return self._free.pop()
        return httpx.AsyncHTTPTransport(
            verify=self._tls,
            trust_env=False,
            proxy=self.via,
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        )

    async def give(self, transport: httpx.AsyncHTTPTransport, *, healthy: bool = True) -> None:
        if healthy and len(self._free) < self._keep:
            self._free.append(transport)
        else:
            with trio.CancelScope(shield=True):
                await transport.aclose()

    async def aclose(self) -> None:
        free, self._free = self._free, []
        for transport in free:
            await transport.aclose()
