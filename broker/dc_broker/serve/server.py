"""The trio Unix-socket server: accept, check the caller's identity with the kernel, frame, dispatch.

One code path for the decisions, two for the I/O
    Every frame goes through ``_Connection.feed`` (framing, ``dispatch``: the request's shape, the
    op's handler, the quotas, the reply) whoever reads it. What differs is who waits:

    * **Inline, while nothing has to wait.** The accept loop answers the request that is already
      there when it accepts (the common case: `dc-token` connects, sends one ``token`` request and
      waits) and *parks* the connection: one task watches every parked connection through an epoll
      of the server's own (level-triggered, each connection registered once; one more fd in trio's
      loop) and answers what a parked connection sends later, inline, one read per connection per
      wake (at most ``EVENTS_PER_WAKE`` connections or ``BYTES_PER_WAKE`` read, then trio's
      scheduler runs the other tasks). A client that keeps its connection (``TokenClient``, the
      proxy) stays parked request after request: no task, no trip through trio's scheduler and no
      epoll change per request, and many connections' requests served per wake. One that leaves
      costs one ``recv``.
    * **A task of its own**, once something has to wait: a request a handler answers with an
      awaitable (a refresh) or a stream (``watch``), a frame begun but not finished, a reply the
      socket would not take at once, an error reply to deliver before closing. Its requests that
      wait run as tasks in its nursery, so pipelined requests and other connections never queue
      behind them; replies share the socket whole frames at a time. It keeps its task until it
      closes.

    Both read with a non-blocking ``recv`` (trio's SocketStream yields to the scheduler on every
    call, even with data ready), read the clock once per batch of frames (handlers get that
    ``now``), and write a reply with one non-blocking ``send`` when the socket takes it (no
    coroutine per reply); only a send that would block goes through the connection's writer turn.

    **A request repeated on a kept connection** (``dc_broker.serve.repeat``): a connection that has
    talked before keeps what the full path decided for its last ``token`` request, and the same
    request again (byte for byte but its id, alone in its read) is answered from that while the
    session's token, its profile and the request's ``min_ttl`` still hold: the reply's bytes with
    the id and the times written in, and every request still counted and audited. Anything else,
    or anything changed, goes the full path. (A persistent client's request touched a few hundred
    bytecodes of decoding, checks and encoding; on a connection that sends the same request all day
    that was most of the broker's work per request, and most of its cache misses.)

Deadlines: one task, no cancel scope per connection
    A frame begun must be complete within ``partial_frame_timeout`` of its first byte, a connection
    with nothing in flight that sends nothing for ``idle_timeout`` seconds is closed (clients
    reconnect), and so is one that does not take a reply for ``idle_timeout`` seconds. Each of the
    three is an insertion-ordered dict (every connection by when it last sent, half-received frames
    by their first byte, blocked replies by when they blocked): one timeout per dict makes each one
    oldest first, so one reaper task sleeps until the earliest head, and every change is O(1) (a
    batch of frames moves its connection to the end), with nothing left behind when a connection
    closes. A connection found idle with something still in flight is looked at again an idle
    period later.

Bad input closes only the connection it came on: a frame that is not msgpack, oversized, or cut off
is answered with one ``bad_request`` error (id None) and the connection is closed; a well-framed
request of the wrong shape gets an error reply and the connection lives on. Nothing a client sends can
stop the accept loop. Only EMFILE/ENFILE/ENOBUFS/ENOMEM on accept are waited out (trio's own rule).
Every request gets a reply: one that would not fit a frame becomes an error reply, and an error raised
by the vault or the config becomes its own wire error (``dc_broker.errors.wire_error``), not ``internal``.

Resources are bounded per uid, so one caller cannot lock the others out: at most
``max_connections_per_uid`` connections and ``max_in_flight_per_uid`` requests waiting on a refresh
per uid (system mode; root and the broker's own uid are counted against the global limits only).

The caller is whoever the kernel says (SO_PEERCRED): in user mode only our own uid (and root) may
talk to the broker; anyone else gets ``forbidden`` (after its first request has been read, so that the
error reaches it instead of a reset) and is closed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import select
import socket
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable
from operator import attrgetter
from typing import Any

import trio

from dc_broker.access.caller import Caller
from dc_broker.access.identity import boottime, peer_credentials
from dc_broker.errors import wire_error
from dc_broker.observe.counters import ADMIN_OPS
from dc_broker.observe.events import RefusalLog
from dc_broker.serve.ops import HANDLERS, BrokerState
from dc_broker.serve.repeat import REPEATABLE_OP, Repeat
from dc_token.contract import HEADER_SIZE, MAX_ID
from dc_token.errors import (
    BrokerError,
    DcBrokerError,
    Forbidden,
    InternalError,
    LocalProtocolError,
    Overloaded,
    RemoteProtocolError,
    UnknownOp,
)
from dc_token.protocol import (
    MAX_FRAME,
    NEED_DATA,
    OPS,
    ErrorCode,
    ErrorReply,
    FrameDecoder,
    RequestShapeError,
    encode,
    msgpack_codec,
    reply_frame,
    request_parts,
)

log = logging.getLogger("dc_broker.server")

RECEIVE_SIZE = 65536
#: an error message longer than this is cut (it must fit a frame, whatever it quotes)
MAX_ERROR_MESSAGE = 2048
#: how long a refused connection may take to send its first request before it is told why
REFUSE_READ_TIMEOUT = 1.0
#: refusals that wait for the first request at once; beyond this a refusal is sent without waiting
MAX_PATIENT_REFUSALS = 64
#: parked connections served per wake of their watcher, and connections accepted between checkpoints
EVENTS_PER_WAKE = 64
#: bytes the parked connections' watcher reads per wake (past this it lets other tasks run first)
BYTES_PER_WAKE = 2 * RECEIVE_SIZE
ACCEPTS_PER_CHECKPOINT = 64
#: batches of frames a connection's task reads back to back before it lets other tasks run
BATCHES_PER_CHECKPOINT = 16
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_PEER_GONE_ERRNOS = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN})
_WATCHED = select.EPOLLIN | select.EPOLLRDHUP
_CODEC = msgpack_codec()

# what a connection needs after a batch it was served inline
_PARK, _CLOSE, _TASK = "park", "close", "task"


class Limits:
    """Per-connection limits with sane defaults; exceeding one closes (or refuses) that connection only."""

    def __init__(
        self,
        *,
        max_in_flight: int = 256,
        max_connections: int = 4096,
        max_frame: int = MAX_FRAME,
        partial_frame_timeout: float = 10.0,
        max_connections_per_uid: int = 256,
        max_in_flight_per_uid: int = 1024,
        idle_timeout: float = 300.0,
    ) -> None:
        self.max_in_flight = max_in_flight
        self.max_connections = max_connections
        self.max_frame = max_frame
        #: a frame begun but not finished within this many seconds of its first byte closes the
        #: connection (slowloris: one byte every few seconds does not extend it)
        self.partial_frame_timeout = partial_frame_timeout
        self.max_connections_per_uid = max_connections_per_uid
        self.max_in_flight_per_uid = max_in_flight_per_uid
        #: a connection with nothing in flight that sends nothing for this long is closed
        self.idle_timeout = idle_timeout


def _error_frame(rid: int | None, exc: DcBrokerError) -> bytes:
    """The error reply for ``exc``; always fits a frame (a long message is cut)."""
    err = wire_error(exc)
    message = err.message
    if len(message) > MAX_ERROR_MESSAGE:
        message = message[: MAX_ERROR_MESSAGE - 3] + "..."
    return encode(ErrorReply(rid, ErrorCode(err.code), message, err.retry_after), _CODEC)


def _reply_frame(rid: int, result: dict[str, Any], *, more: bool = False) -> bytes:
    """A reply, or (when it cannot be encoded or would not fit a frame) an error reply saying so."""
    try:
        return reply_frame(rid, result, more, _CODEC)
    except LocalProtocolError as exc:
        log.error("reply to request %d not sent: %s", rid, exc)
        return _error_frame(rid, InternalError(f"the reply could not be sent ({exc}); see the broker's log"))


class PeerGone(Exception):
    """The client closed or reset the connection."""


async def recv_some(sock: socket.socket) -> bytes:
    """One non-blocking recv; parks on trio's epoll only when nothing is there yet."""
    while True:
        try:
            return sock.recv(RECEIVE_SIZE)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
        except OSError as exc:
            if exc.errno in _PEER_GONE_ERRNOS:
                return b""
            raise


