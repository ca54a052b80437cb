"""The proxy's I/O: listen, accept, check the caller, speak HTTP/1.1 (h11) and stream both ways.

    accept ──► peer check (kernel) ──► owner? ──► slot ──► holder check ──► h11 requests ──► upstream
                        │                 │ no                                   │
                        └─ in doubt ──────┴──► 403 at once (a few per uid), else closed unanswered

Per connection, before a byte of it is read (``Proxy._arrived``, in the accept loop): the kernel
names the caller (``dc_broker.access.peer``: ``SO_PEERCRED``, or the exact TCP socket by
``sock_diag``). The proxy's own uid gets one of ``Limits.connections`` slots (no other uid can take
them) and, on TCP, the holder check in a thread; another uid, or a caller the kernel cannot name,
is told 403 without its request being read, at most ``Limits.refusals_per_uid`` at a time per uid,
and beyond that closed unanswered. So no one else can fill the owner's slots, and a client that
connects, sends and closes at once is refused (its socket is no longer ESTABLISHED, or has no inode).

Per request (``Proxy._exchange``): the rules of ``dc_broker.proxy.rules`` (Origin, Host, target),
then the token, asked of the broker for this request (``dc_broker.proxy.broker``), then upstream.
Every failure ends that request only, with an answer when one can still be given:

    a malformed request (h11)            its ``error_status_hint`` (400, 431), connection closed
    a head that does not come in time    408
    the broker cannot give a token       503 with its message, and no request goes upstream
    upstream unreachable, broken answer  502; no answer head in time: 504
    upstream breaks or idles mid-body    the client's connection is cut (the body is truncated:
                                         its framing tells the client), the listener lives on
    anything unforeseen                  logged with its traceback, 500 if nothing was sent yet

The accept loop is trio's ``serve_listeners`` (a nursery, one loop per listener, only
resource-exhaustion errors retried), with the peer check in it, over non-blocking stdlib listening
sockets: each wake-up takes every waiting connection (up to ``_ACCEPT_BATCH``), so a refused
connection costs a few syscalls and no task (3,000 of another user's: about 0.1 ms of CPU each).

Must never: read a request before its caller is known; let one connection's failure end another's
or the listener; keep a token beyond its request; log a token.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import socket
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from functools import partial
from typing import Any, Final, Protocol

import h11
import trio

from dc_broker.access.peer import Known, SockDiag, Unknown, holder, peer
from dc_broker.errors import ConfigError, telling
from dc_broker.idp import proxies
from dc_broker.proxy.broker import BrokerTokens
from dc_broker.proxy.rules import (
    MAX_HEAD,
    MIN_TTL,
    REPLAY_LIMIT,
    RETRY_MIN_TTL,
    Limits,
    Listen,
    Refused,
    Rules,
    admit,
    broker_refused,
    busy,
    foreign,
    not_sent_again,
    plain,
    raw_answer,
    response_headers,
    retry_after_401,
    send_again,
    unknown_caller,
    upstream_failed,
    upstream_headers,
    upstream_url,
)
from dc_broker.proxy.stream import RawStream
from dc_broker.proxy.upstream import Unsendable, Upstream, UpstreamError, Upstreams, check_upstream
from dc_token.errors import BrokerUnavailable, DcBrokerError, Forbidden, UnknownProfile, hint_for
from dc_token.paths import default_socket_path

log = logging.getLogger("dc_broker.proxy")

CHUNK: Final = 64 * 1024
#: accept(2) errors that mean the system is out of something: wait and accept again (as trio does)
ACCEPT_CAPACITY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
DEFAULT_LIMITS: Final = Limits()
#: connections accepted per wake-up of an accept loop before other tasks run
_ACCEPT_BATCH: Final = 64
#: accept(2) errors about one connection that went away before it was taken (as trio's SocketListener)
_ACCEPT_IGNORED: Final = frozenset(
    {errno.EPERM, errno.ECONNABORTED, errno.EPROTO, errno.ECONNRESET, errno.ETIMEDOUT, errno.EHOSTUNREACH}
)
#: a refused caller's log line is written at most this often (seconds), with a count of the others
_LOG_EVERY: Final = 10.0
#: how many pids that held an owner's earlier connection are tried first by the holder check
_HINTS: Final = 8


class TokenSource(Protocol):
    """Where each request's token comes from (``BrokerTokens``; a fixed one in tests)."""

    async def token(self, min_ttl: float) -> str: ...

    async def invalidate(self, token: str) -> None: ...


