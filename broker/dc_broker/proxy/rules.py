"""The proxy's rules, as plain values: who may use it, which requests go upstream and how, what a 401
means, how long each wait may last, and what every refusal says. No I/O: the edges
(``dc_broker.proxy.serve``) ask these and move the bytes.

Rules
    * One user: the proxy serves the uid that runs it (``Rules.uid``), as the kernel names the
      caller (``dc_broker.access.peer``); that is decided before a byte of the request is read.
    * No web page: a request with ``Origin`` or ``Sec-Fetch-Site`` is refused unless its origin is
      allowed; on TCP the ``Host`` must name the listener (``localhost`` or its address, with the
      port), else it is DNS rebinding (``admit``).
    * Only the configured upstream: origin-form targets (``/path?query``) are appended to the
      upstream's base URL; absolute-form, authority-form (CONNECT) and asterisk-form targets get 400,
      a URL longer than ``MAX_URL`` 414 (``upstream_url``).
    * Headers: hop-by-hop headers (RFC 9110 7.6.1), those the ``Connection`` header names, ``Host``
      and the caller's ``Authorization`` never go upstream; ours is added (``upstream_headers``).
      Hop-by-hop headers of the answer never come back (``response_headers``).
    * A 401 from upstream: the token was refused. Tell the broker (``invalidate``), and send the
      request once more only if its body was kept (at most ``REPLAY_LIMIT``) and the broker now gives
      another token (``retry_after_401``); otherwise the 401 goes back to the caller.
    * A kept upstream connection the upstream closed just as a request left on it (its keep-alive
      timeout): the request goes again, on a new connection, only if its method is idempotent and
      its body was kept (``send_again``, RFC 9112 9.3.1: a proxy never sends a non-idempotent
      request again by itself); otherwise 502, saying why.
    * Time (``Limits``): a request head must arrive within ``request_head``; an idle keep-alive
      connection closes after ``keep_alive``; the upstream must connect within ``connect`` and
      start its answer within ``response_head`` of the request's end. A body in either direction
      has no deadline of its own: it moves at the pace of whoever reads it, and ends only when no
      byte has moved for ``idle`` (so a slow export, a long poll or an event stream that pauses for
      minutes goes through).

Errors say whose fault they are: ``Refused`` carries the status the caller gets (4xx: the request,
403: the caller, 502/503/504: what is behind the proxy).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final

from dc_broker.errors import ConfigError

#: request bodies up to this size are kept, so a 401 can be retried with a fresh token
REPLAY_LIMIT: Final = 1024 * 1024
#: seconds a token must still be valid when a request leaves (and when it is sent again after a 401)
MIN_TTL: Final = 30.0
RETRY_MIN_TTL: Final = 1.0
#: the longest request head (request line and headers) read
MAX_HEAD: Final = 64 * 1024
#: the longest upstream URL (httpx refuses longer ones)
MAX_URL: Final = 65536
SERVER: Final = b"dc-broker-proxy"

#: RFC 9110 7.6.1 hop-by-hop headers, plus what the proxy sets itself (Host, Authorization) and
#: what it answers itself (Expect: 100-continue)
_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"authorization",
        b"expect",
    }
)


@dataclass(frozen=True, slots=True)
class Limits:
    """How many and how long (seconds). ``connections``: the owner's connections open at once;
    ``refusals_per_uid``: connections of one other uid (or of callers nobody can name) being told
    why they are refused at once (beyond that they are closed unanswered); ``linger``: how long a
    refused or closing connection is read and discarded, so its client sees the answer."""

    connections: int = 512
    refusals_per_uid: int = 4
    request_head: float = 10.0
    keep_alive: float = 60.0
    connect: float = 10.0
    response_head: float = 120.0
    idle: float = 300.0
    linger: float = 2.0


class Refused(Exception):
    """A request (or a caller) the proxy answers itself: ``status`` and a one-line ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Listen:
    """Where the proxy listens: a loopback TCP address, or a Unix socket path."""

    host: str = "127.0.0.1"
    port: int = 8765
    path: str | None = None

    @classmethod
    def parse(cls, text: str) -> Listen:
        if text.startswith("unix:"):
            path = text[5:]
            if not path:
                raise ConfigError("--listen unix:PATH needs a path")
            return cls(path=os.path.abspath(os.path.expanduser(path)))
        host, colon, port = text.rpartition(":")
        if not colon:
            host, port = "127.0.0.1", text
        host = host.strip("[]") or "127.0.0.1"
        try:
            number = int(port)
            ip = ipaddress.ip_address("127.0.0.1" if host == "localhost" else host)
        except ValueError:
            raise ConfigError(f"--listen {text!r}: write HOST:PORT (e.g. 127.0.0.1:8765) or unix:PATH") from None
        if not ip.is_loopback:
            raise ConfigError(
                f"--listen {text!r}: the proxy adds your token to every request, so it listens on loopback "
                "only (127.0.0.1, ::1) or a Unix socket"
            )
        if not 0 <= number < 65536:
            raise ConfigError(f"--listen {text!r}: port {number} is out of range")
        return cls(host=str(ip), port=number)

    def hosts(self, port: int) -> frozenset[str]:
        """The Host header values that name this listener (lower case)."""
        names = {"localhost", self.host if ":" not in self.host else f"[{self.host}]"}
        return frozenset({f"{name}:{port}" for name in names} | ({*names} if port == 80 else set()))

    def describe(self, port: int | None = None) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port if port is None else port}"

    def in_use(self) -> str:
        """The one-line start-up error for a TCP address another process holds, with the fix (a Unix
        path in use is ``dc_broker.serve.listen``'s to say)."""
        return (
            f"{self.describe()} is in use (another dc-broker proxy?); choose another port with "
            f"--listen {self.describe(0).rsplit(':', 1)[0]}:PORT, or --listen unix:PATH"
        )


