"""``Scheduler``: one task for the background work of every session, instead of one task each.

A session waiting for its next refresh costs nothing but an entry in a heap: the scheduler sleeps
until the earliest session is due (``Session.due``), starts that session's attempt as a task of its
own, and goes back to sleep. Anything that changes when a session is due (a caller that needs a
token, invalidate, new credentials, an adopted login, the end of an attempt) calls ``wake``; the
session is looked at again at once. (A task per session cost about 4 KB of trio's bookkeeping each:
10,000 profiles, 40 MB, for tasks that sleep 22 minutes at a time.)

It is also the supervisor. **A failed session never ends the broker**: an unexpected exception in an
attempt (a bug) is logged with its traceback (once per kind of failure and session; a repeat is one
line), the profile shows ``error`` (``Session.crashed``) and is tried again after a backoff
(``policy.backoff_delay``: 1 s, 2 s, ... up to 5 min).

Invariants: at most one attempt per session at a time (a session with an attempt running is not
started again; its attempt's end wakes it); a session that waits for a person (``WAITING_FOR_PERSON``)
is never started, and a caller that woke it is released at once (its round finishes); the heap holds
at most a few entries per session (a wake pushes only when the session is due earlier than its
queued entry; an entry that pops early is pushed again at the session's real time).
"""

from __future__ import annotations

import contextvars
import heapq
import itertools
import logging
import math
from collections.abc import Callable
from typing import Any, Protocol

import trio

from dc_broker.sessions import policy
from dc_broker.sessions.policy import RefreshPolicy
from dc_broker.sessions.states import WAITING_FOR_PERSON, State

log = logging.getLogger("dc_broker.sessions")

#: the session whose attempt this task runs (None outside an attempt): what a log filter reads to
#: tell whose line it is
ATTEMPTING: contextvars.ContextVar[Any] = contextvars.ContextVar("dc_broker_attempting", default=None)


class Scheduled(Protocol):
    """What the scheduler needs of a session (``dc_broker.sessions.session.Session`` is one)."""

    profile: Any
    state: State
    scheduler: Scheduler | None
    retired: bool
    attempt_scope: trio.CancelScope | None
    queued_at: float
    crashes: int

    @property
    def crash_kinds(self) -> set[tuple[str, str]]: ...

    def begin(self, first_attempt_delay: float) -> None: ...

    def due(self) -> float: ...

    async def step(self) -> None: ...

    def release_callers(self) -> None: ...

    def crashed(self, exc: BaseException, restart_in: float) -> None: ...


class Scheduler:
    def __init__(self, refresh_policy: RefreshPolicy, clock: Callable[[], float]) -> None:
        self.policy = refresh_policy
        self.clock = clock
        self._heap: list[tuple[float, int, Scheduled]] = []
        self._order = itertools.count()
        self._woken: list[Scheduled] = []
        self._wakeup: trio.Event | None = None
        self._nursery: trio.Nursery | None = None

    # ------------------------------------------------------------ what sessions and the registry call

    def add(self, session: Scheduled, first_attempt_delay: float = 0.0) -> None:
        """Take ``session`` on: its first attempt as its own schedule says, staggered by the delay."""
        session.begin(first_attempt_delay)
        session.scheduler = self
        self.wake(session)

    def remove(self, session: Scheduled) -> None:
        """``session`` leaves: no attempt starts for it again; one in flight is cancelled."""
        session.scheduler = None
        session.retired = True
        if session.attempt_scope is not None:
            session.attempt_scope.cancel()

    def wake(self, session: Scheduled) -> None:
        """When ``session`` is due may have changed: look at it again (O(1); the scheduler task works)."""
        self._woken.append(session)
        if self._wakeup is not None:
            self._wakeup.set()

    # ------------------------------------------------------------ the task

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                self._look_again()
                self._start_due()
                self._wakeup = trio.Event()
                if self._woken:
                    continue  # woken while starting attempts
                with trio.move_on_at(self._heap[0][0] if self._heap else math.inf):
                    await self._wakeup.wait()

    def _look_again(self) -> None:
        woken, self._woken = self._woken, []
        for session in woken:
            if session.retired:
                continue
            if session.state in WAITING_FOR_PERSON:
                session.release_callers()  # nothing happens until a person acts: do not keep them waiting
                continue
            if session.attempt_scope is not None:
                continue  # its attempt's end wakes it
            due = session.due()
            if due < session.queued_at:
                session.queued_at = due
                heapq.heappush(self._heap, (due, next(self._order), session))

    def _start_due(self) -> None:
        now = self.clock()
        while self._heap and self._heap[0][0] <= now:
            _, _, session = heapq.heappop(self._heap)
            session.queued_at = math.inf
            if session.retired or session.attempt_scope is not None:
                continue
            if session.state in WAITING_FOR_PERSON:
                session.release_callers()
                continue
            due = session.due()
            if due > now:  # it moved later since it was queued
                session.queued_at = due
                heapq.heappush(self._heap, (due, next(self._order), session))
                continue
            assert self._nursery is not None
            session.attempt_scope = trio.CancelScope()
            self._nursery.start_soon(self._attempt, session)

    async def _attempt(self, session: Scheduled) -> None:
        scope = session.attempt_scope
        assert scope is not None
        ATTEMPTING.set(session)  # this task's context only
        with scope:
            try:
                await session.step()
            except Exception as exc:
                self._crashed(session, exc)
        session.attempt_scope = None
        self.wake(session)

    def _crashed(self, session: Scheduled, exc: Exception) -> None:
        crashes = session.crashes + 1
        wait = policy.backoff_delay(self.policy, crashes, 1.0)
        name, kind = session.profile.name, (type(exc).__name__, str(exc)[:200])
        if kind in session.crash_kinds:
            log.error("profile %s: its refresh failed again (%s); trying again in %.0f s", name, kind[0], wait)
        else:
            session.crash_kinds.add(kind)
            log.error("profile %s: its refresh failed; trying again in %.0f s", name, wait, exc_info=exc)
        session.crashed(exc, wait)