class _ClientFault(Exception):
    """The caller broke its request off (went away, sent garbage, stalled); ``refused``: what it is
    told, None when it cannot be told anything."""

    def __init__(self, refused: Refused | None) -> None:
        super().__init__(refused.message if refused else "the client went away")
        self.refused = refused


class _Cut(Exception):
    """The answer cannot be finished (upstream broke or idled mid-body, the client stopped reading):
    the connection is cut, so the client sees a truncated body, never a complete-looking one."""


class _Http:
    """h11 over one accepted connection."""

    def __init__(self, stream: RawStream, limits: Limits) -> None:
        self.stream = stream
        self.limits = limits
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self._out = bytearray()

    async def next_event(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            if self.h11.they_are_waiting_for_100_continue:
                await self.send(h11.InformationalResponse(status_code=100, headers=[]))
            try:
                data = await self.stream.receive_some(CHUNK)
            except (trio.BrokenResourceError, ConnectionError):
                data = b""
            self.h11.receive_data(bytes(data))

    async def send(self, event: Any, *, flush: bool = True) -> None:
        """Queue an event's bytes; they leave with the next ``flush`` (a response head waits for the
        first piece of its body: a small answer goes out in one write, one segment)."""
        try:
            data = self.h11.send(event)
        except h11.LocalProtocolError:
            self.h11.send_failed()
            raise _Cut from None
        if data:
            self._out += data
        if flush and self._out:
            out, self._out = self._out, bytearray()
            try:
                await self.stream.send_all(out)
            except BaseException:
                self.h11.send_failed()
                raise

    async def body_piece(self) -> bytes | None:
        """The next piece of the request body, None at its end. The client's faults become
        ``_ClientFault``: it went away, sent garbage (its status hint), or sent nothing for ``idle``."""
        try:
            event = self.h11.next_event()  # already here (a body that came with its head): no deadline to set
            if event is h11.NEED_DATA:
                with trio.CancelScope(deadline=trio.current_time() + self.limits.idle) as waiting:
                    event = await self.next_event()
                if waiting.cancelled_caught:
                    stalled = f"dc-broker proxy: the request body stalled for {self.limits.idle:g} s"
                    raise _ClientFault(Refused(408, stalled))
        except h11.RemoteProtocolError as exc:
            raise _ClientFault(Refused(exc.error_status_hint, f"dc-broker proxy: bad request body: {exc}")) from None
        if isinstance(event, h11.Data):
            return bytes(event.data)
        if isinstance(event, h11.EndOfMessage):
            return None
        raise _ClientFault(None)  # ConnectionClosed mid-body

    @property
    def can_answer(self) -> bool:
        return self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE)

    async def answer(self, refused: Refused) -> None:
        """The proxy's own answer. The connection is closed after it unless the request was read
        whole and the answer is not a server error."""
        if not self.can_answer:
            return
        close = self.h11.their_state is not h11.DONE or refused.status >= 500
        headers, body = plain(refused.message, close=close)
        await self.send(h11.Response(status_code=refused.status, headers=headers), flush=False)
        await self.send(h11.Data(data=body), flush=False)
        await self.send(h11.EndOfMessage())