@dataclass(frozen=True)
class Rules:
    uid: int
    #: Host values accepted on TCP (empty: a Unix listener, no Host check)
    hosts: frozenset[str] = frozenset()
    allowed_origins: frozenset[str] = frozenset()


# ---------------------------------------------------------------- the caller


def foreign(uid: int, rules: Rules) -> Refused:
    """Another user's connection (refused before its request is read)."""
    return Refused(403, f"dc-broker proxy: uid {uid} may not use this proxy (it serves uid {rules.uid} only)")


def unknown_caller(why: str) -> Refused:
    """A caller the kernel cannot name for certain."""
    return Refused(403, f"dc-broker proxy: cannot tell which user is calling ({why}); refused")


def busy(limits: Limits) -> Refused:
    return Refused(503, f"dc-broker proxy: {limits.connections} connections are open already; try again")


def _fields(headers: Iterable[tuple[bytes, bytes]]) -> dict[bytes, str]:
    seen: dict[bytes, str] = {}
    for name, value in headers:
        seen.setdefault(name.lower(), value.decode("latin-1").strip())
    return seen


def admit(rules: Rules, headers: Iterable[tuple[bytes, bytes]]) -> Refused | None:
    """Why this request (of the proxy's own user) is refused, or None to let it through."""
    seen = _fields(headers)
    origin = seen.get(b"origin")
    if (origin is not None or b"sec-fetch-site" in seen) and (origin is None or origin not in rules.allowed_origins):
        what = f"Origin {origin}" if origin is not None else "Sec-Fetch-Site"
        return Refused(
            403,
            f"dc-broker proxy: requests from web pages are refused ({what}); allow an origin with "
            "--allow-origin if a page of yours needs the proxy",
        )
    if rules.hosts and seen.get(b"host", "").lower() not in rules.hosts:
        return Refused(
            403,
            f"dc-broker proxy: Host {seen.get(b'host', '')!r} does not name this proxy (DNS rebinding?); "
            f"use {min(rules.hosts)}",
        )
    return None


# ---------------------------------------------------------------- the request and its answer


