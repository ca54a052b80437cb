"""The proxy's side toward the upstream API: the base URL's checks, verified TLS, and the HTTP/1.1
connections that carry the requests (``Upstream``, kept for reuse by ``Upstreams``).

One ``Upstream`` is one keep-alive connection spoken with h11's client state machine, over a
``RawStream`` (plain), a ``trio.SSLStream`` on it (https), through an HTTP proxy when the route says
so: a ``CONNECT`` tunnel for an https upstream, the absolute-form target for an http one, the
proxy URL's credentials as ``Proxy-Authorization: Basic`` either way (as httpx sends them). It
(re)connects by itself when its request finds no usable connection: none yet, a failed or
unfinished exchange, or an idle connection the server has closed (readable while idle, as
httpcore checks). One the server closes just as a request leaves on it is ``stale`` after the
failure: the request was never read, and the caller may send it again (``rules.send_again``).
Each request is sent as it came (no default headers, cookies or redirects), with the upstream's
``Host`` and ``Content-Length`` (or chunked, for a streamed body of unknown length).

Why not httpx here: the proxy forwards one request at a time per client connection to one origin,
which is all of h11 and none of httpx's client (URL model, header normalisation, pool, response
wrappers); through httpx's transport the upstream request was the largest share of the proxy's CPU
per request (docs/architecture.md, "The proxy's upstream: h11 itself"). The IdP's requests still
go through httpx (``dc_broker.idp``).

Upstream TLS is always verified, against the profile's ``ca_bundle`` (or ``--ca-bundle``) when
given, else the system's CAs; an https proxy's own certificate against the system's CAs. Requests
take the route the profile's IdP requests take (``dc_broker.idp.proxies``: its ``proxy``, else
``https_proxy`` / ``no_proxy``, loopback direct), decided once at start (``via``).

Failures are ``UpstreamError``s named like httpx's (``ConnectError: ...``, ``ReadError``,
``RemoteProtocolError``...), whose texts never quote the upstream's bytes (an answer could echo the
token); ``Unsendable`` is a request h11 will not write.

Must never: follow redirects, keep cookies, read a proxy or netrc from the environment by itself,
turn off certificate checks, or reuse a connection whose exchange did not finish cleanly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import select
import socket
import ssl
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

import h11
import trio

from dc_broker.errors import ConfigError, telling
from dc_broker.idp.proxies import DEFAULT_PORTS, basic_credentials, host_port
from dc_broker.proxy.stream import RawStream

#: the largest answer head read from the upstream (httpcore's limit)
MAX_ANSWER_HEAD: Final = 100 * 1024
#: an idle connection older than this (seconds) is not reused: servers close idle connections after
#: a few seconds (Apache, Node.js and hypercorn: 5), and one that closes just as a request leaves
#: makes that request fail where a new connection would have served it. Under their 5 s: an
#: idempotent request that meets such a close is sent again (``rules.send_again``), a POST is not
KEEPALIVE_EXPIRY: Final = 4.0
_CHUNK: Final = 64 * 1024
_IDLE_CHECK: Final = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP


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


# ---------------------------------------------------------------- failures


class UpstreamError(Exception):
    """The exchange with the upstream failed; ``timeout``: because something took too long."""

    timeout = False


class ConnectError(UpstreamError):
    """No connection (refused, no route, a name that does not resolve, TLS refused)."""


class ConnectTimeout(UpstreamError):
    timeout = True


class ProxyError(UpstreamError):
    """The HTTP proxy on the route did not open the tunnel."""


class WriteError(UpstreamError):
    """The connection broke while the request was being sent."""


class WriteTimeout(UpstreamError):
    timeout = True


class ReadError(UpstreamError):
    """The connection broke while the answer was being read."""


class RemoteProtocolError(UpstreamError):
    """The answer is not HTTP/1.1, or the connection closed before it was whole."""


class Unsendable(Exception):
    """h11 will not write this request (a header or the target that is not HTTP/1.1)."""


def _protocol_error(exc: h11.ProtocolError) -> RemoteProtocolError:
    """h11's reason without the bytes it quotes (``illegal status line: bytearray(b'...')``):
    an upstream or a proxy may echo what it was sent, the token with it."""
    text = str(exc)
    for mark in ("bytearray(", "b'", 'b"'):
        text = text.split(mark, 1)[0]
    return RemoteProtocolError(text.rstrip(" :") or "the answer is not HTTP/1.1")


# ---------------------------------------------------------------- where requests go


def _ascii(authority: str) -> bytes:
    """``host[:port]`` as a Host header or CONNECT target carries it: an internationalised name in
    its IDNA form."""
    try:
        return authority.encode("ascii")
    except UnicodeEncodeError:
        return authority.encode("idna")


@dataclass(frozen=True, slots=True)
class Route:
    """The upstream's parts as requests need them, and the HTTP proxy on the way (or none)."""

    scheme: str
    host: str
    port: int
    authority: bytes  # the Host header: host, and the port unless the scheme's default
    prefix: bytes  # the base URL's path, prepended to every request target
    connect: bytes  # host:port, the CONNECT target through a proxy
    via: str | None = None
    via_host: str = ""
    via_port: int = 0
    via_tls: bool = False
    via_auth: bytes | None = None  # the Proxy-Authorization value

    @classmethod
    def of(cls, base: str, via: str | None = None) -> Route:
        parts = urlsplit(base)
        scheme = parts.scheme.lower()
        host = parts.hostname or ""
        port = parts.port or DEFAULT_PORTS[scheme]
        connect = host_port(host, port)
        authority = connect.removesuffix(f":{port}") if port == DEFAULT_PORTS[scheme] else connect
        route = cls(scheme, host, port, _ascii(authority), parts.path.rstrip("/").encode(), _ascii(connect))
        if via is None:
            return route
        proxy = urlsplit(via)
        via_scheme = proxy.scheme.lower()
        return dataclasses.replace(
            route,
            via=via,
            via_host=proxy.hostname or "",
            via_port=proxy.port or DEFAULT_PORTS[via_scheme],
            via_tls=via_scheme == "https",
            via_auth=basic_credentials(via),
        )

    @property
    def tunnel(self) -> bool:
        """Through a CONNECT tunnel (an https upstream behind a proxy)."""
        return self.via is not None and self.scheme == "https"

    def target(self, path: bytes) -> bytes:
        """The request line's target for a client's origin-form ``path``: the absolute form when an
        HTTP proxy forwards it (no tunnel), else the upstream's own path."""
        if self.via is not None and not self.tunnel:
            return b"%s://%s%s%s" % (self.scheme.encode(), self.authority, self.prefix, path)
        return self.prefix + path


