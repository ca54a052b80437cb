"""The trio Unix-socket server: accept, check the caller's identity with the kernel, frame, dispatch.

One task per connection. Each receive decodes every whole frame it holds; requests a handler answers
at once (a cached token) are replied to in one ``send_all`` per batch, requests that must wait (a
refresh) run as tasks of their own in the connection's nursery, so pipelined requests and other
connections never queue behind them. Replies share the stream under a lock, whole frames at a time.

Bad input closes only the connection it came on: a frame that is not msgpack, oversized, or cut off
is answered with one ``bad_request`` error (id None) and the connection is closed; a well-framed
request of the wrong shape gets an error reply and the connection lives on. Nothing a client sends can
stop the accept loop. Only EMFILE/ENFILE/ENOBUFS/ENOMEM on accept are waited out (trio's own rule).
Every request gets a reply: one that would not fit a frame becomes an error reply, and an error raised
by the vault or the config becomes its own wire error (``dc_broker.errors.wire_error``), not ``internal``.

Resources are bounded per uid, so one caller cannot lock the others out: at most
``max_connections_per_uid`` connections and ``max_in_flight_per_uid`` requests waiting on a refresh
per uid (system mode; root and the broker's own uid are counted against the global limits only), a
frame begun must be complete within ``partial_frame_timeout`` of its first byte, and a connection
with nothing in flight that sends nothing for ``idle_timeout`` seconds is closed (clients reconnect).

The caller is whoever the kernel says (SO_PEERCRED): in user mode only our own uid (and root) may
talk to the broker; anyone else gets ``forbidden`` (after its first request has been read, so that the
error reaches it instead of a reset) and is closed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import trio

from dc_broker.access.caller import Caller
from dc_broker.access.identity import boottime, peer_credentials
from dc_broker.errors import wire_error
from dc_broker.serve.ops import HANDLERS, BrokerState
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
    Reply,
    Request,
    encode,
    request_from_wire,
)
from dc_token.protocol import RequestShapeError as _ShapeError

log = logging.getLogger("dc_broker.server")

RECEIVE_SIZE = 65536
#: an error message longer than this is cut (it must fit a frame, whatever it quotes)
MAX_ERROR_MESSAGE = 2048
#: how long a refused connection may take to send its first request before it is told why
REFUSE_READ_TIMEOUT = 1.0
#: refusals that wait for the first request at once; beyond this a refusal is sent without waiting
MAX_PATIENT_REFUSALS = 64
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


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
    return encode(ErrorReply(rid, ErrorCode(err.code), message, err.retry_after))


def _reply_frame(rid: int, result: dict[str, Any], *, more: bool = False) -> bytes:
    """A reply, or (when it cannot be encoded or would not fit a frame) an error reply saying so."""
    try:
        return encode(Reply(rid, result, more=more))
    except LocalProtocolError as exc:
        log.error("reply to request %d not sent: %s", rid, exc)
        return _error_frame(rid, InternalError(f"the reply could not be sent ({exc}); see the broker's log"))


class PeerGone(Exception):
    """The client closed or reset the connection."""


_PEER_GONE_ERRNOS = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN})


async def recv_some(sock: socket.socket) -> bytes:
    """One non-blocking recv; parks on trio's epoll only when nothing is there yet.

    trio's SocketStream yields to the scheduler on every call, even when data is ready; for a
    request answered from memory that was most of its cost. Here the only yield is the wait.
    """
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
        # user mode: only our own uid (and root) may connect at all; system mode: the socket's mode and
        # group decide who connects, and per-profile allow rules decide what each caller gets
        self.allowed_uids: frozenset[int] | None = None if state.system else frozenset({os.getuid(), 0})
        self.connections = 0
        #: open connections and requests waiting on a refresh, per uid (for the per-uid quotas)
        self.connections_by_uid: dict[int, int] = {}
        self.in_flight_by_uid: dict[int, int] = {}
        #: requests answered by a task of their own (a refresh wait) whose reply is not yet sent
        self.pending = 0
        self._idle = trio.Event()
        self._accepting = trio.CancelScope()
        #: refusals now waiting for the caller's first request (at most MAX_PATIENT_REFUSALS)
        self.refusing = 0

    async def serve(
        self, sock: socket.socket, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept on ``sock`` (a listening AF_UNIX socket) until cancelled; after ``drain`` only the
        connections already open are served."""
        sock.setblocking(False)
        async with trio.open_nursery() as nursery:
            task_status.started()
            with self._accepting:
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
                        conn.setblocking(False)
                        nursery.start_soon(self.handle, conn)

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

    def quota_applies(self, uid: int) -> bool:
        """Per-uid quotas hold in system mode, for every uid but root and the broker's own."""
        return self.state.system and uid not in (0, os.getuid())

    async def handle(self, conn: socket.socket) -> None:
        """Serve one connection. Nothing that happens on it may reach the accept loop."""
        self.connections += 1
        uid: int | None = None
        try:
            pid, uid, gid = peer_credentials(conn)
            self.connections_by_uid[uid] = self.connections_by_uid.get(uid, 0) + 1
            await self._handle(conn, Caller(uid, gid, pid, accepted_at=boottime()))
        except* PeerGone:
            pass  # the peer went away; its in-flight replies have nobody to go to
        except* Exception as group:
            log.error("connection handler failed; connection closed", exc_info=group)
        finally:
            self.connections -= 1
            if uid is not None:
                left = self.connections_by_uid[uid] - 1
                if left:
                    self.connections_by_uid[uid] = left
                else:
                    del self.connections_by_uid[uid]
            trio.lowlevel.notify_closing(conn)
            conn.close()

    async def _refuse(self, conn: socket.socket, exc: BrokerError) -> None:
        patient = self.refusing < MAX_PATIENT_REFUSALS
        self.refusing += patient
        try:
            await refuse(conn, exc, patient=patient)
        finally:
            self.refusing -= patient

    async def _handle(self, conn: socket.socket, caller: Caller) -> None:
        limits = self.limits
        if self.allowed_uids is not None and caller.uid not in self.allowed_uids:
            log.warning("refused connection from uid %d (pid %d)", caller.uid, caller.pid)
            why = f"this broker serves only its own user (uid {os.getuid()}), not uid {caller.uid}"
            await self._refuse(conn, Forbidden(why))
            return
        if self.connections > limits.max_connections:
            await self._refuse(conn, Overloaded("too many connections", retry_after=1.0))
            return
        if self.quota_applies(caller.uid) and self.connections_by_uid[caller.uid] > limits.max_connections_per_uid:
            log.warning("uid %d is at its quota of %d connections", caller.uid, limits.max_connections_per_uid)
            await self._refuse(
                conn,
                Overloaded(
                    f"uid {caller.uid} already has {limits.max_connections_per_uid} connections open to this broker "
                    "(daemon.max_connections_per_uid); close some",
                    retry_after=1.0,
                ),
            )
            return
        await _Connection(self, conn, caller).run()


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
    decoder = FrameDecoder()
    with trio.move_on_after(REFUSE_READ_TIMEOUT), contextlib.suppress(RemoteProtocolError, OSError):
        while True:
            data = await recv_some(conn)
            if not data:
                break
            decoder.receive_data(data)
            frame = decoder.next_frame()
            if frame is not NEED_DATA:
                candidate = frame.get("id")  # type: ignore[union-attr]
                rid = candidate if type(candidate) is int and 0 <= candidate < 2**63 else None
                break
    await send_all(conn, _error_frame(rid, exc))
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)
    with trio.move_on_after(REFUSE_READ_TIMEOUT), contextlib.suppress(OSError):
        while await recv_some(conn):  # unread input at close would reset the error we just sent
            pass