async def send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        except OSError as exc:
            if exc.errno in _PEER_GONE_ERRNOS:
                raise PeerGone from None
            raise
        view = view[sent:]


class Server:
    def __init__(self, state: BrokerState, *, limits: Limits | None = None):
        self.state = state
        self.limits = limits or Limits()
        self._own_uid = os.getuid()
        # user mode: only our own uid (and root) may connect at all; system mode: the socket's mode and
        # group decide who connects, and per-profile allow rules decide what each caller gets
        self.allowed_uids: frozenset[int] | None = None if state.system else frozenset({self._own_uid, 0})
        self.connections = 0
        #: open connections and requests waiting on a refresh, per uid the quotas apply to (system mode,
        #: not root, not our own uid). An entry stays once made: one per uid that ever connected, and
        #: uids are the host's to make, not a caller's; so counting allocates nothing.
        self.connections_by_uid: dict[int, int] = {}
        self.in_flight_by_uid: dict[int, int] = {}
        #: requests answered by a task of their own (a refresh wait) whose reply is not yet sent
        self.pending = 0
        self._idle = trio.Event()
        self._accepting = trio.CancelScope()
        #: refusals now waiting for the caller's first request (at most MAX_PATIENT_REFUSALS)
        self.refusing = 0
        self._nursery: trio.Nursery | None = None
        self._epoll: select.epoll | None = None
        #: parked connections (fd -> connection): no task, watched through ``_epoll``
        self._parked: dict[int, _Connection] = {}
        #: bytes the parked connections' watcher may still read in this wake (``_serve_parked``)
        self.wake_budget = BYTES_PER_WAKE
        #: every open connection, oldest first by ``idle_since``
        self._activity: OrderedDict[_Connection, None] = OrderedDict()
        #: connections with a frame begun, oldest first by ``frame_started``
        self._partial: OrderedDict[_Connection, None] = OrderedDict()
        #: connections whose peer does not take a reply, oldest first by ``blocked_since``
        self._blocked: OrderedDict[_Connection, None] = OrderedDict()
        self._reaper = trio.CancelScope()  # the reaper's sleep; its deadline is the earliest deadline
        #: the broker's counters; ``ok`` is incremented inline on the cached-token path
        self.counts = state.sessions.counts
        self.ok_counts = self.counts.ok
        self.refusals = RefusalLog(lambda: self.state.clock())
        state.server = self

    async def serve(
        self, sock: socket.socket, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept on ``sock`` (a listening AF_UNIX socket) until cancelled; after ``drain`` only the
        connections already open are served."""
        sock.setblocking(False)
        if self.state.clock is trio.current_time:  # the same clock, one call instead of three
            self.state.clock = trio.lowlevel.current_clock().current_time
        self._epoll = select.epoll()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._watch_parked, self._epoll)
                nursery.start_soon(self._reap)
                task_status.started()
                with self._accepting:
                    await self._accept_loop(sock)
        finally:
            for c in list(self._parked.values()):
                c.close()  # those with a task were closed by it
            self._epoll.close()

    async def _accept_loop(self, sock: socket.socket) -> None:
        accepted = 0
        while True:
            await trio.lowlevel.wait_readable(sock)
            while True:  # take every pending connection before waiting again
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in _RESOURCE_ERRNOS:
                        log.error("accept failed (%s); pausing 100 ms", os.strerror(exc.errno or 0))
                        await trio.sleep(0.1)
                        break
                    raise
                self._accepted(conn)
                accepted += 1
                if accepted % ACCEPTS_PER_CHECKPOINT == 0:  # a flood of connections lets the others run
                    await trio.lowlevel.checkpoint()

    def _accepted(self, conn: socket.socket) -> None:
        """A new connection: who it is, whether it may stay, and its first request if already there."""
        conn.setblocking(False)
        try:
            pid, uid, gid = peer_credentials(conn)
        except OSError:  # gone before we looked
            conn.close()
            return
        now = self.state.clock()
        c = _Connection(self, conn, Caller(uid, gid, pid, accepted_at=boottime()), now)
        refusal = self._admit(c)
        if refusal is not None:  # refusals have deadlines of their own (REFUSE_READ_TIMEOUT)
            assert self._nursery is not None
            self._nursery.start_soon(self._refuse, c, refusal)
            return
        self._activity[c] = None
        self._reap_by(now + self.limits.idle_timeout)
        self._serve_ready(c)

    def quota_applies(self, uid: int) -> bool:
        """Per-uid quotas hold in system mode, for every uid but root and the broker's own."""
        return self.state.system and uid != 0 and uid != self._own_uid

    def _admit(self, c: _Connection) -> BrokerError | None:
        """Count the connection; why it may not stay (refused with that error), or None."""
        limits = self.limits
        caller = c.caller
        self.connections += 1
        if self.quota_applies(caller.uid):
            c.counted = True
            by_uid = self.connections_by_uid
            by_uid[caller.uid] = by_uid.get(caller.uid, 0) + 1
        if self.allowed_uids is not None and caller.uid not in self.allowed_uids:
            exc: BrokerError = Forbidden(
                f"this broker serves only its own user (uid {self._own_uid}), not uid {caller.uid}"
            )
            self.refused(caller, "connect", None, "foreign_uid", exc)
            return exc
        if self.connections > limits.max_connections:
            exc = Overloaded("too many connections", retry_after=1.0)
            self.refused(caller, "connect", None, "quota", exc)
            return exc
        if c.counted and self.connections_by_uid[caller.uid] > limits.max_connections_per_uid:
            self.refused(caller, "connect", None, "quota", Overloaded("connection quota"))
            return Overloaded(
                f"uid {caller.uid} already has {limits.max_connections_per_uid} connections open to this broker "
                "(daemon.max_connections_per_uid); close some",
                retry_after=1.0,
            )
        return None

    def refused(self, caller: Caller, op: str, profile: str | None, reason: str, exc: BrokerError) -> None:
        """Count a refused caller and write its ``caller_refused`` event (rate-limited per uid)."""
        self.counts.refusal(reason)
        self.refusals.refused(caller, op, profile, reason, exc.code, exc.message)

    def failed_request(self, caller: Caller, op: str, args: Any, exc: DcBrokerError) -> None:
        """Count a request answered with an error; a refusal is also a refused caller."""
        err = wire_error(exc)
        self.counts.failed_request(op, err.code)
        if isinstance(err, Forbidden):
            profile = args.get("profile") if hasattr(args, "get") else None
            reason = "not_admin" if op in ADMIN_OPS else "not_allowed"
            self.refused(caller, op, profile if isinstance(profile, str) else None, reason, err)
        elif isinstance(err, Overloaded):
            self.refused(caller, op, None, "quota", err)

    async def _refuse(self, c: _Connection, exc: BrokerError) -> None:
        patient = self.refusing < MAX_PATIENT_REFUSALS
        self.refusing += patient
        try:
            await refuse(c.sock, exc, patient=patient)
        except* PeerGone:
            pass
        except* Exception as group:
            log.error("refusing a connection failed; connection closed", exc_info=group)
        finally:
            self.refusing -= patient
            c.close()

    # ------------------------------------------------------------ parked connections, served inline

    def _serve_ready(self, c: _Connection) -> None:
        """Serve what a connection without a task has sent (or see that it left), then park it, close
        it, or give it a task. Nothing that happens on it may reach the loop that called this."""
        try:
            outcome = c.serve_ready()
            if outcome is _PARK:
                self._park(c)
            elif outcome is _CLOSE:
                c.close()
            else:
                self._start(c)
        except Exception:
            log.exception("connection handler failed; connection closed")
            c.close()

    def _park(self, c: _Connection) -> None:
        """Watch ``c`` until it sends again (or leaves, or idles out): no task, one epoll entry."""
        if not c.watched:
            assert self._epoll is not None
            self._epoll.register(c.fd, _WATCHED)
            c.watched = True
            self._parked[c.fd] = c

    def _start(self, c: _Connection) -> None:
        """Give ``c`` a task of its own, for good."""
        if c.watched:
            assert self._epoll is not None
            del self._parked[c.fd]
            self._epoll.unregister(c.fd)
            c.watched = False
        assert self._nursery is not None
        c.tasked = True
        self._nursery.start_soon(c.run)

    async def _watch_parked(self, epoll: select.epoll) -> None:
        fd = epoll.fileno()
        while True:
            await trio.lowlevel.wait_readable(fd)
            self._serve_parked(epoll)

    def _serve_parked(self, epoll: select.epoll) -> int:
        """One wake of the parked connections' watcher: serve those that have sent, one read each,
        until ``EVENTS_PER_WAKE`` connections or ``BYTES_PER_WAKE`` read, whichever comes first (a
        few flooding connections must not hold the loop for all the others' turns: the epoll is
        level-triggered, so those left are reported again at the next wake, after trio has run
        everything else). Returns how many were served."""
        parked = self._parked
        self.wake_budget = BYTES_PER_WAKE
        served = 0
        for ready, _ in epoll.poll(0, EVENTS_PER_WAKE):
            c = parked.get(ready)
            if c is not None:
                self._serve_ready(c)
                served += 1
                if self.wake_budget <= 0:
                    break
        return served

    # ------------------------------------------------------------ deadlines

    def _reap_by(self, deadline: float) -> None:
        """Make sure the reaper looks again by ``deadline`` (an O(1) comparison when it already does)."""
        if deadline < self._reaper.deadline:
            self._reaper.deadline = deadline

    def _next_deadline(self) -> float:
        limits = self.limits
        when = math.inf
        if self._activity:
            when = next(iter(self._activity)).idle_since + limits.idle_timeout
        if self._partial:
            when = min(when, next(iter(self._partial)).frame_started + limits.partial_frame_timeout)
        if self._blocked:
            when = min(when, next(iter(self._blocked)).blocked_since + limits.idle_timeout)
        return when

    async def _reap(self) -> None:
        """Close what has been idle, half-sent or unread too long. Each dict is oldest first."""
        clock = self.state.clock
        while True:
            with trio.CancelScope(deadline=self._next_deadline()) as scope:
                self._reaper = scope
                await trio.sleep_forever()
            now = clock()
            limits = self.limits
            idle = self._activity
            while idle:
                c = next(iter(idle))
                if c.idle_since + limits.idle_timeout > now:
                    break
                if not (c.in_flight or c.partial or c.writing):
                    log.debug("closed a connection idle for %.0f s", limits.idle_timeout)
                    c.abort()  # closed now, or (with a task) as soon as its task runs
                if c in idle:  # busy (look again an idle period on), or its task is still to close it
                    c.idle_since = now
                    idle.move_to_end(c)
            stalled = (
                (self._partial, attrgetter("frame_started"), limits.partial_frame_timeout, "left a frame unfinished"),
                (self._blocked, attrgetter("blocked_since"), limits.idle_timeout, "has not read a reply"),
            )
            for queue, since, timeout, what in stalled:
                while queue:
                    c = next(iter(queue))
                    if since(c) + timeout > now:
                        break
                    del queue[c]
                    log.info("closed a connection that %s for %.0f s", what, timeout)
                    c.abort()

    # ------------------------------------------------------------ stopping

    async def drain(self, timeout: float) -> bool:
        """Stop accepting connections, then wait (at most ``timeout`` s) until every request that was
        waiting on a refresh has had its reply sent. Open connections are not closed here (the caller
        cancels ``serve`` for that); ``watch`` streams never end by themselves and do not count.
        True if everything in flight was answered in time."""
        self._accepting.cancel()
        with trio.move_on_after(timeout):
            while self.pending:
                self._idle = trio.Event()
                await self._idle.wait()
            return True
        return False

    def _request_done(self) -> None:
        self.pending -= 1
        if not self.pending:
            self._idle.set()


async def refuse(conn: socket.socket, exc: BrokerError, *, patient: bool = True) -> None:
    """Tell a connection why it is refused and close it, so that the client reads the error instead of
    a reset: its first request is read first (briefly), answered by id, and then our side is shut.
    Not ``patient``: the error is sent at once (a flood of refused connections is not waited on)."""
    if patient:
        await _refuse_patiently(conn, exc)
    else:
        await send_all(conn, _error_frame(None, exc))


async def _refuse_patiently(conn: socket.socket, exc: BrokerError) -> None:
    rid: int | None = None
    decoder = FrameDecoder(codec=_CODEC)
    with trio.move_on_after(REFUSE_READ_TIMEOUT), contextlib.suppress(RemoteProtocolError, OSError):
        while True:
            data = await recv_some(conn)
            if not data:
                break
            decoder.receive_data(data)
            frame = decoder.next_frame()
            if frame is not NEED_DATA:
                candidate = frame.get("id")  # type: ignore[union-attr]
                rid = candidate if type(candidate) is int and 0 <= candidate <= MAX_ID else None
                break
    await send_all(conn, _error_frame(rid, exc))
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)
    with trio.move_on_after(REFUSE_READ_TIMEOUT), contextlib.suppress(OSError):
        while await recv_some(conn):  # unread input at close would reset the error we just sent
            pass


