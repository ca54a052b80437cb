"""One ``Session`` per profile: the current token, its refresh task, single-flight, and what a person
does to its login (lock, unlock, login, logout, new credentials, new settings).

A session owns exactly one login. Its background task (``run``) refreshes ahead of expiry as its
``Schedule`` says (``sessions.schedule``, the rules in ``policy``), retries with backoff when the IdP
fails, and is the only code that refreshes this login, so there is never more than one request in
flight per login: callers that need a token the current one cannot satisfy wake the task and wait
for the *round* in progress, sharing its result (single-flight). Reads that the current token
satisfies never wait (``peek``). Every use of this login's refresh token (the refresh task, a
per-scope narrowing, logout, a password login) holds ``_login_lock``.

**Attempts and generations.** The state (``sessions.states``) says what the login and token are; an
attempt at the IdP is tracked apart from it (``attempt``), with the ``generation`` it started in.
Lock, unlock, an adopted login, logout, a credentials or settings change all bump the generation; an
attempt whose generation has moved on has its outcome dropped, except that a refresh token the IdP
rotated on the way is kept first (``_keep_rotated``): the IdP has already killed its predecessor.

**A sent refresh is precious.** A refresh request's answer holds the only copy of the next refresh
token: the transport reads it patiently, and if it is lost anyway, the refresh token is presented
again only after the IdP has answered something harmless (``Login.refresh_in_doubt``).

What to send and what an answer means is decided by the pure flows (``flows``), stepped by the one
driver (``driver``); this module only performs their steps (``_perform``: send, clock, sleep). One
place accepts new tokens (``_accept``: stored before the old refresh token is dropped, then
current); the schedule is one value (``schedule``). Time comes from ``clock`` (``trio.current_time``
by default, so trio's MockClock drives it in tests). This module never builds an HTTP request nor
parses an answer itself.
"""

from __future__ import annotations

import hmac
import logging
import math
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final, TypeVar

import trio

from dc_broker.config import Profile
from dc_broker.errors import AnswerLost, ConfigError, MaybeLocked, RecordCorrupt, UpstreamFault, UpstreamGarbage
from dc_broker.idp import assertions, oidc
from dc_broker.idp.oidc import Endpoints, HttpRequest
from dc_broker.idp.transport import ClientCert, IdpTransport
from dc_broker.observe import events
from dc_broker.observe.counters import Counts, failure_reason
from dc_broker.secret import Secret
from dc_broker.sessions import driver, flows, loopback, policy
from dc_broker.sessions.driver import Done
from dc_broker.sessions.flows import Answer, AwaitRedirect, Ended, Flow, Login, LoginLost, Rotated, Sleep, Step
from dc_broker.sessions.policy import RefreshPolicy
from dc_broker.sessions.schedule import Schedule
from dc_broker.sessions.states import ACTIVE, WAITING_FOR_PERSON, Event, State, next_state
from dc_broker.store import SecretStore
from dc_broker.tokens import Credentials, TokenSet
from dc_token.errors import (
    BrokerError,
    CredentialsRejected,
    InternalError,
    Locked,
    LoginRequired,
    UpstreamError,
    UpstreamUnavailable,
)

if TYPE_CHECKING:
    from dc_broker.sessions.scheduler import Scheduler

log = logging.getLogger("dc_broker.sessions")
T = TypeVar("T")

#: longest a caller waits for a refresh round before getting upstream_unavailable
DEFAULT_WAIT_LIMIT: Final = 30.0
#: how long a browser login waits for the browser to come back
BROWSER_LOGIN_TIMEOUT: Final = 300.0
#: distinct oddities of an IdP's answers logged per profile (each once)
MAX_NOTES: Final = 8


def shift_times(tokens: TokenSet, delta: float) -> TokenSet:
    """The same token set on another clock (``delta`` = other clock - this clock)."""
    return replace(
        tokens,
        obtained_at=tokens.obtained_at + delta,
        expires_at=tokens.expires_at + delta,
        refresh_expires_at=None if tokens.refresh_expires_at is None else tokens.refresh_expires_at + delta,
    )


def _capped(tokens: TokenSet) -> TokenSet:
    """A stored token set whose lifetime exceeds what ``oidc.lifetime`` allows (an older broker)."""
    if tokens.lifetime <= oidc.MAX_LIFETIME:
        return tokens
    return replace(tokens, expires_at=tokens.obtained_at + oidc.MAX_LIFETIME)


class Unread:
    """Not read from the store yet (``UNREAD``): distinct from None, "nothing stored"."""


UNREAD: Final = Unread()


def broker_error(name: str, exc: UpstreamFault, retry_after: float | None = None) -> BrokerError:
    """What a caller (or `dc-broker login`) is told when the IdP failed: the one translation of an
    ``UpstreamFault`` into the wire's error tree."""
    if isinstance(exc, UpstreamGarbage):
        return UpstreamError(f"profile {name!r}: {exc}", retry_after=retry_after)
    return UpstreamUnavailable(f"profile {name!r}: {exc}", retry_after=retry_after)


#: grants with a stored credential (a re-login when the broker makes them itself), and what is stored
_STORED_GRANTS: Final = {"password": "password", "client_credentials": "client secret"}


@dataclass(frozen=True, slots=True)
class Attempt:
    """An attempt at the IdP in flight: the generation it started in, and when."""

    generation: int
    started_at: float


#: what an attempt ends with: new tokens, or the error that stands for its failure
Outcome = TokenSet | BrokerError | UpstreamFault | ConfigError


