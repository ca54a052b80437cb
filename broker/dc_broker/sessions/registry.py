"""The registry of sessions: one ``Session`` per profile (``dc_broker.sessions.session``), the per-request
scope children, and the nursery their refresh tasks run in.

``Sessions`` adds, changes and removes profiles at run time (``reload``), locks and unlocks them all,
and reports their status. What one login does lives in ``session``; its states in ``states``; the
grant flows in ``flows``; when each one's next attempt starts, and what happens when one fails with a
bug (it never ends the broker), in ``scheduler``: one task for them all.

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
from dc_broker.sessions import policy
from dc_broker.sessions.policy import RefreshPolicy
from dc_broker.sessions.scheduler import Scheduler
from dc_broker.sessions.session import UNREAD, Session
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
        self._by_name: dict[str, Session] = {name: self._session(p) for name, p in profiles.items()}
        self._scoped: dict[tuple[str, str], Session] = {}
        self._scheduler = Scheduler(refresh_policy, clock)
        #: the scheduler runs: sessions added from now on are its at once
        self._running = False

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
        """Run every session's refreshes until cancelled; first refreshes are staggered."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self._scheduler.run)
            self._running = True
            for session in self._by_name.values():
                self._scheduler.add(session, policy.startup_delay(self.policy, self.rng.random()))
            task_status.started()

    def add(self, profile: Profile) -> Session:
        """Add (or replace the settings of) a profile at run time."""
        existing = self._by_name.get(profile.name)
        if existing is not None:
            existing.reconfigure(profile)
            return existing
        session = self._session(profile)
        self._by_name[profile.name] = session
        if self._running:
            # a profile `dc-broker add` is adding has no secret yet: it waits for them (set_secrets),
            # a person's login or a caller, instead of failing (and saying so) before they arrive
            self._scheduler.add(session, 0.0 if self._has_login(session) else math.inf)
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
            if self._running:
                self._scheduler.add(child, math.inf)  # refreshes on demand first
        return child

    def _drop_scoped(self, name: str) -> None:
        for key in [k for k in self._scoped if k[0] == name]:
            self._retire(self._scoped.pop(key))

    def _retire(self, session: Session) -> None:
        """A session leaves the broker: no attempt starts for it again (one in flight stops), its token
        leaves memory."""
        session.token = None
        self._scheduler.remove(session)
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
        """The vault was unlocked: stored tokens are served again on their schedule. Every profile's
        are read in one go (10,000 profiles: one query, not 10,000)."""
        try:
            stored = self.store.saved_tokens_all()
        except DcBrokerError:
            stored = {}  # each session reads its own, and says what is wrong with it
        for session in self._all():
            session.resume(stored.get(session.profile.name, UNREAD) if stored else UNREAD)

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

    async def settled(self, *, spending_only: bool = False) -> None:
        """Return once no session has an attempt in flight (``lock`` waits for this). With
        ``spending_only`` (what the daemon waits for on stop), only sessions whose login holds a
        refresh token: a grant that spends nothing is cut short at no cost, however slow its IdP."""
        while True:
            busy = [s for s in self._all() if s.busy and (s.holds_refresh_token or not spending_only)]
            if not busy:
                return
            await busy[0].settled()

    def status(self) -> list[dict[str, Any]]:
        now = self.clock()
        wall = time.time()
        return [self._by_name[n].status(now, wall) for n in sorted(self._by_name)]