_Pending = tuple[int, str, "Awaitable[dict[str, Any]] | AsyncIterator[dict[str, Any]]"]


class _Connection:
    __slots__ = (
        "aborted",
        "blocked_since",
        "broken",
        "caller",
        "closed",
        "counted",
        "decoder",
        "fd",
        "fed",
        "frame_started",
        "idle_since",
        "in_flight",
        "nursery",
        "partial",
        "repeat",
        "server",
        "sock",
        "state",
        "tasked",
        "todo",
        "turn",
        "unsent",
        "watched",
        "writing",
    )

    def __init__(self, server: Server, sock: socket.socket, caller: Caller, now: float) -> None:
        self.server = server
        self.state = server.state
        self.sock = sock
        self.fd = sock.fileno()
        self.caller = caller
        self.decoder = FrameDecoder(server.limits.max_frame, _CODEC)
        self.in_flight = 0
        #: when the connection last had something to do (bytes arrived, or its last request was answered)
        self.idle_since = now
        #: when the frame now half received (if ``partial``) began
        self.frame_started = now
        self.partial = False
        #: when a reply began to wait for the peer to read (while in the server's ``_blocked``)
        self.blocked_since = now
        #: the peer broke the protocol: after the error reply, the connection closes
        self.broken = False
        #: requests that wait (awaitables, streams) not yet given to the task, and bytes not yet written
        self.todo: list[_Pending] = []
        self.unsent: bytes | None = None
        self.counted = False  # in the per-uid quotas
        self.fed = False  # a batch of its requests was taken (a later one is a client that keeps talking)
        self.watched = False  # parked: in the server's epoll and ``_parked``
        self.closed = False
        self.tasked = False  # it has a task (started or about to start)
        self.aborted = False  # the reaper closes it: its task is cancelled as soon as it runs
        self.nursery: trio.Nursery | None = None  # while its task runs
        self.writing = False  # a reply is being written (by the task or a request's task)
        self.turn: trio.lowlevel.ParkingLot | None = None  # writers waiting for their turn
        #: its last token request, as the full path decided it (``dc_broker.serve.repeat``)
        self.repeat: Repeat | None = None

    # ------------------------------------------------------------ the decisions (both paths)

    def feed(self, data: bytes, now: float) -> bytes:
        """Take ``data``: every whole frame is dispatched; returns the replies ready now (b"" if
        none). Requests that wait go to ``todo``; a frame left half received starts its deadline."""
        self.idle_since = now
        server = self.server
        server._activity.move_to_end(self)
        # exactly one frame, and no frame half received before it
        whole = not self.partial and int.from_bytes(data[:HEADER_SIZE], "big") == len(data) - HEADER_SIZE
        if whole and self.repeat is not None:  # the same token request again: nothing to decide anew
            out = self.repeat.answer(data[HEADER_SIZE:], now)
            if out is not None:
                ok = server.ok_counts
                ok[REPEATABLE_OP] = ok.get(REPEATABLE_OP, 0) + 1
                return out
            self.repeat = None
        decoder = self.decoder
        frames, error = decoder.receive(data)
        # a frame left half received began in this data unless one was half received before and no
        # frame was completed now
        continuing = self.partial and not frames
        first = b""
        more: list[bytes] | None = None
        # the body of a request that came alone in this data, on a connection that talked before: what
        # a ``Repeat`` is made from (a one-request connection, the common ``dc-token`` case, would
        # pay for making one and never use it)
        body = data[HEADER_SIZE:] if whole and self.fed and len(frames) == 1 and error is None else None
        self.fed = True
        for frame in frames:
            reply = self.dispatch(frame, now, body)
            if reply.__class__ is not bytes:
                self.todo.append(reply)  # type: ignore[arg-type]
            elif not first:
                first = reply
            elif more is None:
                more = [first, reply]
            else:
                more.append(reply)
        if error is not None:
            bad = encode(ErrorReply(None, ErrorCode.BAD_REQUEST, f"protocol error: {error}"), _CODEC)
            more = [first, bad] if more is None else [*more, bad]
            self.broken = True
        if decoder.buffered and not self.broken:
            if not continuing:  # a frame begun in this data: its own deadline, from now
                self.frame_started = now
                partial = self.server._partial
                if self in partial:
                    partial.move_to_end(self)
                else:
                    partial[self] = None
                    self.server._reap_by(now + self.server.limits.partial_frame_timeout)
            self.partial = True
        elif self.partial:
            self.partial = False
            self.server._partial.pop(self, None)
        return first if more is None else b"".join(more)

    def dispatch(self, frame: dict[str, Any], now: float, body: bytes | None = None) -> bytes | _Pending:
        """One request: its reply frame now, or (rid, what to wait for) for the connection's task.
        ``body``: the frame's bytes, when a token request answered now may be repeated from them."""
        try:
            rid, op, args = request_parts(frame)
        except RequestShapeError as exc:
            return encode(exc.reply, _CODEC)
        try:
            handler = HANDLERS.get(op)
            if handler is None:
                known = "is not supported by this broker" if op in OPS else "is not a dc-broker op"
                raise UnknownOp(f"op {op!r} {known}; supported: {', '.join(sorted(HANDLERS))}")
            result = handler(self.state, self.caller, args, now)
            if result.__class__ is dict:
                ok = self.server.ok_counts  # the counters, inline: this is the cached-token path
                ok[op] = ok.get(op, 0) + 1
                if body is not None and op == REPEATABLE_OP:
                    self.repeat = Repeat.of(self.state, self.caller, body, args, result, _CODEC)
                return _reply_frame(rid, result)
            server = self.server
            limits = server.limits
            uid = self.caller.uid
            if self.in_flight >= limits.max_in_flight:
                _discard(result)  # type: ignore[arg-type]
                raise Overloaded(
                    f"more than {limits.max_in_flight} requests waiting on this connection", retry_after=1.0
                )
            if self.counted:
                by_uid = server.in_flight_by_uid
                if by_uid.get(uid, 0) >= limits.max_in_flight_per_uid:
                    _discard(result)  # type: ignore[arg-type]
                    raise Overloaded(
                        f"uid {uid} already has {limits.max_in_flight_per_uid} requests waiting on this broker "
                        "(daemon.max_in_flight_per_uid)",
                        retry_after=1.0,
                    )
                by_uid[uid] = by_uid.get(uid, 0) + 1
            self.in_flight += 1
            if not isinstance(result, AsyncIterator):
                server.pending += 1
            return (rid, op, result)  # type: ignore[return-value]
        except DcBrokerError as exc:  # ours: a BrokerError, or a vault/config error that becomes one
            self.server.failed_request(self.caller, op, args, exc)
            return _error_frame(rid, exc)
        except Exception:
            log.exception("op %s failed", op)
            self.server.counts.failed_request(op, ErrorCode.INTERNAL.value)
            return _error_frame(rid, InternalError(f"op {op!r} failed inside the broker; see its log"))

    def serve_ready(self) -> str:
        """Inline: read what is there, answer what can be answered now; what the connection needs next
        (``_PARK``, ``_CLOSE``, ``_TASK``)."""
        try:
            data = self.sock.recv(RECEIVE_SIZE)
        except BlockingIOError:
            return _PARK
        except OSError as exc:
            if exc.errno in _PEER_GONE_ERRNOS:
                return _CLOSE
            raise
        if not data:
            return _CLOSE  # the peer left; one that went away mid-frame has nobody left to tell
        self.server.wake_budget -= len(data)
        out = self.feed(data, self.state.clock())
        if out:
            try:
                self.unsent = self.try_write(out)
            except PeerGone:
                return _CLOSE
        if self.unsent is not None or self.todo or self.partial:
            return _TASK
        return _CLOSE if self.broken else _PARK

    def try_write(self, data: bytes) -> bytes | None:
        """Write ``data`` now if the socket takes it and no other reply is being written; what is
        left to write (all of it, when another writer is at work), or None."""
        if self.writing:
            return data
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            return data
        except OSError as exc:
            if exc.errno in _PEER_GONE_ERRNOS:
                raise PeerGone from None
            raise
        return None if sent == len(data) else data[sent:]

    # ------------------------------------------------------------ a task of its own

    async def run(self) -> None:
        """The connection's task, until the peer leaves, breaks the protocol, or the reaper closes it."""
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                if self.aborted:  # the reaper got to it before the task started
                    nursery.cancel_scope.cancel()
                await self._work(nursery)
                nursery.cancel_scope.cancel()  # the peer left or broke the protocol
        except* PeerGone:
            pass  # the peer went away; its in-flight replies have nobody to go to
        except* Exception as group:
            log.error("connection handler failed; connection closed", exc_info=group)
        finally:
            self.nursery = None
            self.close()

    async def _work(self, nursery: trio.Nursery) -> None:
        self._start_todo(nursery)
        if self.unsent is not None:
            unsent, self.unsent = self.unsent, None
            await self._send(unsent)
        if self.broken:
            return
        await self._read(nursery)

    async def _read(self, nursery: trio.Nursery) -> None:
        """Read, answer, repeat."""
        sock = self.sock
        recv = sock.recv
        clock = self.state.clock
        batches = 0
        while True:
            try:
                data = recv(RECEIVE_SIZE)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                batches = 0
                continue
            except OSError as exc:
                if exc.errno in _PEER_GONE_ERRNOS:
                    return
                raise
            if not data:
                return
            out = self.feed(data, clock())
            if self.todo:
                self._start_todo(nursery)
            if out:
                rest = self.try_write(out)
                if rest is not None:
                    await self._send(rest)
            if self.broken:
                return
            batches += 1
            if batches >= BATCHES_PER_CHECKPOINT:  # a client that keeps the socket full: let others run
                batches = 0
                await trio.lowlevel.checkpoint()

    def _start_todo(self, nursery: trio.Nursery) -> None:
        for rid, op, pending in self.todo:
            nursery.start_soon(self._finish, rid, op, pending)
        self.todo.clear()

    async def _send(self, data: bytes) -> None:
        """Write one or more whole frames, after any other writer; a peer that takes none of it for
        ``idle_timeout`` seconds is closed by the reaper."""
        while self.writing:
            if self.turn is None:
                self.turn = trio.lowlevel.ParkingLot()
            await self.turn.park()
        self.writing = True
        try:
            view = memoryview(data)
            while view:
                try:
                    sent = self.sock.send(view)
                except BlockingIOError:
                    blocked = self.server._blocked
                    if self not in blocked:
                        self.blocked_since = self.state.clock()
                        blocked[self] = None
                        self.server._reap_by(self.blocked_since + self.server.limits.idle_timeout)
                    await trio.lowlevel.wait_writable(self.sock)
                    continue
                except OSError as exc:
                    if exc.errno in _PEER_GONE_ERRNOS:
                        raise PeerGone from None
                    raise
                view = view[sent:]
        finally:
            self.writing = False
            self.server._blocked.pop(self, None)
            if self.turn:
                self.turn.unpark()

    async def _finish(
        self, rid: int, op: str, pending: Awaitable[dict[str, Any]] | AsyncIterator[dict[str, Any]]
    ) -> None:
        server = self.server
        try:
            try:
                if isinstance(pending, AsyncIterator):
                    async for result in pending:  # a stream: every message but a final error has more=true
                        await self._send(_reply_frame(rid, result, more=True))
                    frame = _reply_frame(rid, {"end": True})
                else:
                    frame = _reply_frame(rid, await pending)
                server.counts.answered(op)
            except DcBrokerError as exc:
                server.failed_request(self.caller, op, {}, exc)
                frame = _error_frame(rid, exc)
            except Exception:
                log.exception("request %d failed", rid)
                server.counts.failed_request(op, ErrorCode.INTERNAL.value)
                frame = _error_frame(rid, InternalError("the request failed inside the broker; see its log"))
            await self._send(frame)
        except PeerGone:
            pass
        finally:
            self.in_flight -= 1
            if self.counted:
                self.server.in_flight_by_uid[self.caller.uid] -= 1
            if not isinstance(pending, AsyncIterator):
                self.server._request_done()

    # ------------------------------------------------------------ the end

    def abort(self) -> None:
        """Close from outside (the reaper): cancel its task, which closes it (a task not yet running
        is cancelled when it starts, so that what it was given is accounted for)."""
        if not self.tasked:
            self.close()
            return
        self.aborted = True
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        server = self.server
        for _, _, pending in self.todo:  # requests a failure left unstarted: never answered, not counted
            _discard(pending)
            self.in_flight -= 1
            if self.counted:
                server.in_flight_by_uid[self.caller.uid] -= 1
            if not isinstance(pending, AsyncIterator):
                server._request_done()
        self.todo.clear()
        server.connections -= 1
        if self.counted:
            server.connections_by_uid[self.caller.uid] -= 1
        server._activity.pop(self, None)
        if self.watched:
            del server._parked[self.fd]
            self.watched = False  # closing the fd takes it out of the epoll
        if self.partial:
            server._partial.pop(self, None)
        server._blocked.pop(self, None)
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()


def _discard(result: Awaitable[dict[str, Any]] | AsyncIterator[dict[str, Any]]) -> None:
    """A handler's coroutine that will not run: close it (no 'never awaited' warning)."""
    if not isinstance(result, AsyncIterator):
        result.close()  # type: ignore[attr-defined]