class Session:
    """The live state of one profile's login."""

    __slots__ = (
        "_children",
        "_crash_kinds",
        "_demanded",
        "_due",
        "_endpoints",
        "_fingerprint",
        "_in_doubt",
        "_last_forced_at",
        "_lock",
        "_lockouts",
        "_noted",
        "_proven",
        "_refresh_life",
        "_round",
        "_session_capped",
        "_token_changed",
        "_via",
        "attempt",
        "attempt_scope",
        "clock",
        "counts",
        "crashes",
        "generation",
        "idp",
        "idp_requests",
        "last_error",
        "last_refresh_at",
        "log_gate",
        "parent",
        "policy",
        "profile",
        "queued_at",
        "refreshes",
        "retired",
        "rng",
        "schedule",
        "scheduler",
        "state",
        "store",
        "token",
        "wait_limit",
        "wall_clock",
    )

    def __init__(
        self,
        profile: Profile,
        store: SecretStore,
        idp: IdpTransport,
        *,
        refresh_policy: RefreshPolicy = policy.DEFAULT_POLICY,
        clock: Callable[[], float] = trio.current_time,
        rng: random.Random | None = None,
        wait_limit: float = DEFAULT_WAIT_LIMIT,
        wall_clock: Callable[[], float] = time.time,
        parent: Session | None = None,
        counts: Counts | None = None,
    ) -> None:
        #: the broker's counters (metrics): one object for all sessions of a broker
        self.counts = Counts() if counts is None else counts
        #: for a per-request scope: the profile's main session, whose login this one narrows
        self.parent = parent
        self.profile = profile
        self._fingerprint = profile.login_fingerprint()  # whom stored tokens are for (never restore others)
        self.store = store
        self.idp = idp
        self.policy = refresh_policy
        self.clock = clock
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self.wait_limit = wait_limit
        self.wall_clock = wall_clock
        self.state = State.EMPTY
        self.token: TokenSet | None = None
        self.last_error: BrokerError | None = None
        self.last_refresh_at: float | None = None
        self.refreshes = 0
        self.idp_requests = 0
        self.schedule = Schedule()
        #: ``next_attempt_at`` and the (schedule, policy) it was computed from (every token reply reads it)
        self._due: tuple[Schedule, RefreshPolicy, float] | None = None
        #: bumped by everything that changes what this session is (see the module docstring)
        self.generation = 0
        #: the attempt at the IdP in flight, if any
        self.attempt: Attempt | None = None
        #: the refresh token whose last use got no answer: presented again only after the IdP answers
        self._in_doubt: Secret | None = None
        self._last_forced_at: float | None = None
        # the last refresh did not push the refresh token's deadline out: the IdP session is at its
        # SSO Session Max, so refreshing again buys nothing; re-login with the primary credential
        self._session_capped = False
        #: the refresh-token life the IdP granted below SSO Session Max (its idle timeout)
        self._refresh_life: float | None = None
        #: the endpoints, once known (from the profile's own settings, or discovery)
        self._endpoints: Endpoints | None = None
        #: (the profile it was worked out for, the proxy its IdP requests go through as shown)
        self._via: tuple[Profile, str | None] | None = None
        # What trio keeps is made when first needed: 10,000 profiles waiting 22 minutes for their
        # next refresh need none of it (``Scheduler``: no task per session either).
        #: set when the round in progress ends: the callers waiting for it
        self._round: trio.Event | None = None
        #: set when a new token arrives or the settings readers use change (``token_changed``)
        self._token_changed: trio.Event | None = None
        #: held while this login's refresh token is in use at the IdP: one use at a time (rotation)
        self._lock: trio.Lock | None = None
        #: a caller is waiting for a token the current one cannot give
        self._demanded = False
        #: per-request scope sessions narrowing this login; they forget their tokens when it changes
        self._children: set[Session] | None = None
        if parent is not None:
            parent.children.add(self)
        #: oddities of the IdP's answers already logged
        self._noted: set[str] | None = None
        #: the scheduler that runs this session's attempts (``Scheduler.add``), and its bookkeeping
        self.scheduler: Scheduler | None = None
        self.retired = False
        #: what this session's attempts log passes through (the registry's per-caller gate of a
        #: per-request scope's session; None: everything is logged)
        self.log_gate: Any = None
        self.attempt_scope: trio.CancelScope | None = None
        self.queued_at = math.inf
        #: how often this session's attempt failed with a bug (``crashed``), and the kinds logged
        self.crashes = 0
        self._crash_kinds: set[tuple[str, str]] | None = None
        #: the stored credentials got a token from the IdP (since they last changed): a refusal of them
        #: that reads like a brute-force lock is waited out (``policy.lockout_waits``), not believed
        self._proven = False
        #: lock-out waits spent since the last token
        self._lockouts = 0
        self._restore()

    def __repr__(self) -> str:
        return f"Session({self.profile.name!r}, state={self.state.value}, generation={self.generation})"

    # ------------------------------------------------------------ made when first needed

    @property
    def token_changed(self) -> trio.Event:
        """Set (and replaced) whenever a new token arrives or the settings readers use change
        (``_announce``); ``watch`` and the token files wait on it."""
        if self._token_changed is None:
            self._token_changed = trio.Event()
        return self._token_changed

    @property
    def _login_lock(self) -> trio.Lock:
        if self._lock is None:
            self._lock = trio.Lock()
        return self._lock

    @property
    def children(self) -> set[Session]:
        if self._children is None:
            self._children = set()
        return self._children

    @property
    def crash_kinds(self) -> set[tuple[str, str]]:
        if self._crash_kinds is None:
            self._crash_kinds = set()
        return self._crash_kinds

    def _round_event(self) -> trio.Event:
        if self._round is None:
            self._round = trio.Event()
        return self._round

    def _poke(self) -> None:
        """When this session is due may have changed: its scheduler looks at it again."""
        if self.scheduler is not None:
            self.scheduler.wake(self)

    def _event(self, event: Event) -> None:
        self.state = next_state(self.state, event)

    @property
    def next_attempt_at(self) -> float:
        """When the background task will next go to the IdP on its own (inf: not until a person acts).
        Computed once per schedule: both are immutable values, and every token reply reads it."""
        due, schedule, p = self._due, self.schedule, self.policy
        if due is None or due[0] is not schedule or due[1] is not p:
            due = self._due = (schedule, p, schedule.due_at(p, demanded=False))
        return due[2]

    @property
    def failures(self) -> int:
        return self.schedule.failures

    def _restore(self, read: TokenSet | BrokerError | Unread | None = UNREAD) -> None:
        """Pick up tokens a previous run stored, so a restart serves at once and logs nobody in.
        ``read``: what the store holds for this profile, when the caller read it already (the
        registry reads every profile's at unlock in one go)."""
        if self.parent is not None:
            return
        try:
            if isinstance(read, BrokerError):
                raise read
            saved = self.store.saved_tokens(self.profile.name) if isinstance(read, Unread) else read
        except Locked as exc:  # said once for all profiles by the daemon; unlock restores
            self.last_error = Locked(exc.message)
            self.schedule = self.schedule.stopped()
            self._event(Event.LOCK)
            return
        except BrokerError as exc:  # e.g. this record is corrupt
            log.warning("profile %s: stored tokens not usable: %s", self.profile.name, exc.message)
            return
        if saved is None:
            return
        if saved.issued_for is not None and saved.issued_for != self._fingerprint:
            log.info("profile %s: settings changed since its tokens were stored; logging in anew", self.profile.name)
            return
        now = self.clock()
        tokens = _capped(shift_times(saved, now - self.wall_clock()))
        if tokens.expires_at > now or tokens.refresh_token is not None:
            self.token = tokens
            self.last_refresh_at = tokens.obtained_at
            self._proven = True  # these credentials got these tokens
            if tokens.expires_at > now:
                self._event(Event.RESTORED)

    # ------------------------------------------------------------ reads

    def peek(self, min_ttl: float, now: float) -> TokenSet | None:
        """The current token if it satisfies min_ttl at ``now``; never waits, never refreshes."""
        tok = self.token
        if tok is not None and policy.satisfies(
            expires_at=tok.expires_at, now=now, min_ttl=policy.effective_min_ttl(self.policy, min_ttl, tok.lifetime)
        ):
            return tok
        return None

    def effective_state(self, now: float) -> State:
        """``state`` as it stands at ``now``: a stale session whose token has since expired is
        unavailable, a fresh one whose token expired before its refresh is empty (no usable token)."""
        expired = self.token is None or self.token.expires_at <= now
        if self.state is State.STALE and expired:
            return State.UNAVAILABLE
        if self.state is State.FRESH and expired:
            return State.EMPTY
        return self.state

    async def get(self, min_ttl: float = 0.0) -> TokenSet:
        """A token with at least min_ttl left: from memory, or by joining/starting a refresh round."""
        deadline = self.clock() + self.wait_limit
        for _ in range(3):
            now = self.clock()
            tok = self.peek(min_ttl, now)
            if tok is not None:
                return tok
            self._raise_if_blocked(now)
            round_done = self._round_event()
            self._demanded = True
            self._poke()
            with trio.move_on_at(deadline) as scope:
                await round_done.wait()
            if scope.cancelled_caught:
                raise UpstreamUnavailable(
                    f"profile {self.profile.name!r}: the identity provider has not answered in "
                    f"{self.wait_limit:g} s; the broker keeps trying",
                    retry_after=max(1.0, self.policy.backoff_base),
                )
        tok = self.token
        raise UpstreamError(
            f"profile {self.profile.name!r}: the identity provider grants tokens too short for min_ttl "
            f"{min_ttl:g} s (last lifetime {tok.lifetime if tok else 0:.0f} s)"
        )

    def _raise_if_blocked(self, now: float) -> None:
        if (self.state in WAITING_FOR_PERSON or self.state is State.ERROR) and self.last_error is not None:
            raise self.last_error
        probe_at = self.schedule.probe_at(self.policy)
        if now < probe_at:
            retry_after = probe_at - now
            err = self.last_error
            if isinstance(err, UpstreamError):
                raise UpstreamError(err.message, retry_after=retry_after)
            message = err.message if err is not None else "the identity provider is unavailable"
            raise UpstreamUnavailable(message, retry_after=retry_after)

    def invalidate(self, access_token: str) -> bool:
        """The API rejected ``access_token``. If it is still current (and we have not just done this),
        treat it as expired and refresh now. Returns whether a refresh was forced."""
        tok = self.token
        now = self.clock()
        if tok is None or not hmac.compare_digest(tok.access_token.reveal().encode(), access_token.encode()):
            return False
        if not policy.may_force_refresh(self.policy, last_forced_at=self._last_forced_at, now=now):
            return False
        self._last_forced_at = now
        self.token = replace(tok, expires_at=min(tok.expires_at, now))
        self.schedule = self.schedule.forced(now)
        self._poke()
        return True

    # ------------------------------------------------------------ what a person (or the config) changes

    def _changed(self) -> int:
        """Something changed what this session is: a new generation (attempts in flight are dropped)."""
        self.generation += 1
        return self.generation

    def _forget_children(self) -> None:
        """This login was replaced or dropped: tokens narrowed from it go too, and a child told to log
        in (it had no login to narrow) may try again on its next request."""
        for child in list(self._children or ()):
            child._changed()
            child.token = None
            if child.state is State.LOGIN_REQUIRED:
                child.last_error = None
                child._event(Event.RETRY)
            child._announce()

    def credentials_changed(self, *, relogin: bool = False) -> None:
        """Config or secrets changed: leave rejected/login_required and try again now. With ``relogin``
        the current login is dropped, so the next grant proves the new credentials."""
        self._changed()
        if relogin:
            self.token = None
            self._proven = False  # new credentials: nothing they got yet
            self._forget_children()
        self.schedule = self.schedule.retry(self.clock())
        if self.state in WAITING_FOR_PERSON or self.state is State.ERROR:
            self.last_error = None
        self._event(Event.RETRY)
        self._poke()

    def reconfigure(self, profile: Profile) -> None:
        """The profile's settings changed (same name). A change of who may use or change it, or of
        its token files, applies at once and keeps the login (``Profile.same_login``); the sink task
        is woken to look again. A change of whom its tokens are for (IdP, client, grant, user,
        scope: ``login_fingerprint``) drops the login; any other means new endpoints and a new
        attempt now."""
        if self.profile.same_login(profile):
            self.profile = profile
            self._announce()  # the token files' task rereads profile.sinks; watchers see no new token
            return
        fingerprint = profile.login_fingerprint()
        relogin = fingerprint != self._fingerprint
        self.profile, self._fingerprint = profile, fingerprint
        self._endpoints = None
        self.credentials_changed(relogin=relogin)

    def lock_out(self) -> None:
        """The vault was locked: drop the token from memory and wait for `dc-broker unlock`."""
        self._changed()
        self.token = None
        self.last_error = Locked("the vault is locked; run `dc-broker unlock`")
        self.schedule = self.schedule.stopped()
        self._event(Event.LOCK)
        self._announce()

    def resume(self, read: TokenSet | BrokerError | Unread | None = UNREAD) -> None:
        """After unlock: a stored, still-valid token is served at once and refreshed on its own schedule;
        without one, try now. ``read``: the stored tokens, if the caller read them already."""
        if self.state is State.LOCKED:
            self.last_error = None
            self._event(Event.UNLOCKED)
        if self.token is None:
            self._restore(read)
        tok = self.token
        now = self.clock()
        if tok is None or tok.expires_at <= now:
            self.credentials_changed()
            return
        self._changed()
        self.schedule = self.schedule.planned(self._refresh_time(tok, capped=False))
        self._event(Event.RESTORED)
        self._poke()  # its refresh is planned anew

    def crashed(self, exc: BaseException, restart_in: float) -> None:
        """The refresh task failed with a bug; its supervisor restarts it in ``restart_in`` seconds.
        The message names only the exception's type: its text could quote anything."""
        self._changed()
        self.crashes += 1
        self.attempt = None
        self.last_error = InternalError(
            f"profile {self.profile.name!r}: the broker failed while refreshing it ({type(exc).__name__}); "
            f"it tries again in {restart_in:.0f} s"
        )
        self._event(Event.CRASHED)
        self.schedule = self.schedule.failed(self.policy, now=self.clock(), rand=1.0, retry_after=None, wait=restart_in)
        self._finish_round()  # callers waiting for a round are told, not left hanging

    @property
    def busy(self) -> bool:
        """An attempt is in flight, or something uses this login at the IdP (``settled`` waits)."""
        return self.attempt is not None or (self._lock is not None and self._lock.locked())

    @property
    def holds_refresh_token(self) -> bool:
        """Its login has a refresh token: an attempt or narrowing in flight may spend it, and its
        answer holds the only copy of the next one (what a stop waits for; a client-credentials or
        password grant cut short loses nothing)."""
        tok = self.token
        return (tok is not None and tok.refresh_token is not None) or self._in_doubt is not None

    async def settled(self) -> None:
        """Return once no attempt is in flight and nothing uses this login at the IdP."""
        while self.attempt is not None:
            await self._round_event().wait()
        async with self._login_lock:
            pass

    # ------------------------------------------------------------ the background task

    def _due_at(self) -> float:
        return self.schedule.due_at(self.policy, demanded=self._demanded)

    def begin(self, first_attempt_delay: float = 0.0) -> None:
        """Plan the first attempt (a scheduler takes the session on): its token's own plan, else after
        the start-up stagger, which never delays a due refresh past its token's life."""
        now = self.clock()
        tok = self.token
        if self.state in WAITING_FOR_PERSON:
            return
        plan = now + first_attempt_delay
        if tok is not None and tok.expires_at > now:  # restored: keep its schedule unless already due
            plan = policy.first_attempt_at(
                self.policy,
                now=now,
                planned_at=self._refresh_time(tok, capped=False),
                expires_at=tok.expires_at,
                delay=first_attempt_delay,
            )
        self.schedule = self.schedule.planned(plan)

    def due(self) -> float:
        """When this session's next attempt starts (inf: not until a person acts)."""
        return math.inf if self.state in WAITING_FOR_PERSON else self._due_at()

    async def step(self) -> None:
        """One attempt, started by the scheduler because it is due; callers that joined during it were
        served by its round."""
        self._demanded = False
        await self._attempt()
        self._demanded = False

    def release_callers(self) -> None:
        """Callers waiting for a round that will not come (a person must act first) are told now."""
        self._demanded = False
        self._finish_round()

    async def run(self, *, first_attempt_delay: float = 0.0) -> None:
        """Keep this profile's token fresh until cancelled: a scheduler of its own (the registry runs
        one for all its sessions)."""
        from dc_broker.sessions.scheduler import Scheduler

        scheduler = Scheduler(self.policy, self.clock)
        async with trio.open_nursery() as nursery:
            await nursery.start(scheduler.run)
            scheduler.add(self, first_attempt_delay)

    def _finish_round(self) -> None:
        done, self._round = self._round, None
        if done is not None:
            done.set()

    def _refresh_time(self, tokens: TokenSet, *, capped: bool) -> float:
        return policy.refresh_at(
            self.policy,
            obtained_at=tokens.obtained_at,
            expires_at=tokens.expires_at,
            # at session max the refresh deadline cannot move: schedule on the access token alone
            refresh_expires_at=None if capped else tokens.refresh_expires_at,
            rand=self.rng.random(),
        )

    async def _attempt(self) -> None:
        """One attempt at the IdP for this login (a narrowing of the parent's, for a child). Its
        generation is the one it holds the login in: whatever changed the session while it waited
        for the lock (a logout, a login) is what it works from, or, if that left a person to act,
        it does not go at all."""
        now = self.clock()
        self.schedule = self.schedule.started(now)
        self.attempt = Attempt(self.generation, now)
        self.counts.attempt(self.profile.name)
        try:
            if self.parent is not None:
                gen = self.generation
                await self._conclude(gen, await _outcome(self.parent.narrow(self.profile.scope or "")), None)
                return
            # held until the new refresh token is stored *and* current: a narrowing call must never
            # pick up the one this refresh just used (with rotation, that kills the session)
            async with self._login_lock:
                if self.state in WAITING_FOR_PERSON:
                    return  # logged out or locked while it waited for the lock
                gen = self.generation
                self.attempt = Attempt(gen, now)
                presented: Secret | None = None

                async def obtain() -> TokenSet:
                    nonlocal presented
                    login = await self._login()
                    presented = login.refresh_token
                    return await self._drive(flows.obtain(login), self._lost(login.refresh_token))

                outcome = await _outcome(obtain())
                await self._conclude(gen, outcome, presented)
        finally:
            self.attempt = None
            self._finish_round()

    async def _conclude(self, gen: int, outcome: Outcome, presented: Secret | None) -> None:
        """The one place an attempt's outcome moves the session, if its generation is still current."""
        name = self.profile.name
        if gen != self.generation:
            if isinstance(outcome, TokenSet):
                await self._keep_rotated(outcome, presented)
            log.debug("profile %s: an attempt of generation %d ended after a change; its outcome is dropped", name, gen)
            return
        if not isinstance(outcome, TokenSet) and (reason := failure_reason(outcome)) is not None:
            if reason == "maybe_locked" and not (self._proven and self._lockouts < len(self.policy.lockout_waits)):
                reason = "credential_wrong"  # never accepted, or waited out: taken for a wrong password
            self.counts.failure(name, reason)
        if isinstance(outcome, TokenSet):
            await self._accept(outcome, Event.GRANTED, gen)
        elif isinstance(outcome, Locked):
            self.last_error = outcome
            self.schedule = self.schedule.stopped()
            self._event(Event.LOCK)
            log.debug("profile %s: waiting for `dc-broker unlock`", name)
        elif isinstance(outcome, MaybeLocked) and self._proven and self._lockouts < len(self.policy.lockout_waits):
            wait = self.policy.lockout_waits[self._lockouts]
            self._lockouts += 1
            told = UpstreamUnavailable(
                f"profile {name!r}: the identity provider refuses the password of user {self.profile.username!r}, "
                "which it accepted before: Keycloak's brute-force detection answers so while it locks an account, "
                f"and the lock lifts by itself; asking again in {wait:.0f} s ({self._lockouts} of "
                f"{len(self.policy.lockout_waits)})"
            )
            self._failed(outcome, told, outcome.message, wait)
        elif isinstance(outcome, LoginRequired | CredentialsRejected | ConfigError):
            err = outcome if isinstance(outcome, BrokerError) else CredentialsRejected(f"profile {name!r}: {outcome}")
            self.last_error = err
            if isinstance(err, LoginRequired) and not self._token_valid():
                self.token = None  # a corrupt record must not drop a still-valid token
            self.schedule = self.schedule.stopped()
            self._event(Event.NEED_LOGIN if isinstance(err, LoginRequired) else Event.REFUSED)
            log.warning("profile %s: %s", name, err.message)
        elif isinstance(outcome, UpstreamFault):
            self._failed(outcome, broker_error(name, outcome), str(outcome))
        else:  # the parent login behind a scope could not give a token: the parent's error, as it said it
            kind = UpstreamError if isinstance(outcome, UpstreamError) else UpstreamUnavailable
            self._failed(outcome, kind(outcome.message), outcome.message)

    def _failed(self, exc: UpstreamFault | BrokerError, told: BrokerError, said: str, wait: float = 0.0) -> None:
        now = self.clock()
        self.schedule = self.schedule.failed(
            self.policy, now=now, rand=self.rng.random(), retry_after=exc.retry_after, wait=wait
        )
        told.retry_after = delay = self.schedule.backoff_until - now
        self.last_error = told
        self._event(Event.FAILED_STALE if self._token_valid() else Event.FAILED)
        log.warning(
            "profile %s: refresh failed (%s); retry %d in %.1f s",
            self.profile.name,
            said,
            self.schedule.failures,
            delay,
        )

    def _token_valid(self) -> bool:
        return self.token is not None and self.token.expires_at > self.clock()

    async def _keep_rotated(self, tokens: TokenSet, presented: Secret | None) -> None:
        """An attempt of an older generation brought new tokens. If the IdP rotated the refresh token
        it presented, that one is dead now: the new one replaces it wherever it still stands (in
        memory, else in the store). If the login was replaced meanwhile, the old login's new token
        has nowhere to go."""
        name = self.profile.name
        if presented is None or tokens.refresh_token is None or tokens.refresh_token == presented:
            return
        current = self.token
        if current is not None and current.refresh_token == presented and self.state in ACTIVE:
            await self._accept(tokens, Event.GRANTED, self.generation, keep_schedule=True)
            return
        try:
            saved = self.store.saved_tokens(name)
            if saved is not None and saved.refresh_token == presented:
                await self._save(tokens)
                self._rotated()
                log.info("profile %s: stored the refresh token the IdP rotated during a change", name)
                return
        except BrokerError as exc:
            log.warning("profile %s: could not keep the rotated refresh token: %s", name, exc.message)
            return
        log.info("profile %s: a refresh that ended after the login was replaced is dropped", name)

    async def _accept(self, tokens: TokenSet, event: Event, gen: int, *, keep_schedule: bool = False) -> bool:
        """The one place new tokens become current: stored first (durable before the old refresh
        token is dropped; stores keep wall-clock times), then served, then scheduled. Returns whether
        they became current (not if the session changed while they were being stored)."""
        for note in tokens.notes:
            noted = self._noted if self._noted is not None else set()
            if note not in noted and len(noted) < MAX_NOTES:
                noted.add(note)
                self._noted = noted
                log.warning("profile %s: the identity provider's answer is odd: %s", self.profile.name, note)
        try:
            if self.parent is None:
                await self._save(tokens)
        except Exception:
            # keep serving from memory: with rotation the old refresh token is already dead
            log.exception("profile %s: could not store the new tokens", self.profile.name)
        if gen != self.generation or self.store.locked:
            return False  # locked, logged out or replaced while storing: they are stored, not current
        if event is Event.ADOPTED:
            self._session_capped = False
            self._refresh_life = None
        # At SSO Session Max the IdP grants refresh tokens with ever shorter lives (max - elapsed);
        # below Max their life is the idle timeout, the same every time. (Comparing deadlines
        # instead misfires when a scope narrowing has just pushed the deadline.) An answer that kept
        # the refresh token and its deadline (RFC 6749 section 6) says nothing about either.
        old = self.token
        if not (
            old is not None
            and tokens.refresh_token is not None
            and tokens.refresh_token == old.refresh_token
            and tokens.refresh_expires_at == old.refresh_expires_at
        ):
            life = None if tokens.refresh_expires_at is None else tokens.refresh_expires_at - tokens.obtained_at
            self._session_capped = (
                life is not None and self._refresh_life is not None and life < self._refresh_life - 2.0
            )
            if not self._session_capped:
                self._refresh_life = life
        if (
            event is Event.GRANTED
            and old is not None
            and old.refresh_token is not None
            and tokens.refresh_token is not None
            and tokens.refresh_token != old.refresh_token
        ):
            self._rotated()
        self.token = tokens
        self.last_error = None
        self.last_refresh_at = self.clock()
        self.refreshes += 1
        self._proven, self._lockouts = True, 0
        if not keep_schedule:
            self.schedule = self.schedule.granted(self._refresh_time(tokens, capped=self._session_capped))
        self._event(event)
        self._announce()
        return True

    def _rotated(self) -> None:
        name = self.profile.name
        self.counts.rotation(name)
        events.emit(
            "refresh_token_rotated",
            "profile %s: the identity provider rotated the refresh token",
            name,
            profile=name,
            generation=self.generation,
        )

    def _announce(self) -> None:
        """Wake everyone waiting on ``token_changed`` (a new token, or new settings to look at)."""
        changed, self._token_changed = self._token_changed, None
        if changed is not None:
            changed.set()

    # ------------------------------------------------------------ performing the flows' steps

    async def _drive(self, flow: Flow[T], on_lost: Callable[[LoginLost], None] | None = None) -> T:
        return await driver.drive(flow, self._performer(on_lost))

    def _performer(
        self,
        on_lost: Callable[[LoginLost], None] | None,
        waits: Callable[[AwaitRedirect], Awaitable[object]] | None = None,
        *,
        rotated: Callable[[Rotated], Awaitable[None]] | None = None,
    ) -> Callable[[Step], Awaitable[object]]:
        async def perform(step: Step) -> object:
            if isinstance(step, HttpRequest):
                return await self._request(step)
            if isinstance(step, Rotated) and rotated is not None:
                await rotated(step)
                return None
            if isinstance(step, Sleep):
                await trio.sleep(step.seconds)
                return self.clock()
            if isinstance(step, LoginLost):
                self.counts.failure(self.profile.name, "token_dead")
                log.info("profile %s: refresh token refused (%s); falling back", self.profile.name, step.why)
                if on_lost is not None:
                    on_lost(step)
                return None
            if isinstance(step, AwaitRedirect) and waits is not None:
                return await waits(step)
            raise TypeError(f"this driver cannot perform {step!r}")

        return perform

    async def _request(self, req: HttpRequest) -> Answer:
        """One request to this profile's IdP. The IdP issues what it answers after it was sent, so
        lifetimes count from the send (``Answer``). A lost answer to a request that spent a refresh
        token puts that token in doubt; any answer to it clears the doubt."""
        self.idp_requests += 1
        name = self.profile.name
        sent_at, wall = self.clock(), self.wall_clock()
        grant = req.form.get("grant_type")
        if grant in _STORED_GRANTS and self.attempt is not None:  # the broker's own, not a person's login
            self.counts.relogin(name, grant)
            events.emit(
                "relogin",
                "profile %s: logging in again with the stored %s",
                name,
                _STORED_GRANTS[grant],
                profile=name,
                grant=grant,
                generation=self.generation,
            )
        # a client assertion is made here, the edge, with the wall clock and fresh randomness: a new
        # one for each sending (its jti is single-use), and every one made is redacted from the answer
        made: list[str] = []

        def assertion_made(now: float) -> HttpRequest:
            done = assertions.complete(req, now=now, jti=secrets.token_urlsafe(24))
            if done is not req:
                made.append(done.form["client_assertion"])
            return done

        remake = None if req.assertion is None else lambda: assertion_made(self.wall_clock())
        try:
            resp = await self.idp.send(
                assertion_made(wall),
                ca_bundle=self.profile.ca_bundle,
                proxy=self.profile.proxy,
                client_cert=_client_cert(self.profile),
                remake=remake,
            )
        except AnswerLost:
            self._in_doubt = req.spends
            raise
        finally:
            self.counts.idp_request(name, self.clock() - sent_at)
        if req.spends is not None and req.spends == self._in_doubt:
            self._in_doubt = None
        return Answer(resp, sent_at, wall, tuple(made))

    def _lost(self, refused: Secret | None) -> Callable[[LoginLost], None]:
        """On ``LoginLost``: the IdP refused ``refused``; the login forgets it (not its access token,
        which stays valid until it expires), unless it was replaced meanwhile."""

        def forget(_: LoginLost) -> None:
            tok = self.token
            if tok is not None and refused is not None and tok.refresh_token == refused:
                self.token = replace(tok, refresh_token=None, refresh_expires_at=None)

        return forget

    def _shown_route(self) -> str | None:
        """The proxy this profile's IdP requests go through, as shown (None: direct); worked out once
        per profile settings, since ``status`` asks for every profile each time."""
        if self._via is None or self._via[0] is not self.profile:
            url = self.profile.static_token_url() or self.profile.issuer or ""
            self._via = (self.profile, self.idp.via(url, self.profile.proxy))
        return self._via[1]

    def _credentials(self) -> Credentials:
        return self.store.credentials(self.profile.name)

    def _credentials_or_none(self) -> Credentials:
        """The stored credentials; none if the record is corrupt (a login replaces it)."""
        try:
            return self._credentials()
        except RecordCorrupt:
            return Credentials()

    async def _login(self, creds: Credentials | None = None) -> Login:
        endpoints = await self._resolve_endpoints()  # first: credentials may change meanwhile
        creds = self._credentials() if creds is None else creds
        tok = self.token
        refresh_token: Secret | None = None
        deadline: float | None = None
        if tok is not None and tok.refresh_token is not None:
            # presented even past our idea of its deadline (counted from the send, so early by the
            # round trip): only the IdP saying it is dead may cost a refresh token
            refresh_token, deadline = tok.refresh_token, tok.refresh_expires_at
        elif tok is None:
            refresh_token = creds.refresh_token
        return Login(
            self.profile,
            creds,
            endpoints,
            refresh_token,
            deadline,
            prefer_primary=self._session_capped,
            refresh_in_doubt=refresh_token is not None and refresh_token == self._in_doubt,
            granted_scope=tok.scope if tok is not None else None,
        )

    async def _save(self, tokens: TokenSet) -> None:
        stored = replace(shift_times(tokens, self.wall_clock() - self.clock()), issued_for=self._fingerprint, notes=())
        await self.store.save_tokens(self.profile.name, stored)

    async def _resolve_endpoints(self) -> Endpoints:
        if self._endpoints is None:
            self._endpoints = oidc.static_endpoints(self.profile)
        if self._endpoints is None:
            issuer = self.profile.issuer
            assert issuer is not None  # config validation guarantees server+tenant, token_url or issuer
            self._endpoints = await self._drive(flows.discover(self.profile, issuer))
        return self._endpoints

    # ------------------------------------------------------------ logins outside the refresh task

    async def narrow(self, scope: str) -> TokenSet:
        """A token for ``scope`` from this login (``flows.narrow``), never wider than asked. A refresh
        token the IdP rotates on the way is adopted by this login, stored first, so the chain of
        refresh tokens stays single."""
        if self.profile.grant == "client_credentials":
            return await self._drive(flows.narrow(await self._login(), scope))
        await self.get(0.0)  # this login must exist first
        async with self._login_lock:
            login = await self._login()
            tok = self.token
            if login.refresh_token is None or tok is None:
                raise LoginRequired(flows.login_message(self.profile))

            def renew(lost: LoginLost) -> None:  # this login's refresh token is dead: let it recover
                self._lost(login.refresh_token)(lost)
                self.schedule = self.schedule.forced(self.clock())
                self._poke()

            async def adopt(step: Rotated) -> None:
                new = replace(tok, refresh_token=step.refresh_token, refresh_expires_at=step.refresh_expires_at)
                await self._save(new)
                current = self.token  # may have been replaced meanwhile (invalidate): keep its other fields
                if current is not None and current.refresh_token == login.refresh_token:
                    self.token = replace(
                        current, refresh_token=step.refresh_token, refresh_expires_at=step.refresh_expires_at
                    )

            # the refresh token it spends: the request runs to its answer (its own deadline bounds it)
            # and a rotated token is stored, whatever cancels the caller (an evicted scope, a reload)
            with trio.CancelScope(shield=True):
                narrowed = await driver.drive(flows.narrow(login, scope), self._performer(renew, rotated=adopt))
            return narrowed

    async def _interactive(
        self, flow: Flow[TokenSet], show: Callable[[Any], dict[str, Any]], waits: Any = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Drive an interactive login flow: each step for the person is yielded as ``show`` words it;
        the flow's tokens replace this session's login only once it has succeeded. An IdP that fails
        on the way is told as the wire's error (unavailable, retry), never as a bug."""
        tokens: TokenSet | None = None
        try:
            async with driver.steps(flow, self._performer(None, waits)) as each:
                async for item in each:
                    if isinstance(item, Done):
                        tokens = item.value
                    else:
                        yield show(item)
        except UpstreamFault as exc:
            raise broker_error(self.profile.name, exc) from None
        assert tokens is not None
        await self.adopt_login(tokens)
        yield self.logged_in(tokens)

    async def _endpoints_for_login(self) -> Endpoints:
        try:
            return await self._resolve_endpoints()
        except UpstreamFault as exc:
            raise broker_error(self.profile.name, exc) from None

    async def device_login(self) -> AsyncIterator[dict[str, Any]]:
        """The OAuth device authorization grant (``flows.device_login``), for a person at another
        screen: yields the code to show them, then the outcome; the new login replaces this session's
        tokens only once it succeeded."""
        name = self.profile.name
        if self.profile.grant == "client_credentials":
            raise CredentialsRejected(
                f"profile {name!r} uses client credentials: the broker signs in with the stored client "
                f"secret, so there is nothing to log in; to store a new secret, `dc-broker rotate {name} "
                "--client-secret`"
            )
        creds = self._credentials_or_none()
        flow = flows.device_login(self.profile, creds, await self._endpoints_for_login())

        def show(step: flows.ShowCode) -> dict[str, Any]:
            auth = step.authorization
            return {
                "profile": name,
                "verification_uri": auth.verification_uri,
                "verification_uri_complete": auth.verification_uri_complete,
                "user_code": auth.user_code,
                "expires_in": auth.expires_at - self.clock(),
            }

        async for message in self._interactive(flow, show):
            yield message

    async def browser_login(self) -> AsyncIterator[dict[str, Any]]:
        """Authorization code + PKCE (``flows.browser_login``) with a one-shot listener on a random
        127.0.0.1 port: yields the URL to open, then the outcome once the browser came back."""
        name = self.profile.name
        creds = self._credentials_or_none()
        endpoints = await self._endpoints_for_login()
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        port = listener.socket.getsockname()[1]
        redirect_uri = f"http://127.0.0.1:{port}/callback"
        flow = flows.browser_login(
            self.profile,
            creds,
            endpoints,
            redirect_uri=redirect_uri,
            state=secrets.token_urlsafe(24),
            verifier=secrets.token_urlsafe(64),
        )

        def show(step: flows.OpenBrowser) -> dict[str, Any]:
            return {"profile": name, "authorization_url": step.url, "expires_in": BROWSER_LOGIN_TIMEOUT}

        async def redirect(step: AwaitRedirect) -> object:
            with trio.move_on_after(BROWSER_LOGIN_TIMEOUT):
                answer = await loopback.one_redirect(listener)
                await listener.aclose()  # one-shot: nothing more is accepted
                return answer
            raise LoginRequired(
                f"profile {name!r}: no browser came back within {BROWSER_LOGIN_TIMEOUT:g} s; "
                f"run `dc-broker login {name}` again"
            )

        try:
            async for message in self._interactive(flow, show, redirect):
                yield message
        finally:
            await listener.aclose()

    def logged_in(self, tokens: TokenSet) -> dict[str, Any]:
        """The last message of a login stream: the profile is logged in, for this long."""
        return {"profile": self.profile.name, "logged_in": True, "expires_in": tokens.expires_at - self.clock()}

    async def password_login(self, password: Secret) -> TokenSet:
        """`dc-broker login` with a password: checked at the IdP first; only once it is accepted does
        it replace the stored password and the current login (a wrong one changes nothing)."""
        creds = self._credentials_or_none()
        try:
            async with self._login_lock:
                login = await self._login(creds)
                tokens = await self._drive(flows.password_login(login, password))
        except UpstreamFault as exc:
            raise broker_error(self.profile.name, exc) from None
        self.store.set_credentials(self.profile.name, replace(creds, password=password))
        await self.adopt_login(tokens)
        return tokens

    async def check_client(self, *, next_key: bool = False) -> bool:
        """One request that only the client's authentication can fail (``flows.check_client``): a
        key rotation's check that the IdP accepts the next key before it signs for real."""
        return await self._drive(flows.check_client(await self._login(), next_key=next_key))

    async def verify(self) -> TokenSet:
        """One grant with the stored credentials, outside the refresh task (`dc-broker add`, `rotate`):
        its caller words an IdP failure (``UpstreamFault``) for what it was checking."""
        return await self._drive(flows.obtain(await self._login()))

    async def adopt_login(self, tokens: TokenSet) -> None:
        """A login made outside the refresh task (device flow, password login) becomes this session's."""
        async with self._login_lock:
            if self.store.locked:
                raise Locked(
                    f"profile {self.profile.name!r}: the vault was locked during the login; run "
                    f"`dc-broker unlock`, then `dc-broker login {self.profile.name}` again"
                )
            gen = self._changed()
            self._forget_children()
            await self._accept(tokens, Event.ADOPTED, gen)
            self._poke()  # the scheduler picks up the new plan

    async def logout(self) -> Ended:
        """End the login at the IdP (best effort: ``flows.end_login``, its session where the IdP has an
        end-session endpoint, else a revocation) and forget it. The client secret stays (it is not the
        login), except for client credentials, where it is. Returns how the IdP ended it."""
        name = self.profile.name
        ended = Ended.UNCONFIRMED
        async with self._login_lock:
            self._changed()
            tok = self.token
            creds = self._credentials_or_none()
            if tok is not None:
                try:
                    ended = await self._drive(flows.end_login(await self._login(creds), tok))
                except (UpstreamFault, BrokerError) as exc:
                    log.warning("profile %s: could not end the login at the identity provider: %s", name, exc)
            await self.store.forget_tokens(name)
            # as stored now: a client secret rotated or a key activated while the IdP was asked stays
            creds = self._credentials_or_none()
            keep = None if self.profile.grant == "client_credentials" else creds.client_secret
            # the client's own keys are who the client is, not a login: they stay
            self.store.set_credentials(name, Credentials(client_secret=keep, client_keys=creds.client_keys))
            self.token = None
            self._in_doubt = None
            self._proven = False
            self._forget_children()
            self.last_error = LoginRequired(flows.login_message(self.profile))
            self.schedule = self.schedule.stopped()
            self._event(Event.LOGOUT)
            self._announce()
        log.info("profile %s: logged out (at the identity provider: %s)", name, ended.value)
        return ended

    # ------------------------------------------------------------ reporting

    def status(self, now: float, wall_now: float | None = None) -> dict[str, Any]:
        wall = time.time() if wall_now is None else wall_now
        tok = self.token
        due = self.next_attempt_at
        out: dict[str, Any] = {
            "profile": self.profile.name,
            "state": self.effective_state(now).value,
            "grant": self.profile.grant,
            "idp": self.profile.describe(),
            "via": self._shown_route(),
            "expires_in": round(tok.expires_at - now, 3) if tok else None,
            "scope": tok.scope if tok else None,
            "refreshing": self.attempt is not None,
            "generation": self.generation,
            "refreshes": self.refreshes,
            "idp_requests": self.idp_requests,
            "last_refresh": round(wall - (now - self.last_refresh_at), 3) if self.last_refresh_at is not None else None,
            "next_refresh_in": round(max(0.0, due - now), 3) if math.isfinite(due) else None,
            "last_error": self.last_error.message if self.last_error else None,
            "error_code": self.last_error.code if self.last_error else None,
            **self._login_end(tok, now),
        }
        if self.profile.auth_method in ("private_key_jwt", "tls_client_auth", "client_assertion_file"):
            out["client_auth"] = assertions.status(self.profile, self._client_keys(), wall)
        return out

    def _login_end(self, tok: TokenSet | None, now: float) -> dict[str, Any]:
        """When this login ends: its refresh token's deadline (None: no deadline, or no refresh
        token); ``final`` once the IdP's SSO Session Max holds it (a refresh no longer moves it);
        ``offline``: an offline token (scope offline_access)."""
        deadline = tok.refresh_expires_at if tok is not None and tok.refresh_token is not None else None
        return {
            "login_ends_in": round(deadline - now, 3) if deadline is not None else None,
            "login_end_final": deadline is not None and self._session_capped,
            "offline": tok is not None and tok.scope is not None and "offline_access" in tok.scope.split(),
        }

    def _client_keys(self) -> Secret | assertions.Unknown | None:
        """The stored client key set, for ``status``; ``UNKNOWN`` when it cannot be read now."""
        if self.profile.auth_method != "private_key_jwt":
            return None
        try:
            return self.store.credentials(self.profile.name).client_keys
        except BrokerError:
            return assertions.UNKNOWN


def _client_cert(profile: Profile) -> ClientCert | None:
    """The certificate this profile's client presents on the TLS connection (tls_client_auth)."""
    if profile.auth_method != "tls_client_auth" or profile.client_cert is None:
        return None
    return ClientCert(profile.client_cert, profile.client_key)


async def _outcome(work: Awaitable[TokenSet]) -> Outcome:
    """What an attempt ends with: its tokens, or the error that stands for its failure. Anything
    else is a bug and propagates (the registry's supervisor restarts the session's task)."""
    try:
        return await work
    except (BrokerError, UpstreamFault, ConfigError) as exc:
        return exc
