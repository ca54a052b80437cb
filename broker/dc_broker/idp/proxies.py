"""Which HTTP proxy, if any, carries a request to the IdP. Pure: the environment is a parameter.

A profile's ``proxy`` setting decides when it is set: a proxy URL (``http://proxy.corp:3128``, or
``https://`` for TLS to the proxy itself) or ``direct``. Without it the standard variables decide,
read the way curl reads them:

* ``https_proxy`` / ``HTTPS_PROXY``, else ``all_proxy`` / ``ALL_PROXY``; the lower-case spelling
  wins where both are set; a value without a scheme is ``http://``. (``http_proxy`` never applies:
  plain http goes only to loopback, ``dc_broker.config.check_url``, and loopback goes direct);
* ``no_proxy`` / ``NO_PROXY``: comma-separated hosts and domains; ``corp.example`` and
  ``.corp.example`` match it and every host below it, ``*`` matches every host, an entry may end in
  ``:port``, and IP addresses and CIDR ranges (``10.0.0.0/8``) match as addresses;
* loopback (``localhost``, 127.0.0.0/8, ``::1``) never goes through a proxy from the environment (as
  in Go's net/http): a local IdP or an SSH tunnel stays local. A profile's own ``proxy`` applies to
  every host, loopback included.

Only ``http://`` and ``https://`` proxies: a ``socks5://`` value is refused with a message naming the
variable. A proxy URL from the environment may carry ``user:password@`` (config.toml holds no
secrets, so a profile's may not); ``shown`` is the form for every message, log line and status:
scheme, host and port, never the credentials. A proxy may quote what it was sent back to us (a 407's
reason phrase, an error page, a header): ``scrub`` takes the credentials out of such text in every
spelling they travel in (``credential_forms``: as written in the URL, percent-decoded and encoded
again, and the base64 of ``user:password`` that ``Proxy-Authorization: Basic`` carries).

Must never: read ``os.environ`` (the transport passes it in) or put a proxy's credentials into text.
"""

from __future__ import annotations

import base64
import functools
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote, quote_plus, unquote, urlsplit

from dc_broker.config.values import DIRECT, proxy_url_problem, redacted
from dc_broker.config.values import proxy_setting_problem as setting_problem
from dc_broker.errors import ConfigError

__all__ = [
    "DEFAULT_PORTS",
    "DIRECT",
    "EnvProxies",
    "basic_credentials",
    "credential_forms",
    "host_port",
    "redacted",
    "route",
    "scrub",
    "setting_problem",
    "shown",
]

DEFAULT_PORTS: Final = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class EnvProxies:
    """The proxy variables of one environment, checked once (``from_environ``)."""

    https: str | None = None
    all: str | None = None
    no_proxy: tuple[str, ...] = ()

    def __repr__(self) -> str:  # the URLs may carry credentials
        return f"EnvProxies(https={_shown_or_none(self.https)}, all={_shown_or_none(self.all)}, ...)"

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> EnvProxies:
        """The variables as set; a value that is no usable proxy URL is a ``ConfigError`` naming it."""

        def first(*names: str) -> str | None:
            for name in names:
                value = environ.get(name, "").strip()
                if value:
                    return _env_url(name, value)
            return None

        no_proxy = environ.get("no_proxy") or environ.get("NO_PROXY") or ""
        return cls(
            https=first("https_proxy", "HTTPS_PROXY"),
            all=first("all_proxy", "ALL_PROXY"),
            no_proxy=tuple(e.strip().lower() for e in no_proxy.split(",") if e.strip()),
        )


def route(url: str, setting: str | None, env: EnvProxies) -> str | None:
    """The proxy URL for a request to ``url`` (None: straight to the IdP)."""
    if setting is not None:
        return None if setting == DIRECT else setting
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if _is_loopback(host):
        return None
    chosen = env.https or env.all
    if chosen is None:
        return None
    port = parts.port or DEFAULT_PORTS.get(parts.scheme.lower())
    if any(_bypasses(entry, host, port) for entry in env.no_proxy):
        return None
    return chosen


def shown(proxy: str) -> str:
    """A proxy URL as messages show it: scheme, host and port, no credentials."""
    parts = urlsplit(proxy)
    return f"{parts.scheme}://{host_port(parts.hostname or '?', parts.port or DEFAULT_PORTS.get(parts.scheme, 0))}"


def host_port(host: str, port: int) -> str:
    """``host:port``, an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def basic_credentials(proxy: str) -> bytes | None:
    """The ``Proxy-Authorization`` value for ``proxy``'s credentials as httpx sends it (``Basic``, the
    URL's user and password percent-decoded: one of ``credential_forms``), or None without any."""
    parts = urlsplit(proxy)
    if parts.username is None:
        return None
    pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
    return b"Basic " + base64.b64encode(pair)


@functools.lru_cache(maxsize=64)
def credential_forms(proxy: str | None) -> tuple[str, ...]:
    """Every spelling of ``proxy``'s credentials a message could quote, longest first: user and
    password as the URL writes them, percent-decoded, and encoded again (``%40`` and ``+`` forms), and
    ``base64(user:password)`` as ``Proxy-Authorization: Basic`` sends it (httpx decodes the URL's
    percent-escapes first), in the standard and URL-safe alphabets, with and without padding."""
    if proxy is None:
        return ()
    parts = urlsplit(proxy)
    user, password = parts.username or "", parts.password or ""
    if not user and not password:
        return ()
    forms: set[str] = set()
    for secret in (user, password):
        if secret:
            plain = unquote(secret)
            forms.update((secret, plain, quote(plain), quote(plain, safe=""), quote_plus(plain)))
    for pair in {f"{unquote(user)}:{unquote(password)}", f"{user}:{password}"}:
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            encoded = encode(pair.encode("utf-8")).decode("ascii")
            forms.update((encoded, encoded.rstrip("=")))
    return tuple(sorted((f for f in forms if f), key=len, reverse=True))


def scrub(text: str, proxy: str | None) -> str:
    """``text`` (an error message from below, a proxy's answer) without the proxy URL's credentials,
    in any spelling of ``credential_forms``, should it quote them."""
    for form in credential_forms(proxy):
        text = text.replace(form, "***")
    return text


def _shown_or_none(proxy: str | None) -> str | None:
    return None if proxy is None else shown(proxy)


def _env_url(name: str, value: str) -> str:
    if "://" not in value:
        value = "http://" + value  # curl's reading of "proxy.corp:3128"
    problem = proxy_url_problem(value)
    if problem is not None:
        raise ConfigError(
            f"the environment's {name} {problem} (seen: {redacted(value)}); fix or unset it, or set the "
            "profile's proxy (a URL, or 'direct')"
        )
    return value


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bypasses(entry: str, host: str, port: int | None) -> bool:
    """Whether one ``no_proxy`` entry matches ``host`` (and ``port``)."""
    if entry == "*":
        return True
    want_port: int | None = None
    if entry.startswith("["):  # [::1]:8080 or [::1]
        inner, _, tail = entry[1:].partition("]")
        entry = inner
        if tail.startswith(":") and tail[1:].isdecimal():
            want_port = int(tail[1:])
    elif entry.count(":") == 1:  # host:port (a bare IPv6 address has more colons)
        name, _, digits = entry.partition(":")
        if digits.isdecimal():
            entry, want_port = name, int(digits)
    if want_port is not None and want_port != port:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if "/" in entry or address is not None:
        try:
            return address is not None and address in ipaddress.ip_network(entry, strict=False)
        except ValueError:
            return False
    domain = entry.removeprefix("*").removeprefix(".")
    return bool(domain) and (host == domain or host.endswith("." + domain))