class _Connection:
    __slots__ = (
        "caller",
        "conn",
        "decoder",
        "frame_started",
        "in_flight",
        "last_data",
        "send_lock",
        "sending",
        "server",
        "state",
    )

    def __init__(self, server: Server, conn: socket.socket, caller: Caller) -> None:
        self.server = server
        self.state = server.state
        self.conn = conn
        self.caller = caller
        self.decoder = FrameDecoder(server.limits.max_frame)
        self.send_lock = trio.Lock()
        self.in_flight = 0
        #: when the last bytes arrived, and when the frame now buffered (if any) began (trio time)
        self.last_data = self.frame_started = trio.current_time()
        #: a reply of the read loop is being written (a timeout then cannot resume the stream)
        self.sending = False

    async def run(self) -> None:
        """Serve the connection until the peer leaves, breaks the protocol, or a timer closes it.

        The two timers (a frame begun must finish within ``partial_frame_timeout`` of its first
        byte; a connection with nothing in flight that sends nothing for ``idle_timeout`` is closed)
        share one cancel scope whose deadline is moved only when it fires or a frame is split: a
        cancel scope per receive (trio's deadline heap on every request) cost the cached path a
        third of its time. When the scope fires, ``_expired`` decides whether that is a real timeout
        or only an old deadline."""
        limits = self.server.limits
        async with trio.open_nursery() as nursery:
            while True:
                now = trio.current_time()
                deadline = self._deadline(now)
                if deadline <= now:  # idle but with a request in flight: look again an idle period on
                    deadline = now + limits.idle_timeout
                with trio.CancelScope(deadline=deadline) as timer:
                    await self._serve(nursery, timer)
                    nursery.cancel_scope.cancel()  # the peer left or broke the protocol
                    return
                why = self._expired(trio.current_time())
                if why == "frame":
                    log.info(
                        "closed a connection that left a frame unfinished for %.0f s", limits.partial_frame_timeout
                    )
                elif why == "idle":
                    log.debug("closed a connection idle for %.0f s", limits.idle_timeout)
                elif why == "send":
                    log.info("closed a connection that has not read a reply for %.0f s", limits.idle_timeout)
                if why is not None:
                    nursery.cancel_scope.cancel()
                    return

    def _deadline(self, now: float) -> float:
        limits = self.server.limits
        idle = self.last_data + limits.idle_timeout
        return min(idle, self.frame_started + limits.partial_frame_timeout) if self.decoder.buffered else idle

    def _expired(self, now: float) -> str | None:
        """Why the timer's firing closes the connection, or None (an old deadline: serve on)."""
        limits = self.server.limits
        if self.sending:
            return "send"  # a reply half written: the stream cannot go on
        if self.decoder.buffered and now >= self.frame_started + limits.partial_frame_timeout:
            return "frame"
        if not self.decoder.buffered and not self.in_flight and now >= self.last_data + limits.idle_timeout:
            return "idle"
        return None

    async def _serve(self, nursery: trio.Nursery, timer: trio.CancelScope) -> None:
        """Read and answer until the peer leaves or breaks the protocol (returns), or the timer fires."""
        decoder = self.decoder
        dispatch = self.dispatch
        partial_timeout = self.server.limits.partial_frame_timeout
        unbroken = 0
        while True:
            data = await recv_some(self.conn)
            if not data:
                # a peer that went away mid-frame has nobody left to tell
                with contextlib.suppress(RemoteProtocolError):
                    decoder.check_eof()
                return
            self.last_data = now = trio.current_time()
            started_partial = not decoder.buffered
            decoder.receive_data(data)
            out: list[bytes] = []
            try:
                while True:
                    frame = decoder.next_frame()
                    if frame is NEED_DATA:
                        break
                    started_partial = True  # what is left (if anything) began with this data
                    reply = dispatch(frame)  # type: ignore[arg-type]
                    if isinstance(reply, bytes):
                        out.append(reply)
                    else:
                        nursery.start_soon(self._finish, *reply)
            except RemoteProtocolError as exc:
                out.append(encode(ErrorReply(None, ErrorCode.BAD_REQUEST, f"protocol error: {exc}")))
                await self._send_timed(b"".join(out))
                return
            if decoder.buffered and started_partial:  # a frame begun: its own deadline, from now
                self.frame_started = now
                timer.deadline = min(timer.deadline, now + partial_timeout)
            if out:
                await self._send_timed(out[0] if len(out) == 1 else b"".join(out))
            # a client that keeps the socket full never parks in recv_some: let others run
            unbroken += 1
            if unbroken >= 16:
                unbroken = 0
                await trio.lowlevel.checkpoint()

    async def _send_timed(self, data: bytes) -> None:
        """``_send`` under the connection's timer: a cancellation mid-write closes the connection."""
        self.sending = True
        await self._send(data)
        self.sending = False

    async def _send(self, data: bytes) -> None:
        lock = self.send_lock
        if not lock.locked():  # the common case: no stream reply is being written; skip a yield
            lock.acquire_nowait()
            try:
                await send_all(self.conn, data)
            finally:
                lock.release()
            return
        async with lock:
            await send_all(self.conn, data)

    def dispatch(
        self, frame: dict[str, Any]
    ) -> bytes | tuple[int, Awaitable[dict[str, Any]] | AsyncIterator[dict[str, Any]]]:
        try:
            req: Request = request_from_wire(frame)
        except _ShapeError as exc:
            return encode(exc.reply)
        try:
            handler = HANDLERS.get(req.op)
            if handler is None:
                known = "is not supported by this broker" if req.op in OPS else "is not a dc-broker op"
                raise UnknownOp(f"op {req.op!r} {known}; supported: {', '.join(sorted(HANDLERS))}")
            result = handler(self.state, self.caller, req)
            if isinstance(result, dict):
                return _reply_frame(req.id, result)
            server = self.server
            limits = server.limits
            uid = self.caller.uid
            if self.in_flight >= limits.max_in_flight:
                _discard(result)
                raise Overloaded(
                    f"more than {limits.max_in_flight} requests waiting on this connection", retry_after=1.0
                )
            if server.quota_applies(uid) and server.in_flight_by_uid.get(uid, 0) >= limits.max_in_flight_per_uid:
                _discard(result)
                raise Overloaded(
                    f"uid {uid} already has {limits.max_in_flight_per_uid} requests waiting on this broker "
                    "(daemon.max_in_flight_per_uid)",
                    retry_after=1.0,
                )
            self.in_flight += 1
            server.in_flight_by_uid[uid] = server.in_flight_by_uid.get(uid, 0) + 1
            if not isinstance(result, AsyncIterator):
                server.pending += 1
            return (req.id, result)
        except DcBrokerError as exc:  # ours: a BrokerError, or a vault/config error that becomes one
            return _error_frame(req.id, exc)
        except Exception:
            log.exception("op %s failed", req.op)
            return _error_frame(req.id, InternalError(f"op {req.op!r} failed inside the broker; see its log"))

    async def _finish(self, rid: int, pending: Awaitable[dict[str, Any]] | AsyncIterator[dict[str, Any]]) -> None:
        try:
            try:
                if isinstance(pending, AsyncIterator):
                    async for result in pending:  # a stream: every message but a final error has more=true
                        await self._send(_reply_frame(rid, result, more=True))
                    frame = encode(Reply(rid, {"end": True}))
                else:
                    frame = _reply_frame(rid, await pending)
            except DcBrokerError as exc:
                frame = _error_frame(rid, exc)
            except Exception:
                log.exception("request %d failed", rid)
                frame = _error_frame(rid, InternalError("the request failed inside the broker; see its log"))
            await self._send(frame)
        except PeerGone:
            pass
        finally:
            self.in_flight -= 1
            by_uid = self.server.in_flight_by_uid
            left = by_uid[self.caller.uid] - 1
            if left:
                by_uid[self.caller.uid] = left
            else:
                del by_uid[self.caller.uid]
            if not isinstance(pending, AsyncIterator):
                self.server._request_done()


def _discard(result: Awaitable[dict[str, Any]] | AsyncIterator[dict[str, Any]]) -> None:
    """A handler's coroutine that will not run: close it (no 'never awaited' warning)."""
    if not isinstance(result, AsyncIterator):
        result.close()  # type: ignore[attr-defined]