def upstream_url(base: str, target: bytes) -> str:
    """The upstream URL for a request target: origin-form paths only (``/path?query``)."""
    text = target.decode("ascii", "replace")
    if not text.startswith("/"):
        raise Refused(400, "dc-broker proxy: only origin-form request targets (/path) are proxied")
    url = base.rstrip("/") + text
    if len(url) > MAX_URL:
        raise Refused(414, f"dc-broker proxy: the URL is {len(url)} characters long; at most {MAX_URL} go upstream")
    return url


def _hop_by_hop(headers: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The fixed hop-by-hop names and those this message's ``Connection`` header lists."""
    named = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.split(b",")
        if token.strip()
    }
    return _HOP | named


def upstream_headers(headers: Iterable[tuple[bytes, bytes]], token: str) -> list[tuple[bytes, bytes]]:
    """The request's end-to-end headers plus our Authorization (any the caller sent is replaced)."""
    out = _end_to_end(headers)
    out.append((b"authorization", f"Bearer {token}".encode()))
    return out


def response_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The answer's end-to-end headers, passed back."""
    return _end_to_end(headers)


def _end_to_end(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Without the hop-by-hop ones; a message that came chunked loses its Content-Length too (RFC
    9112 section 6.3: Transfer-Encoding wins, and a proxy removes the other before forwarding), so
    the next hop cannot be told another framing than the one the proxy read."""
    given = list(headers)
    drop = _hop_by_hop(given)
    if any(name.lower() == b"transfer-encoding" for name, _ in given):
        drop |= {b"content-length"}
    return [(n, v) for n, v in given if n.lower() not in drop]


def retry_after_401(status: int, replayable: bool, sent: str, fresh: str) -> bool:
    """Send the request again with ``fresh``: the upstream refused ``sent`` (401), the body was
    kept, and the broker (told of the refusal) gives a token that is not the refused one. The broker
    refreshes a refused token at most once per 10 s, so a second 401 soon after goes back as is."""
    return status == 401 and replayable and fresh != sent


#: RFC 9110 9.2.2: methods whose request, sent twice, has the effect of sending it once
IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


def send_again(method: bytes, replayable: bool, stale: bool) -> bool:
    """Send the request again, on a new connection: it went out on a kept connection that broke
    before any of an answer came (``stale``: the upstream had closed it; a late answer is a 504,
    never this), its method is idempotent and its body was kept."""
    return stale and replayable and method in IDEMPOTENT


def not_sent_again(method: bytes, replayable: bool) -> str:
    """Why a request that met a closing kept connection was not sent again."""
    why = "its body was streamed, not kept" if method in IDEMPOTENT and not replayable else "it is not idempotent"
    return (
        f"the upstream closed a kept connection as this {method.decode('ascii', 'replace')} left on it; "
        f"{why}, so the proxy does not send it again by itself: send it again if it is safe to"
    )


# ---------------------------------------------------------------- what the proxy says itself


def broker_refused(message: str, hint: str) -> Refused:
    """The broker cannot give a token now (locked, logged out, unknown profile, not running): 503
    with its message, and the hint once if the message does not already say what to do."""
    return Refused(503, f"dc-broker proxy: {message}" + (f"; {hint}" if hint else ""))


def upstream_failed(upstream: str, via: str | None, why: str, *, timeout: bool = False) -> Refused:
    route = "" if via is None else f" via proxy {via}"
    return Refused(504 if timeout else 502, f"dc-broker proxy: upstream {upstream}{route} failed: {why}")


def plain(message: str, *, close: bool) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Headers and body of a text answer the proxy gives itself."""
    body = (message + "\n").encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"server", SERVER),
    ]
    if close:
        headers.append((b"connection", b"close"))
    return headers, body


def raw_answer(refused: Refused) -> bytes:
    """A whole HTTP/1.1 answer, ``Connection: close``, for a connection whose request is never read."""
    headers, body = plain(refused.message, close=True)
    try:
        reason = HTTPStatus(refused.status).phrase
    except ValueError:
        reason = ""
    head = f"HTTP/1.1 {refused.status} {reason}\r\n".encode() + b"".join(n + b": " + v + b"\r\n" for n, v in headers)
    return head + b"\r\n" + body
