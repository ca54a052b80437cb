"""``dc-broker proxy``: an authenticating local HTTP proxy in front of one upstream API.

    dc-broker proxy acme --upstream https://dc.example.com [--listen 127.0.0.1:8765 | --listen unix:PATH]
    curl http://127.0.0.1:8765/dp/api/v1/aiconnections/types        # no token in sight

For programs that can only be pointed at a URL (a BI tool, Postman, a notebook, a language without a
client library). Its own process, a client of the broker's socket (``AsyncTokenClient``, whose cache
answers most requests without a round trip); the daemon knows nothing about it.

Per request: the ``Authorization: Bearer`` header is set from the profile's token (min_ttl 30 s),
hop-by-hop headers are dropped, and request and response bodies are streamed in 64 KiB pieces (h11
on the listening side, httpx upstream), never held whole. On a 401 from upstream the token is
reported (``invalidate``) and the request sent again once with a fresh token, if its body was small
enough to keep (``REPLAY_LIMIT``); otherwise, or if the broker has nothing newer (it refreshes at most
once per 10 s per profile), the 401 goes back to the caller. Upstream TLS is always verified, against
the profile's ``ca_bundle`` (or ``--ca-bundle``) when given, else the system's CAs. Upstream
requests take the route the profile's IdP requests take (``dc_broker.idp.proxies``: its ``proxy``,
else ``https_proxy`` / ``no_proxy``, loopback direct), decided once at start.

Who may use it (``admit``): the user running the proxy, nobody else, and no web page:

- the caller's uid comes from the kernel: ``SO_PEERCRED`` on a Unix listener (whose socket is also
  0600), the socket table (``/proc/net/tcp``, ``tcp6``: the client end of the connection and its uid)
  on loopback TCP. Another uid gets 403. A TCP listener must be a loopback address;
- a request with an ``Origin`` or ``Sec-Fetch-Site`` header (a browser) gets 403 unless its origin
  is allowed (``--allow-origin``); on TCP a ``Host`` other than the listen address (``localhost`` or
  the address itself, with the port) gets 403: that is what DNS rebinding looks like.

Errors are answered, never raised: a broker that cannot give a token gets 503 with its one-line
message and what to do; an upstream that cannot be reached gets 502. No token is ever logged.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

import h11
import httpx
import trio

from dc_broker.errors import ConfigError, telling
from dc_broker.idp import proxies
from dc_token.aio import AsyncTokenClient
from dc_token.errors import BrokerUnavailable, DcBrokerError

log = logging.getLogger("dc_broker.proxy")

CHUNK: Final = 64 * 1024
#: request bodies up to this size are kept, so a 401 can be retried with a fresh token
REPLAY_LIMIT: Final = 1024 * 1024
#: seconds a token must still be valid when a request leaves
MIN_TTL: Final = 30.0
RETRY_MIN_TTL: Final = 1.0
#: a request's head must arrive within this long; an idle keep-alive connection is closed after IDLE
HEAD_TIMEOUT: Final = 10.0
IDLE_TIMEOUT: Final = 60.0
MAX_CONNECTIONS: Final = 512
MAX_HEAD: Final = 64 * 1024
_TIMEOUTS: Final = {"connect": 10.0, "read": 60.0, "write": 60.0, "pool": 60.0}
#: RFC 9110 7.6.1 hop-by-hop headers, plus what the proxy sets itself
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
_SERVER: Final = b"dc-broker-proxy"


# ---------------------------------------------------------------- who is calling (pure parsers + kernel)


def _hex_address(text: str) -> tuple[str, int]:
    """``0100007F:1F90`` (or the 32-hex-digit IPv6 form) from /proc/net/tcp* -> ("127.0.0.1", 8080)."""
    addr, _, port = text.partition(":")
    raw = bytes.fromhex(addr)
    if len(raw) == 4:
        ip = ipaddress.IPv4Address(raw[::-1])  # one little-endian 32-bit word
    else:
        words = struct.unpack("<4I", raw)  # four host-order 32-bit words
        ip6 = ipaddress.IPv6Address(struct.pack(">4I", *words))
        ip = ip6.ipv4_mapped or ip6  # type: ignore[assignment]
    return str(ip), int(port, 16)


def _norm(host: str) -> str:
    ip = ipaddress.ip_address(host.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def tcp_owner(tables: Iterable[str], client: tuple[str, int], server: tuple[str, int]) -> int | None:
    """The uid owning the socket whose local end is ``client`` and remote end ``server``, from the
    text of /proc/net/tcp and /proc/net/tcp6 (columns: sl local rem st ... uid ...), else None."""
    want_local = (_norm(client[0]), client[1])
    want_remote = (_norm(server[0]), server[1])
    for table in tables:
        for line in table.splitlines()[1:]:
            fields = line.split()
            if len(fields) < 8:
                continue
            try:
                local, remote = _hex_address(fields[1]), _hex_address(fields[2])
            except ValueError:
                continue
            if local == want_local and remote == want_remote:
                return int(fields[7])
    return None


def peer_uid(sock: Any) -> int | None:
    """The connecting process's uid, as the kernel says: SO_PEERCRED on Unix sockets, the socket
    table on TCP. None if it cannot be told (the caller is then refused)."""
    if sock.family == socket.AF_UNIX:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        return int(uid)
    try:
        client, server = sock.getpeername()[:2], sock.getsockname()[:2]
    except OSError:
        return None
    tables = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(name) as f:
            tables.append(f.read())
    return tcp_owner(tables, client, server)


# ---------------------------------------------------------------- the rules (pure)


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


@dataclass(frozen=True)
class Rules:
    uid: int = field(default_factory=os.getuid)
    #: Host values accepted on TCP (empty: a Unix listener, no Host check)
    hosts: frozenset[str] = frozenset()
    allowed_origins: frozenset[str] = frozenset()


def admit(rules: Rules, uid: int | None, headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """Why this request is refused (403), or None to let it through."""
    if uid is None:
        return "the proxy cannot tell which user is calling; refused"
    if uid != rules.uid:
        return f"uid {uid} may not use this proxy (it serves uid {rules.uid} only)"
    seen: dict[bytes, str] = {}
    for name, value in headers:
        seen.setdefault(name.lower(), value.decode("latin-1").strip())
    origin = seen.get(b"origin")
    if (origin is not None or b"sec-fetch-site" in seen) and (origin is None or origin not in rules.allowed_origins):
        what = f"Origin {origin}" if origin is not None else "Sec-Fetch-Site"
        return (
            f"requests from web pages are refused ({what}); allow an origin with --allow-origin "
            "if a page of yours needs the proxy"
        )
    if rules.hosts and seen.get(b"host", "").lower() not in rules.hosts:
        return f"Host {seen.get(b'host', '')!r} does not name this proxy (DNS rebinding?); use {min(rules.hosts)}"
    return None


def upstream_headers(headers: Iterable[tuple[bytes, bytes]], token: str) -> list[tuple[bytes, bytes]]:
    """The request's end-to-end headers plus our Authorization (any the caller sent is replaced)."""
    out = [(n, v) for n, v in headers if n.lower() not in _HOP]
    out.append((b"authorization", f"Bearer {token}".encode()))
    return out


