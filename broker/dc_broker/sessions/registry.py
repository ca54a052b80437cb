"""The registry of sessions: one ``Session`` per profile (``dc_broker.sessions.session``), the per-request
scope children, and the nursery their refresh tasks run in.

``Sessions`` adds, changes and removes profiles at run time (``reload``), locks and unlocks them all,
and reports their status. What one login does lives in ``session``; its states in ``states``; the
grant flows in ``flows``.

**A failed session never ends the broker.** Each session's task runs under a supervisor
(``_supervise``): an unexpected exception (a bug) is logged with its traceback (once per kind of
failure and session; a repeat is one line), the profile shows ``error`` with the message, and the
task restarts after a backoff (``policy.backoff_delay``: 1 s, 2 s, ... up to 5 min). The daemon
stops only when asked.

**Lock waits for what is at the IdP.** ``lock`` takes every token out of memory at once (nothing is
served from then on), then waits (at most ``LOCK_SETTLE_LIMIT``) until refreshes already at the IdP
have stored their answers, and only then locks the store: a rotated refresh token is never lost
because the vault's key went away while its answer was on the way.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Final

import trio

from dc_broker.config import Profile
from dc_broker.idp.transport import IdpTransport
from dc_broker.observe.counters import Counts
from dc_broker.sessions import policy
from dc_broker.sessions.policy import RefreshPolicy
from dc_broker.sessions.session import Session
from dc_broker.sessions.states import State
from dc_broker.store import SecretStore
from dc_token.errors import DcBrokerError, UnknownProfile

__all__ = ["LOCK_SETTLE_LIMIT", "MAX_SCOPES_PER_PROFILE", "Sessions"]

log = logging.getLogger("dc_broker.sessions")

#: distinct per-request scopes one profile may serve at once
MAX_SCOPES_PER_PROFILE: Final = 16
#: longest `lock` waits for refreshes at the IdP to store their answers before it locks the store
#: (the transport's patience with a sent refresh, ``Timeouts.patient_total``)
LOCK_SETTLE_LIMIT: Final = 180.0


class Sessions:
    """All sessions of this broker, by profile name, and the nursery their refresh tasks run in."""

    def __init__(
        self,
        profiles: dict[str, Profile],
        store: SecretStore,
        idp: IdpTransport,
        *,
        refresh_policy: RefreshPolicy = policy.DEFAULT_POLICY,
        clock: Callable[[], float] = trio.current_time,
        rng: random.Random | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.idp = idp
        self.policy = refresh_policy
        self.clock = clock
        self.wall_clock = wall_clock
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        #: the counters every session of this broker adds to (``observe.metrics`` reads them)
        self.counts = Counts()
        self._by_name: dict[str, Session] = {name: self._session(p) for name, p in profiles.items()}
        self._scoped: dict[tuple[str, str], Session] = {}
        self._nursery: trio.Nursery | None = None

    def _session(self, profile: Profile, parent: Session | None = None) -> Session:
        return Session(
            profile,
            self.store,
            self.idp,
            refresh_policy=self.policy,
            clock=self.clock,
            rng=self.rng,
            wall_clock=self.wall_clock,
            parent=parent,
            counts=self.counts,
        )

    def __len__(self) -> int:
        return len(self._by_name)

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def lookup(self, name: str) -> Session:
        session = self._by_name.get(name)
        if session is None:
            raise UnknownProfile(f"no profile named {name!r}; `dc-broker status` lists the profiles")
        return session

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run every session's refresh task until cancelled; first refreshes are staggered."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for session in self._by_name.values():
                nursery.start_soon(self._run_one, session, policy.startup_delay(self.policy, self.rng.random()))
            task_status.started()
            await trio.sleep_forever()  # open for profiles added later, even when it starts with none

    async def _run_one(self, session: Session, delay: float) -> None:
        with session.cancel_scope:
            await self._supervise(session, delay)

    async def _supervise(self, session: Session, delay: float) -> None:
        """Run ``session``'s task; restart it after a backoff whenever it fails with a bug."""
        crashes = 0
        told: set[tuple[str, str]] = set()
        while True:
            try:
                await session.run(first_attempt_delay=delay)
            except Exception as exc:
                crashes += 1
                wait = policy.backoff_delay(self.policy, crashes, 1.0)
                name, kind = session.profile.name, (type(exc).__name__, str(exc)[:200])
                if kind in told:
                    log.error("profile %s: its task failed again (%s); restarting in %.0f s", name, kind[0], wait)
                else:
                    told.add(kind)
                    log.error("profile %s: its task failed; restarting in %.0f s", name, wait, exc_info=exc)
                session.crashed(exc, wait)
                await trio.sleep(wait)
                delay = 0.0

    def add(self, profile: Profile) -> Session:
        """Add (or replace the settings of) a profile at run time."""
        existing = self._by_name.get(profile.name)
        if existing is not None:
            existing.reconfigure(profile)
            return existing
        session = self._session(profile)
        self._by_name[profile.name] = session
        if self._nursery is not None:
            # a profile `dc-broker add` is adding has no secret yet: it waits for them (set_secrets),
            # a person's login or a caller, instead of failing (and saying so) before they arrive
            delay = 0.0 if self._has_login(session) else math.inf
            self._nursery.start_soon(self._run_one, session, delay)
        return session

    def _has_login(self, session: Session) -> bool:
        """Whether a profile has anything to log in with yet (a stored secret, tokens, a locked vault)."""
        if session.token is not None or session.state is not State.EMPTY:
            return True
        try:
            creds = self.store.credentials(session.profile.name)
        except DcBrokerError:
            return True  # locked or unreadable: the attempt says so
        return any(v is not None for v in (creds.password, creds.client_secret, creds.refresh_token))

    def lookup_scoped(self, base: Session, scope: str | None) -> Session:
        """The session for ``(base's profile, scope)``: ``base`` itself for no scope or its configured
        one, else a child session (created on first use) that narrows base's login to ``scope``."""
        name = base.profile.name
        if not scope or scope == base.profile.scope:
            return base
        child = self._scoped.pop((name, scope), None)
        if child is not None:
            self._scoped[(name, scope)] = child  # most recently used last
        else:
            mine = [key for key in self._scoped if key[0] == name]
            if len(mine) >= MAX_SCOPES_PER_PROFILE:  # full: the least recently used scope makes room
                self._retire(self._scoped.pop(mine[0]))
            child = self._session(replace(base.profile, scope=scope), parent=base)
            self._scoped[(name, scope)] = child
            if self._nursery is not None:
                self._nursery.start_soon(self._run_one, child, math.inf)  # refreshes on demand first
        return child

    def _drop_scoped(self, name: str) -> None:
        for key in [k for k in self._scoped if k[0] == name]:
            self._retire(self._scoped.pop(key))

    @staticmethod
    def _retire(session: Session) -> None:
        """A session leaves the broker: its task stops, its token leaves memory."""
        session.token = None
        session.cancel_scope.cancel()
        if session.parent is not None:
            session.parent.children.discard(session)

    def _all(self) -> list[Session]:
        return [*self._by_name.values(), *self._scoped.values()]

    def locked(self) -> None:
        """The vault was locked: no token stays in memory, none is served until unlock."""
        for session in self._all():
            session.lock_out()

    async def lock(self) -> None:
        """Lock the broker: tokens out of memory at once, then, once the refreshes at the IdP have
        stored their answers (at most ``LOCK_SETTLE_LIMIT``), the store (its key goes too)."""
        self.locked()
        with trio.move_on_after(LOCK_SETTLE_LIMIT):
            await self.settled()
        self.locked()  # again: a login that finished while we waited is not kept in memory either
        self.store.lock()

    def unlocked(self) -> None:
        """The vault was unlocked: stored tokens are served again on their schedule."""
        for session in self._all():
            session.resume()

    def remove(self, name: str) -> None:
        """Forget a profile: its refresh task stops and its token leaves memory."""
        self._drop_scoped(name)
        session = self._by_name.pop(name, None)
        if session is not None:
            self._retire(session)

    def reload(self, profiles: dict[str, Profile]) -> tuple[list[str], list[str], list[str]]:
        """Make the running set match ``profiles`` without dropping tokens of unchanged profiles, nor
        of profiles whose access rules or token files alone changed. Returns (added, changed,
        removed) names."""
        added = [n for n in profiles if n not in self._by_name]
        changed = [n for n in profiles if n in self._by_name and self._by_name[n].profile != profiles[n]]
        removed = [n for n in self._by_name if n not in profiles]
        for name in removed:
            self.remove(name)
        for name in changed:
            if not self._by_name[name].profile.same_login(profiles[name]):
                self._drop_scoped(name)  # narrowed tokens of the old login
        for name in added + changed:
            self.add(profiles[name])
        return added, changed, removed

    async def settled(self) -> None:
        """Return once no session has an attempt in flight (what the daemon waits for on stop)."""
        while True:
            busy = [s for s in self._all() if s.busy]
            if not busy:
                return
            await busy[0].settled()

    def status(self) -> list[dict[str, Any]]:
        now = self.clock()
        wall = time.time()
        return [self._by_name[n].status(now, wall) for n in sorted(self._by_name)]