# ---------------------------------------------------------------- one connection


class Upstream:
    """One keep-alive HTTP/1.1 connection to the upstream, (re)opened by ``send`` when needed."""

    __slots__ = ("_heard", "_idle_since", "_kept", "_limits", "_raw", "_tls", "h11", "route", "stream")

    def __init__(self, route: Route, tls: ssl.SSLContext, *, connect: float, idle: float) -> None:
        self.route = route
        self._tls = tls
        self._limits = (connect, idle)
        self.stream: trio.abc.Stream | None = None
        self._raw: RawStream | None = None
        self._idle_since = 0.0  # when its last exchange ended (trio's clock)
        self._kept = False  # the current exchange went out on a connection an earlier one used
        self._heard = False  # some of the current exchange's answer has come
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_ANSWER_HEAD)

    @property
    def stale(self) -> bool:
        """After a failure: the exchange went out on a kept connection that broke before any of an
        answer came. The upstream had closed it (its keep-alive timeout) and never read the request."""
        return self._kept and not self._heard

    @property
    def idle(self) -> bool:
        """Connected, between exchanges: may carry the next request."""
        return self.stream is not None and self.h11.our_state is h11.IDLE and self.h11.their_state is h11.IDLE

    def close(self) -> None:
        """Drop the connection at once (no TLS goodbye); the next ``send`` opens another."""
        if self._raw is not None:
            self._raw.close()
        self.stream = self._raw = None

    def _usable(self) -> bool:
        """The connection may carry a request: idle for less than ``KEEPALIVE_EXPIRY``, and the
        server has neither closed it nor sent anything since (either is readable on an idle
        connection)."""
        if not self.idle or self._raw is None or trio.current_time() - self._idle_since > KEEPALIVE_EXPIRY:
            return False
        poll = select.poll()
        poll.register(self._raw.socket, _IDLE_CHECK)
        return not poll.poll(0)

    async def send(
        self, method: bytes, path: bytes, headers: Iterable[tuple[bytes, bytes]], body: bytes | AsyncIterator[bytes]
    ) -> None:
        """The request, head and body; its answer is read with ``response`` and ``piece``."""
        self._kept, self._heard = self._usable(), False
        if not self._kept:
            self.close()
            self.stream = await self._open()
            self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_ANSWER_HEAD)
        route = self.route
        sent = [(b"host", route.authority), *headers]
        if route.via_auth is not None and not route.tunnel:
            sent.append((b"proxy-authorization", route.via_auth))
        has_length = any(name.lower() == b"content-length" for name, _ in sent)
        if isinstance(body, bytes):
            if body and not has_length:
                sent.append((b"content-length", b"%d" % len(body)))
        elif not has_length:
            sent.append((b"transfer-encoding", b"chunked"))
        try:
            request = h11.Request(method=method, target=route.target(path), headers=sent)
        except h11.LocalProtocolError:
            raise Unsendable("a header or the target is not valid HTTP/1.1") from None
        # a write that fails is not the end: the upstream may have answered first and stopped reading
        # (a 413 for a body too big, then closed, as httpcore also expects); ``response`` reads that
        # answer, or says what broke
        with contextlib.suppress(WriteError):
            await self._send_message(self._encode(request), body)

    async def _send_message(self, head: bytes, body: bytes | AsyncIterator[bytes]) -> None:
        if isinstance(body, bytes):
            out = bytearray(head)
            if body:
                out += self._encode(h11.Data(data=body))
            out += self._encode(h11.EndOfMessage())
            await self._write(out)  # bounded by the caller's deadline for the answer
            return
        await self._write(head)
        idle = self._limits[1]
        async for piece in body:  # at the client's pace; each piece must leave within ``idle``
            with trio.CancelScope(deadline=trio.current_time() + idle) as writing:
                await self._write(self._encode(h11.Data(data=piece)))
            if writing.cancelled_caught:
                self.close()
                raise WriteTimeout(f"the upstream took no request body for {idle:g} s")
        await self._write(self._encode(h11.EndOfMessage()))

    def _encode(self, event: h11.Request | h11.Data | h11.EndOfMessage) -> bytes:
        try:
            return self.h11.send(event) or b""
        except h11.LocalProtocolError:
            self.close()
            raise Unsendable("a header, the target or the body's length is not valid HTTP/1.1") from None

    async def response(self) -> h11.Response:
        """The answer's head (interim 1xx answers skipped)."""
        while True:
            event = await self._event()
            if isinstance(event, h11.Response):
                return event
            if isinstance(event, h11.InformationalResponse) and event.status_code != 101:
                continue
            self.close()
            if isinstance(event, h11.InformationalResponse):
                raise RemoteProtocolError("the upstream switched protocols unasked (101)")
            raise RemoteProtocolError("the upstream closed the connection without answering")

    async def piece(self) -> bytes | None:
        """The next piece of the answer's body, None at its end."""
        while True:
            event = await self._event()
            if isinstance(event, h11.Data):
                if event.data:
                    return bytes(event.data)
                continue
            if isinstance(event, h11.EndOfMessage):
                if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
                    self.h11.start_next_cycle()  # kept for the next request
                    self._idle_since = trio.current_time()
                return None
            self.close()
            raise RemoteProtocolError("the upstream closed the connection mid-answer")

    # ------------------------------------------------------------ I/O

    async def _write(self, data: bytes | bytearray) -> None:
        assert self.stream is not None
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise WriteError(telling(exc, named=False)) from None  # still open: an answer may be there to read

    async def _event(self) -> object:
        closed = False
        while True:
            answering = self.h11.their_state is not h11.SEND_RESPONSE  # its head has begun to come
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                self.close()
                if not closed:
                    raise _protocol_error(exc) from None
                if answering:
                    raise RemoteProtocolError("the upstream closed the connection mid-answer") from None
                raise RemoteProtocolError("the upstream closed the connection without answering") from None
            if event is not h11.NEED_DATA:
                return event
            if self.stream is None:
                raise ReadError("the connection is closed")
            try:
                data = await self.stream.receive_some(_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.close()
                raise ReadError(telling(exc, named=False)) from None
            closed = not data
            self._heard = self._heard or not closed
            self.h11.receive_data(bytes(data))

    async def _open(self) -> trio.abc.Stream:
        """A connection to the upstream (through the proxy's tunnel, TLS verified), within ``connect``."""
        connect = self._limits[0]
        try:
            with trio.move_on_after(connect):
                try:
                    return await self._connect(self.route)
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise ConnectError(telling(exc, named=False)) from None
            raise ConnectTimeout(f"no connection within {connect:g} s")
        except BaseException:
            self.close()  # whatever part of it was made
            raise

    async def _connect(self, route: Route) -> trio.abc.Stream:
        host, port = (route.via_host, route.via_port) if route.via is not None else (route.host, route.port)
        tcp = await trio.open_tcp_stream(host, port)  # happy eyeballs; TCP_NODELAY set
        self._raw = RawStream(socket.socket(fileno=tcp.socket.detach()))
        stream: trio.abc.Stream = self._raw
        if route.via_tls:
            stream = await _handshake(stream, ssl.create_default_context(), route.via_host)
        if route.tunnel:
            await self._tunnel(stream, route)
        if route.scheme == "https":
            stream = await _handshake(stream, self._tls, route.host)
        return stream

    async def _tunnel(self, stream: trio.abc.Stream, route: Route) -> None:
        """``CONNECT host:port`` through the proxy; a 2xx opens the tunnel."""
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_ANSWER_HEAD)
        headers = [(b"host", route.connect)]
        if route.via_auth is not None:
            headers.append((b"proxy-authorization", route.via_auth))
        await stream.send_all(conn.send(h11.Request(method=b"CONNECT", target=route.connect, headers=headers)) or b"")
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise ProxyError(f"the proxy's answer to CONNECT: {_protocol_error(exc)}") from None
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(_CHUNK)))
                continue
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response) and 200 <= event.status_code < 300:
                if conn.trailing_data[0]:
                    raise ProxyError("the proxy sent data into the tunnel before TLS began")
                return
            if isinstance(event, h11.Response):
                reason = event.reason.decode("ascii", "replace")[:100]
                raise ProxyError(f"the proxy answered CONNECT with {event.status_code} {reason}".rstrip())
            raise ProxyError("the proxy closed the connection before answering CONNECT")