def response_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(n, v) for n, v in headers if n.lower() not in _HOP]


def upstream_url(base: str, target: bytes) -> str:
    """The upstream URL for a request target: origin-form paths only (``/path?query``)."""
    text = target.decode("ascii", "replace")
    if not text.startswith("/"):
        raise ValueError("only origin-form request targets (/path) are proxied")
    return base.rstrip("/") + text


# ---------------------------------------------------------------- one connection


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Conn:
    """h11 over a trio stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self._out = bytearray()

    async def next_event(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                if self.h11.they_are_waiting_for_100_continue:
                    await self.send(h11.InformationalResponse(status_code=100, headers=[]))
                self.h11.receive_data(bytes(await self.stream.receive_some(CHUNK)))
                continue
            return event

    async def send(self, event: Any) -> None:
        """Queue an event's bytes; they leave at the end of a message or once a chunk's worth is
        queued (a small response goes out in one write: one segment, no Nagle/delayed-ACK stall)."""
        data = self.h11.send(event)
        if data:
            self._out += data
        if len(self._out) >= CHUNK or isinstance(event, h11.EndOfMessage | h11.InformationalResponse):
            out, self._out = self._out, bytearray()
            await self.stream.send_all(out)

    async def body(self) -> AsyncIterator[bytes]:
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return
            else:
                raise h11.RemoteProtocolError("unexpected event in a request body")

    async def simple(self, status: int, message: str, *, close: bool = False) -> None:
        body = (message + "\n").encode()
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
        if close:
            headers.append((b"connection", b"close"))
        await self.send(h11.Response(status_code=status, headers=[*headers, (b"server", _SERVER)]))
        await self.send(h11.Data(data=body))
        await self.send(h11.EndOfMessage())


class Proxy:
    """The proxy's state: one upstream, one profile, the token client, the upstream HTTP client."""

    def __init__(
        self,
        profile: str,
        upstream: str,
        *,
        broker: AsyncTokenClient,
        http: Upstreams,
        rules: Rules,
    ) -> None:
        self.profile = profile
        self.upstream = upstream.rstrip("/")
        self.broker = broker
        self.http = http
        self.rules = rules
        self._limit = trio.Semaphore(MAX_CONNECTIONS)
        self.requests = 0
        self.retries = 0

    async def serve_connection(self, stream: trio.SocketStream) -> None:
        async with self._limit:
            try:
                await self._connection(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, trio.TooSlowError):
                pass  # the caller went away or spoke nonsense: drop the connection
            finally:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.aclose()

    async def _connection(self, stream: trio.SocketStream) -> None:
        uid = peer_uid(stream.socket)
        conn = _Conn(stream)
        upstream = self.http.take()  # this connection's own: its requests come one after another
        try:
            await self._requests(conn, uid, upstream)
        finally:
            await self.http.give(upstream)

    async def _requests(self, conn: _Conn, uid: int | None, upstream: httpx.AsyncHTTPTransport) -> None:
        first = True
        while True:
            with trio.fail_after(HEAD_TIMEOUT if first else IDLE_TIMEOUT):
                event = await conn.next_event()
            first = False
            if isinstance(event, h11.ConnectionClosed):
                return
            if not isinstance(event, h11.Request):
                return
            refused = admit(self.rules, uid, event.headers)
            if refused is not None:
                log.warning("refused %s %s: %s", event.method.decode(), event.target.decode("latin-1")[:200], refused)
                await conn.simple(403, f"dc-broker proxy: {refused}", close=True)
                return
            await self._forward(conn, event, upstream)
            if conn.h11.our_state is h11.MUST_CLOSE or conn.h11.their_state is not h11.DONE:
                return
            conn.h11.start_next_cycle()

    async def _forward(self, conn: _Conn, request: h11.Request, upstream: httpx.AsyncBaseTransport) -> None:
        """One request: its body (kept when small), a token, upstream, and the response streamed back."""
        self.requests += 1
        try:
            url = upstream_url(self.upstream, request.target)
        except ValueError as exc:
            await conn.simple(400, f"dc-broker proxy: {exc}", close=True)
            return
        body, replayable = await self._request_body(conn, request)
        try:
            token = await self.broker.token(self.profile, min_ttl=MIN_TTL)
        except DcBrokerError as exc:
            await conn.simple(503, f"dc-broker proxy: {exc}" + (f"; {exc.hint}" if exc.hint else ""), close=True)
            return
        method = request.method.decode("ascii")
        try:
            response = await self._send(upstream, method, url, request.headers, body, token)
            if response.status_code == 401 and replayable:
                await self.broker.invalidate(self.profile, token)
                fresh = await self.broker.token(self.profile, min_ttl=RETRY_MIN_TTL)
                if fresh != token:
                    await response.aclose()
                    self.retries += 1
                    log.info("%s %s: upstream said 401; token invalidated, sending once more", method, url)
                    response = await self._send(upstream, method, url, request.headers, body, fresh)
        except DcBrokerError as exc:
            await conn.simple(503, f"dc-broker proxy: {exc}", close=True)
            return
        except httpx.HTTPError as exc:
            via = self.http.via
            why = proxies.scrub(telling(exc), via)
            route = "" if via is None else f" via proxy {proxies.shown(via)}"
            await conn.simple(502, f"dc-broker proxy: upstream {self.upstream}{route} failed: {why}", close=True)
            return
        try:
            await conn.send(
                h11.Response(status_code=response.status_code, headers=response_headers(response.headers.raw))
            )
            async for piece in response.aiter_raw(CHUNK):
                await conn.send(h11.Data(data=piece))
            await conn.send(h11.EndOfMessage())
        finally:
            await response.aclose()

    async def _request_body(self, conn: _Conn, request: h11.Request) -> tuple[bytes | AsyncIterator[bytes], bool]:
        """The body to send: whole bytes when it fits ``REPLAY_LIMIT`` (replayable), else a stream of
        what was read so far and the rest (sent once)."""
        kept: list[bytes] = []
        size = 0
        pieces = conn.body()
        async for piece in pieces:
            kept.append(piece)
            size += len(piece)
            if size > REPLAY_LIMIT:

                async def rest() -> AsyncIterator[bytes]:
                    for early in kept:
                        yield early
                    kept.clear()
                    async for later in pieces:
                        yield later

                return rest(), False
        return b"".join(kept), True

    async def _send(
        self,
        upstream: httpx.AsyncBaseTransport,
        method: str,
        url: str,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes | AsyncIterator[bytes],
        token: str,
    ) -> httpx.Response:
        # a streamed body keeps the caller's Content-Length, or goes chunked without one
        req = httpx.Request(
            method, url, headers=upstream_headers(headers, token), content=body, extensions={"timeout": _TIMEOUTS}
        )
        # the transport itself: no cookies, redirects, auth or event hooks to run on every request
        return await upstream.handle_async_request(req)


