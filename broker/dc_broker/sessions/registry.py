"""The registry of sessions: one ``Session`` per profile (``dc_broker.sessions.session``), the per-request
scope children, and the nursery their refresh tasks run in.

``Sessions`` adds, changes and removes profiles at run time (``reload``), locks and unlocks them all,
and reports their status. What one login does lives in ``session``; its states in ``states``; the
grant flows in ``flows``; when each one's next attempt starts, and what happens when one fails with a
bug (it never ends the broker), in ``scheduler``: one task for them all.

**Per-request scopes only narrow, and cost their caller.** A request for a scope other than the
profile's own (``scoped``) gets a child session that narrows the profile's login (``lookup_scoped``).
Before one is made:

- the scope must be a subset of what the profile may have: its own ``scope``; with none set, the
  scopes the IdP granted its login (Keycloak grants the client's default client scopes, e.g.
  ``profile email``; the login is made first when there is none yet). Anything more is
  ``bad_request`` naming the extra scopes, for every grant (client credentials asks afresh with the
  secret, so nothing at the IdP would stop a wider grant);
- a scope the IdP refused is answered from memory for ``REFUSED_SCOPE_MEMORY`` seconds;
- the caller (its uid) spends one unit of its budget for the profile (``SCOPED_GRANTS_BURST``, then
  ``SCOPED_GRANTS_PER_MINUTE``): every request that makes a scope's session go to the IdP does.
  Over budget it gets ``overloaded`` with ``retry_after``; other callers keep theirs;
- one caller holds at most ``MAX_SCOPES_PER_CALLER`` of a profile's ``MAX_SCOPES_PER_PROFILE``
  slots: its next scope replaces its own least recently used one, not another caller's.

What a child session's attempts log goes through a ``LogGate`` per (profile, caller) (``_ScopeLogs``,
reading ``scheduler.ATTEMPTING``): a
consumer cycling through failing scopes makes a few lines a minute, and the next line says how
many were held back.

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
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Final

import trio

from dc_broker.access.rules import needs_exe_hash, parse_rules
from dc_broker.budget import Budget, LogGate
from dc_broker.config import Profile
from dc_broker.idp.transport import IdpTransport
from dc_broker.observe.counters import Counts
from dc_broker.sessions import policy
from dc_broker.sessions.policy import RefreshPolicy
from dc_broker.sessions.scheduler import ATTEMPTING, Scheduler
from dc_broker.sessions.session import UNREAD, Session
from dc_broker.sessions.states import WAITING_FOR_PERSON, State
from dc_broker.store import SecretStore
from dc_token.errors import BadRequest, BrokerError, DcBrokerError, Overloaded, UnknownProfile

__all__ = [
    "LOCK_SETTLE_LIMIT",
    "MAX_SCOPES_PER_CALLER",
    "MAX_SCOPES_PER_PROFILE",
    "REFUSED_SCOPE_MEMORY",
    "SCOPED_GRANTS_BURST",
    "SCOPED_GRANTS_PER_MINUTE",
    "ScopeNotKnownYet",
    "Sessions",
]

log = logging.getLogger("dc_broker.sessions")

#: distinct per-request scopes one profile may serve at once
MAX_SCOPES_PER_PROFILE: Final = 16
#: of those, the ones one caller (uid) may hold; its next scope replaces its own oldest
MAX_SCOPES_PER_CALLER: Final = 8
#: IdP grants one caller's per-request scopes may cause per profile: a burst, then so many a minute
SCOPED_GRANTS_BURST: Final = 10
SCOPED_GRANTS_PER_MINUTE: Final = 10
#: seconds a scope the IdP refused is answered from memory (no IdP request, no budget spent)
REFUSED_SCOPE_MEMORY: Final = 300.0
#: refused scopes remembered per profile at most (the oldest go first)
MAX_REFUSED_SCOPES: Final = 64
#: log lines about one caller's per-request scopes of one profile, per minute
SCOPE_LOG_LINES_PER_MINUTE: Final = 5
#: budgets and log gates kept before full (unused) ones are forgotten
_MAX_KEPT: Final = 4096
#: the callers' uid when a scope is asked for by the broker itself (tests, the model)
NOBODY: Final = -1


def _pins_program(profile: Profile) -> bool:
    return needs_exe_hash(parse_rules(profile.allow + profile.admin))


class ScopeNotKnownYet(Exception):
    """A profile without a scope of its own narrows from what the IdP granted its login, and it has
    no login yet: get one (``Session.get``), then ask again."""


class _ScopeLogs(logging.Filter):
    """On ``dc_broker.sessions``: what a child session's attempt logs passes its (profile, caller)
    ``LogGate`` (``Session.log_gate``, set by ``Sessions.lookup_scoped``; the scheduler says whose
    attempt a task runs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        held: tuple[LogGate, Callable[[], float], str] | None = getattr(ATTEMPTING.get(), "log_gate", None)
        if held is None:
            return True
        gate, clock, who = held
        admitted, before = gate.admit(clock())
        if admitted and before:
            record.msg = f"{record.getMessage()} [{before} more line(s) about {who} held back]"
            record.args = None
        return admitted


_SCOPE_LOGS = _ScopeLogs()
log.addFilter(_SCOPE_LOGS)
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
        #: the profiles whose rules pin a program by its hash (``exe-sha256``)
        self._pinning = {name for name, p in profiles.items() if _pins_program(p)}
        #: some profile does: callers' programs are hashed before their first decision
        #: (``dc_broker.access.programs``)
        self.pins_programs = bool(self._pinning)
        self._scoped: dict[tuple[str, str], Session] = {}
        #: who (uid) asked for each scope's session first: it holds the slot
        self._owners: dict[Session, int] = {}
        #: (profile, uid) -> the IdP grants that caller's scopes may still cause
        self._budgets: dict[tuple[str, int], Budget] = {}
        #: (profile, uid) -> the log lines that caller's scopes may still cause
        self._gates: dict[tuple[str, int], LogGate] = {}
        #: profile -> scope -> (until, the IdP's refusal)
        self._refused: dict[str, OrderedDict[str, tuple[float, BrokerError]]] = {}
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
            counts=self.counts,
        )

    def _pinned(self, profile: Profile, kept: bool) -> None:
        if kept and _pins_program(profile):
            self._pinning.add(profile.name)
        else:
            self._pinning.discard(profile.name)
        self.pins_programs = bool(self._pinning)

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
            self._pinned(profile, True)
            return existing
        session = self._session(profile)
        self._by_name[profile.name] = session
        self._pinned(profile, True)
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

    def scoped(self, base: Session, scope: str | None, caller: int, min_ttl: float = 0.0) -> Session:
        """The session that serves ``caller``'s (a uid's) request for ``scope`` from ``base``'s login,
        under the rules for per-request scopes (module docstring): ``base`` for no scope or its own;
        ``BadRequest`` for a scope that would widen it, the IdP's remembered refusal, ``Overloaded``
        when this request would make an IdP grant beyond the caller's budget, ``ScopeNotKnownYet``
        when a profile without a scope has no login to narrow yet."""
        if not scope or scope == base.profile.scope:
            return base
        name = base.profile.name
        now = self.clock()
        child = self._scoped.get((name, scope))
        if child is None:
            self._remembered_refusal(name, scope, now)
            self._check_narrows(base, scope)
            self._spend(name, caller, now)
            return self.lookup_scoped(base, scope, owner=caller)
        self._scoped[(name, scope)] = self._scoped.pop((name, scope))  # most recently used last
        if child.peek(min_ttl, now) is None and not child.busy and child.state not in WAITING_FOR_PERSON:
            self._spend(name, caller, now)  # this request sends the session to the IdP
        return child

    @staticmethod
    def _check_narrows(base: Session, scope: str) -> None:
        profile = base.profile
        if profile.scope is not None:
            allowed, what = profile.scope, f"the profile's own scope {profile.scope!r}"
        else:
            tok = base.token
            if tok is None:
                raise ScopeNotKnownYet(profile.name)
            if tok.scope is None:
                raise BadRequest(
                    f"profile {profile.name!r} sets no scope and its identity provider did not say which scopes "
                    f"its login has, so a per-request scope cannot be checked; set the profile's scope "
                    f'(`dc-broker set {profile.name} scope="..."`) to narrow from it'
                )
            allowed = tok.scope
            what = f"what its login was granted, {tok.scope!r} (the profile sets no scope: the IdP's defaults)"
        extra = [s for s in dict.fromkeys(scope.split()) if s not in set(allowed.split())]
        if extra:
            raise BadRequest(
                f"profile {profile.name!r}: scope {scope!r} asks for more than {what}: {' '.join(extra)}; a "
                "per-request scope may only narrow the profile's (its owner can widen it: "
                f'`dc-broker set {profile.name} scope="..."`)'
            )

    def _spend(self, name: str, caller: int, now: float) -> None:
        budget = self._budgets.get((name, caller))
        if budget is None:
            self._forget_full(self._budgets, now)
            budget = self._budgets[(name, caller)] = Budget(SCOPED_GRANTS_BURST, SCOPED_GRANTS_PER_MINUTE)
        wait = budget.spend(now)
        if wait > 0:
            raise Overloaded(
                f"profile {name!r}: uid {caller} has asked for more per-request scopes than the identity provider "
                f"is asked for per minute ({SCOPED_GRANTS_PER_MINUTE}); ask again in {math.ceil(wait)} s, or use "
                "fewer distinct scopes",
                retry_after=wait,
            )

    def _forget_full(self, kept: dict[tuple[str, int], Budget], now: float) -> None:
        if len(kept) >= _MAX_KEPT:
            for key in [key for key, budget in kept.items() if budget.full(now)]:
                del kept[key]

    def _remembered_refusal(self, name: str, scope: str, now: float) -> None:
        kept = self._refused.get(name)
        refused = None if kept is None else kept.get(scope)
        if kept is None or refused is None:
            return
        until, error = refused
        if now >= until:
            del kept[scope]
            return
        raise type(error)(error.message)

    def _remember(self, child: Session) -> None:
        """A scope's session leaves: a refusal by the IdP stays known for a while."""
        if child.state is not State.REJECTED or child.last_error is None or child.profile.scope is None:
            return
        kept = self._refused.setdefault(child.profile.name, OrderedDict())
        kept[child.profile.scope] = (self.clock() + REFUSED_SCOPE_MEMORY, child.last_error)
        while len(kept) > MAX_REFUSED_SCOPES:
            kept.popitem(last=False)

    def _gate(self, name: str, caller: int) -> LogGate:
        gate = self._gates.get((name, caller))
        if gate is None:
            if len(self._gates) >= _MAX_KEPT:
                self._gates.clear()
            gate = self._gates[(name, caller)] = LogGate(SCOPE_LOG_LINES_PER_MINUTE)
        return gate

    def lookup_scoped(self, base: Session, scope: str | None, *, owner: int = NOBODY) -> Session:
        """The session for ``(base's profile, scope)``: ``base`` itself for no scope or its configured
        one, else a child session (created on first use, held by ``owner``) that narrows base's login
        to ``scope``. A full profile makes room: the owner's least recently used scope once it holds
        ``MAX_SCOPES_PER_CALLER``, else the profile's. (No checks: ``scoped`` is what callers get.)"""
        name = base.profile.name
        if not scope or scope == base.profile.scope:
            return base
        child = self._scoped.pop((name, scope), None)
        if child is not None:
            self._scoped[(name, scope)] = child  # most recently used last
            return child
        mine = [key for key in self._scoped if key[0] == name]
        owned = [key for key in mine if self._owners.get(self._scoped[key]) == owner]
        if owner != NOBODY and len(owned) >= MAX_SCOPES_PER_CALLER:
            self._retire_scoped(owned[0])
        elif len(mine) >= MAX_SCOPES_PER_PROFILE:  # full: the least recently used scope makes room
            self._retire_scoped(mine[0])
        child = self._session(replace(base.profile, scope=scope), parent=base)
        self._scoped[(name, scope)] = child
        self._owners[child] = owner
        who = "the broker's own" if owner == NOBODY else f"uid {owner}'s per-request scopes"
        child.log_gate = (self._gate(name, owner), self.clock, who)
        if self._running:
            self._scheduler.add(child, math.inf)  # refreshes on demand first
        return child

    def _retire_scoped(self, key: tuple[str, str]) -> None:
        child = self._scoped.pop(key)
        self._owners.pop(child, None)
        self._remember(child)
        self._retire(child)

    def _drop_scoped(self, name: str) -> None:
        for key in [k for k in self._scoped if k[0] == name]:
            child = self._scoped.pop(key)
            self._owners.pop(child, None)
            self._retire(child)
        self._refused.pop(name, None)  # a new login: what the old one was refused may be granted now

    def _retire(self, session: Session) -> None:
        """A session leaves the broker: no attempt starts for it again (one in flight stops, and what
        it brings is of an older generation: not applied), its token leaves memory, and whoever waits
        on ``token_changed`` (a ``watch``, its token files) or for a round (``get``) is woken to find
        it retired."""
        session.token = None
        self._scheduler.remove(session)
        if session.parent is not None:
            session.parent.children.pop(session, None)
        session._changed()
        session._announce()
        session.release_callers()

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
            self._pinned(session.profile, False)

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