async def linger(stream: RawStream, seconds: float) -> None:
    """Stop sending, and read (and drop) what the client still sends for up to ``seconds``, so a
    client still writing its request reads our answer instead of a reset; then close."""
    try:
        with trio.move_on_after(seconds):
            await stream.send_eof()
            read = 0
            while read < 16 * CHUNK and (data := await stream.receive_some(CHUNK)):
                read += len(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


class Proxy:
    """One upstream, one profile, one user: the accept loops, the peer check, the requests."""

    def __init__(
        self,
        profile: str,
        upstream: str,
        *,
        tokens: TokenSource,
        http: Upstreams,
        rules: Rules,
        limits: Limits = DEFAULT_LIMITS,
        diag: SockDiag | None = None,
        broker_note: str = "",
    ) -> None:
        self.profile = profile
        self.upstream = upstream.rstrip("/")
        self.tokens = tokens
        self.http = http
        self.rules = rules
        self.limits = limits
        self.diag = diag
        self._owner_open = 0
        self._refusing: Counter[int | str | None] = Counter()
        self._logged: dict[int | str | None, tuple[float, int]] = {}
        self._holders: list[int] = []
        self._scans = trio.CapacityLimiter(4)
        self.broker_note = broker_note  # after a broker's hint: which broker, when not the default one

    # ------------------------------------------------------------ accepting: trio's serve_listeners

    async def serve(
        self, listeners: list[socket.socket], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept on every listener (listening stdlib sockets, closed at the end) until cancelled."""
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                listener.setblocking(False)
                nursery.start_soon(self._accept, listener, nursery)
            task_status.started()

    async def _accept(self, listener: socket.socket, nursery: trio.Nursery) -> None:
        """trio's ``_serve_one_listener``, taking every waiting connection per wake-up (at most
        ``_ACCEPT_BATCH`` before others run): another user's flood of connections is turned away at
        a few syscalls each, without a task or a trip through the scheduler per connection."""
        try:
            while True:
                await trio.lowlevel.wait_readable(listener)
                for _ in range(_ACCEPT_BATCH):
                    try:
                        sock, _ = listener.accept()
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        if exc.errno in _ACCEPT_IGNORED:
                            continue
                        if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                            raise
                        log.error("accept: %s; accepting again in 0.1 s", os.strerror(exc.errno or 0))
                        await trio.sleep(0.1)
                        break
                    self._arrived(sock, nursery)
        finally:
            listener.close()

    def _arrived(self, sock: socket.socket, nursery: trio.Nursery) -> None:
        """Who connected, from the kernel, before anything else is done for the connection."""
        caller = peer(sock, self.diag)
        if isinstance(caller, Known) and caller.uid == self.rules.uid:
            if self._owner_open < self.limits.connections:
                self._owner_open += 1
                nursery.start_soon(self._owner, RawStream(sock), caller)
                return
            self._refuse(sock, "busy", busy(self.limits), nursery)
            return
        if isinstance(caller, Known):
            self._refuse(sock, caller.uid, foreign(caller.uid, self.rules), nursery)
        else:
            self._refuse(sock, None, unknown_caller(caller.why), nursery)

    def _refuse(self, sock: socket.socket, key: int | str | None, refused: Refused, nursery: trio.Nursery) -> None:
        self._log_refusal(key, refused)
        if self._refusing[key] >= self.limits.refusals_per_uid:
            sock.close()  # enough of this caller's refusals are being told already
            return
        self._refusing[key] += 1
        nursery.start_soon(self._tell, RawStream(sock), key, refused)

    def _log_refusal(self, key: int | str | None, refused: Refused) -> None:
        """One line per caller (uid, or the unnamed) per ``_LOG_EVERY`` seconds, counting the rest:
        another user's flood of connections must not become a flood of log lines."""
        now = trio.current_time()
        last, quiet = self._logged.get(key, (-math.inf, 0))
        if now - last < _LOG_EVERY:
            self._logged[key] = (last, quiet + 1)
            return
        self._logged[key] = (now, 0)
        more = f" ({quiet} more since the last such line)" if quiet else ""
        log.warning("refused a connection: %s%s", refused.message.removeprefix("dc-broker proxy: "), more)

    async def _tell(self, stream: RawStream, key: int | str | None, refused: Refused) -> None:
        """Answer a refused connection without reading its request, then close it."""
        try:
            with trio.move_on_after(self.limits.linger):
                await stream.send_all(raw_answer(refused))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            try:
                await linger(stream, self.limits.linger)
            finally:
                self._refusing[key] -= 1
                if not self._refusing[key]:
                    del self._refusing[key]

    async def _owner(self, stream: RawStream, caller: Known) -> None:
        """A connection of the proxy's own uid: on TCP, a process of that uid must hold it."""
        try:
            if caller.inode is not None:
                hints = tuple(self._holders)
                pid = await trio.to_thread.run_sync(
                    partial(holder, caller.inode, caller.uid, first=hints), limiter=self._scans
                )
                if pid is None:
                    refused = unknown_caller(f"no process of uid {caller.uid} holds the connection")
                    self._log_refusal(None, refused)
                    with trio.move_on_after(self.limits.linger):
                        await stream.send_all(raw_answer(refused))
                    return
                if pid not in hints[:1]:
                    self._holders = [pid, *(p for p in self._holders if p != pid)][:_HINTS]
            await self._connection(stream)
        except Exception:  # a bug must cost this connection only; it is logged whole
            log.exception("dc-broker proxy: a connection failed")
        finally:
            self._owner_open -= 1
            with trio.CancelScope(shield=True):
                await linger(stream, self.limits.linger)

    # ------------------------------------------------------------ one connection, its requests

    async def _connection(self, stream: RawStream) -> None:
        http = _Http(stream, self.limits)
        upstream = self.http.take()  # this connection's own: its requests come one after another
        try:
            first = True
            while True:
                wait = self.limits.request_head if first else self.limits.keep_alive
                try:
                    with trio.CancelScope(deadline=trio.current_time() + wait) as waiting:
                        event = await http.next_event()
                except h11.RemoteProtocolError as exc:
                    await http.answer(Refused(exc.error_status_hint, f"dc-broker proxy: bad request: {exc}"))
                    return
                if waiting.cancelled_caught:
                    if http.h11.trailing_data[0]:  # a head begun and not finished
                        await http.answer(Refused(408, "dc-broker proxy: the request head did not arrive in time"))
                    return
                first = False
                if not isinstance(event, h11.Request):
                    return  # ConnectionClosed
                await self._exchange(http, event, upstream)
                if http.h11.our_state is not h11.DONE or http.h11.their_state is not h11.DONE:
                    return
                http.h11.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, _Cut, _ClientFault):
            return  # the client went away, or its answer could not be finished: this connection only
        finally:
            self.http.give(upstream)  # kept only if its last exchange finished cleanly

    async def _exchange(self, http: _Http, request: h11.Request, upstream: Upstream) -> None:
        """One request, answered one way or another. The upstream connection keeps track of itself:
        one whose exchange did not finish is replaced by the next request."""
        method = request.method.decode("ascii")
        try:
            refused = admit(self.rules, request.headers)
            if refused is not None:
                shown = refused.message.removeprefix("dc-broker proxy: ")
                log.warning("refused %s %s: %s", method, request.target.decode("latin-1")[:200], shown)
                raise refused
            url = upstream_url(self.upstream, request.target)
            token = await self._token(MIN_TTL)
            body, replayable = await self._request_body(http)
            head = await self._send(upstream, request, body, token)
            if head.status_code == 401 and replayable:
                fresh = await self._fresh(token)
                if retry_after_401(head.status_code, replayable, token, fresh):
                    upstream.close()  # the refused answer's body is not read: a new connection
                    log.info("%s %s: upstream said 401; token invalidated, sending once more", method, url)
                    head = await self._send(upstream, request, body, fresh)
        except Refused as refused:
            await http.answer(refused)
            return
        except _ClientFault as fault:
            if fault.refused is not None:
                await http.answer(fault.refused)
            raise
        except (trio.BrokenResourceError, trio.ClosedResourceError, _Cut):
            raise  # the client went away (while told 100 Continue): nothing to answer
        except Exception as exc:  # unforeseen: this request only
            log.exception("%s %s failed", method, request.target.decode("latin-1")[:200])
            await http.answer(Refused(500, f"dc-broker proxy: internal error ({type(exc).__name__}); see its log"))
            return
        await self._relay(http, upstream, head, method, url)

    async def _token(self, min_ttl: float) -> str:
        try:
            return await self.tokens.token(min_ttl)
        except DcBrokerError as exc:
            raise broker_refused(str(exc), self._hint(exc)) from None

    async def _fresh(self, refused_token: str) -> str:
        """After a 401: tell the broker, and take what it gives now."""
        try:
            await self.tokens.invalidate(refused_token)
        except DcBrokerError as exc:
            raise broker_refused(str(exc), self._hint(exc)) from None
        return await self._token(RETRY_MIN_TTL)

    def _hint(self, exc: DcBrokerError) -> str:
        hint = hint_for(exc, self.profile)
        return hint + self.broker_note if hint else ""

    async def _request_body(self, http: _Http) -> tuple[bytes | AsyncIterator[bytes], bool]:
        """The body to send: whole bytes when it fits ``REPLAY_LIMIT`` (replayable), else a stream of
        what was read so far and the rest (sent once)."""
        kept: list[bytes] = []
        size = 0
        while (piece := await http.body_piece()) is not None:
            kept.append(piece)
            size += len(piece)
            if size > REPLAY_LIMIT:

                async def rest() -> AsyncIterator[bytes]:
                    for early in kept:
                        yield early
                    kept.clear()
                    while (later := await http.body_piece()) is not None:
                        yield later

                return rest(), False
        return b"".join(kept), True

    async def _send(
        self, upstream: Upstream, request: h11.Request, body: bytes | AsyncIterator[bytes], token: str
    ) -> h11.Response:
        """The request upstream, and the head of its answer; sent again on a new connection if the
        kept one it went out on had been closed by the upstream and it may be (``send_again``)."""
        try:
            return await self._attempt(upstream, request, body, token)
        except UpstreamError as exc:
            failed = exc
        replayable = isinstance(body, bytes)
        if send_again(request.method, replayable, upstream.stale):
            log.info("%s: the upstream closed a kept connection as the request left; sending it again", self.upstream)
            try:
                return await self._attempt(upstream, request, body, token)
            except UpstreamError as exc:
                failed = exc
        why = telling(failed)
        if upstream.stale:
            why += "; " + not_sent_again(request.method, replayable)
        raise self._failed(why, timeout=failed.timeout) from None

    async def _attempt(
        self, upstream: Upstream, request: h11.Request, body: bytes | AsyncIterator[bytes], token: str
    ) -> h11.Response:
        """One sending of the request, and the head of its answer. The head must come within
        ``response_head`` of the request body's end (a streamed body moves at the client's pace)."""
        headers = upstream_headers(request.headers.raw_items(), token)
        head_within = self.limits.response_head
        # a whole body: its sending counts in the answer's time; a streamed one: none until it ends
        waiting = trio.CancelScope(deadline=trio.current_time() + head_within if isinstance(body, bytes) else math.inf)
        try:
            with waiting:
                await upstream.send(request.method, request.target, headers, body)
                waiting.deadline = trio.current_time() + head_within
                return await upstream.response()
            upstream.close()
            raise self._failed(f"no answer within {head_within:g} s", timeout=True)
        except Unsendable as exc:
            raise Refused(400, f"dc-broker proxy: the request cannot be sent upstream: {exc}") from None

    def _failed(self, why: str, *, timeout: bool = False) -> Refused:
        via = self.http.via
        return upstream_failed(
            self.upstream, None if via is None else proxies.shown(via), proxies.scrub(why, via), timeout=timeout
        )

    async def _relay(self, http: _Http, upstream: Upstream, head: h11.Response, method: str, url: str) -> None:
        """The answer, streamed back: each piece as it comes (an event stream is not held back), at
        the client's pace, until nothing has moved for ``idle`` (reading from the upstream, or
        writing to the client)."""
        idle = self.limits.idle
        headers = response_headers(head.headers.raw_items())
        await http.send(h11.Response(status_code=head.status_code, headers=headers, reason=head.reason), flush=False)
        reading = True
        moved = trio.current_time()
        with trio.CancelScope(deadline=moved + idle) as moving:
            while True:
                reading = True
                try:
                    piece = await upstream.piece()
                except UpstreamError as exc:
                    log.warning("%s %s: the upstream's answer broke off: %s", method, url, telling(exc))
                    raise _Cut from None
                if piece is None:
                    break
                moved = _moved(moving, moved, idle)
                reading = False
                await http.send(h11.Data(data=piece))
                moved = _moved(moving, moved, idle)
        if moving.cancelled_caught:
            upstream.close()
            if reading:
                log.warning("%s %s: the upstream's answer stalled for %g s; cut", method, url, idle)
            else:
                log.warning("%s %s: the client read nothing for %g s; cut", method, url, idle)
            raise _Cut
        await http.send(h11.EndOfMessage())