async def _handshake(stream: trio.abc.Stream, context: ssl.SSLContext, host: str) -> trio.SSLStream[trio.abc.Stream]:
    tls = trio.SSLStream(stream, context, server_hostname=host, https_compatible=True)
    await tls.do_handshake()
    return tls


# ---------------------------------------------------------------- kept connections


class Upstreams:
    """Connections to one upstream: one per client connection at a time, idle ones kept on a free
    list between client connections (so a client that connects per request still reuses an upstream
    connection, TLS handshake done). One connection per client connection rather than a shared
    pool: a client's requests come one after another, and nothing is looked up per request."""

    def __init__(
        self,
        upstream: str,
        ca_bundle: str | None,
        keep: int = 32,
        *,
        via: str | None = None,
        connect: float = 10.0,
        idle: float = 300.0,
    ) -> None:
        self._tls = tls_context(ca_bundle)
        self._tls.set_alpn_protocols(["http/1.1"])  # what it speaks, said in the handshake (as httpcore does)
        self.route = Route.of(upstream, via)
        self.via = via
        self._free: list[Upstream] = []
        self._keep = keep
        self._limits = {"connect": connect, "idle": idle}

    def take(self) -> Upstream:
        if self._free:
            return self._free.pop()
        return Upstream(self.route, self._tls, **self._limits)

    def give(self, upstream: Upstream) -> None:
        """Back on the free list if it is idle and there is room; else closed."""
        if upstream.idle and len(self._free) < self._keep:
            self._free.append(upstream)
        else:
            upstream.close()

    def close(self) -> None:
        free, self._free = self._free, []
        for upstream in free:
            upstream.close()