# ---------------------------------------------------------------- running it


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
    request, which at 16 busy connections costs more than the rest of the proxy."""

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

    async def give(self, transport: httpx.AsyncHTTPTransport) -> None:
        if len(self._free) < self._keep:
            self._free.append(transport)
        else:
            with trio.CancelScope(shield=True):
                await transport.aclose()

    async def aclose(self) -> None:
        free, self._free = self._free, []
        for transport in free:
            await transport.aclose()


async def run_proxy(
    profile: str,
    upstream: str,
    listen: Listen,
    *,
    socket_path: str | None = None,
    ca_bundle: str | None = None,
    via: str | None = None,
    allowed_origins: Iterable[str] = (),
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled. ``task_status.started(address)`` once listening (``host:port`` with the
    real port, or ``unix:PATH``). ``via``: the HTTP proxy to the upstream (``proxies.route``)."""
    from dc_broker.serve.listen import bind_unix_socket, release

    upstream = check_upstream(upstream)
    broker = AsyncTokenClient(socket_path)
    try:
        await broker.hello()
    except BrokerUnavailable as exc:
        raise BrokerUnavailable(f"{exc}; start it first (`dc-broker run`)") from None
    http = Upstreams(ca_bundle, via=via)
    lock = None
    if listen.path is not None:
        raw, lock = bind_unix_socket(listen.path, mode=0o600, strict_dir=False)
        listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(raw))]
        hosts: frozenset[str] = frozenset()
        where = listen.describe()
    else:
        listeners = await trio.open_tcp_listeners(listen.port, host=listen.host)
        port = listeners[0].socket.getsockname()[1]
        hosts = listen.hosts(port)
        where = listen.describe(port)
    rules = Rules(hosts=hosts, allowed_origins=frozenset(o.rstrip("/") for o in allowed_origins))
    proxy = Proxy(profile, upstream, broker=broker, http=http, rules=rules)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, proxy.serve_connection, listeners)
            log.info("dc-broker proxy for profile %s: http on %s -> %s", profile, where, upstream)
            task_status.started(where)
    finally:
        with trio.CancelScope(shield=True):
            await http.aclose()
            await broker.aclose()
        if lock is not None and listen.path is not None:
            release(listen.path, raw, lock)