def _moved(scope: trio.CancelScope, moved: float, idle: float) -> float:
    """Something moved now: ``scope``'s idle deadline counts from now. Moved on only once a second
    has passed since it last was (moving a cancel scope's deadline is not free, and a small answer
    takes microseconds); when it last moved."""
    now = trio.current_time()
    if now - moved < 1.0:
        return moved
    scope.deadline = now + idle
    return now


# ---------------------------------------------------------------- running it


async def _check_broker(tokens: BrokerTokens, profile: str, socket_note: str) -> None:
    """The broker answers, and knows the profile: else one line saying what to do."""
    try:
        await tokens.request("hello")
    except BrokerUnavailable as exc:
        raise BrokerUnavailable(f"{exc}; start it first (`dc-broker run`), then the proxy") from None
    try:
        await tokens.request("status", profile=profile)
    except UnknownProfile:
        raise UnknownProfile(
            f"the broker on {tokens.socket_path} has no profile named {profile!r}; "
            f"`dc-broker status{socket_note}` lists its profiles, `dc-broker add` adds one"
        ) from None
    except Forbidden as exc:
        raise Forbidden(f"{exc} (the broker on {tokens.socket_path})") from None


def _diag_works(family: int, host: str) -> SockDiag:
    """A ``SockDiag`` that has named this process as the owner of a test connection: else the proxy
    could never tell a TCP caller, and says so at start."""
    try:
        diag = SockDiag()
    except OSError as exc:
        raise ConfigError(
            f"the kernel's sock_diag interface cannot be opened ({exc.strerror}), so the proxy cannot tell who "
            "calls over TCP; use --listen unix:PATH"
        ) from None
    with socket.socket(family) as listener:
        listener.bind((host, 0))
        listener.listen(1)
        with socket.create_connection(listener.getsockname()[:2]):
            accepted, _ = listener.accept()
            with accepted:
                answer = peer(accepted, diag)  # while ``client`` is still open
    if not isinstance(answer, Known) or answer.uid != os.geteuid():
        diag.close()
        why = answer.why if isinstance(answer, Unknown) else f"it named uid {answer.uid}"
        raise ConfigError(
            f"the kernel's sock_diag interface did not name this process's own TCP connection ({why}), so the "
            "proxy cannot tell who calls over TCP; use --listen unix:PATH"
        )
    return diag


def _open_tcp(listen: Listen, family: int) -> socket.socket:
    try:
        return socket.create_server((listen.host, listen.port), family=family, backlog=4096)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(listen.in_use()) from None
        raise ConfigError(f"cannot listen on {listen.describe()}: {exc.strerror}") from None


async def run_proxy(
    profile: str,
    upstream: str,
    listen: Listen,
    *,
    socket_path: str | None = None,
    ca_bundle: str | None = None,
    via: str | None = None,
    allowed_origins: Iterable[str] = (),
    limits: Limits = DEFAULT_LIMITS,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled. ``task_status.started(address)`` once listening (``host:port`` with the
    real port, or ``unix:PATH``). ``via``: the HTTP proxy to the upstream (``proxies.route``)."""
    from dc_broker.serve.listen import bind_unix_socket, release

    upstream = check_upstream(upstream)
    where_broker = socket_path or default_socket_path()
    socket_note = "" if where_broker == default_socket_path() else f" --socket {where_broker}"
    tokens = BrokerTokens(where_broker, profile)
    diag = None
    lock = raw = None
    try:
        await _check_broker(tokens, profile, socket_note)
        http = Upstreams(upstream, ca_bundle, via=via, connect=limits.connect, idle=limits.idle)
        if listen.path is not None:
            raw, lock = bind_unix_socket(listen.path, mode=0o600, strict_dir=False)
            listeners = [raw]
            hosts: frozenset[str] = frozenset()
            where = listen.describe()
        else:
            family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
            diag = _diag_works(family, listen.host)
            listeners = [_open_tcp(listen, family)]
            port = listeners[0].getsockname()[1]
            hosts = listen.hosts(port)
            where = listen.describe(port)
        rules = Rules(os.geteuid(), hosts=hosts, allowed_origins=frozenset(o.rstrip("/") for o in allowed_origins))
        note = f" (broker{socket_note})" if socket_note else ""
        proxy = Proxy(
            profile, upstream, tokens=tokens, http=http, rules=rules, limits=limits, diag=diag, broker_note=note
        )
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(proxy.serve, listeners)
                log.info("dc-broker proxy for profile %s: http on %s -> %s", profile, where, upstream)
                task_status.started(where)
        finally:
            http.close()
    finally:
        tokens.close()
        if diag is not None:
            diag.close()
        if lock is not None and raw is not None and listen.path is not None:
            release(listen.path, raw, lock)
