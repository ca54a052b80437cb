"""The lowest layer of a ``Session`` (``sessions.session``): what one profile's login *is*, and the
reads that never go to the IdP.

A session is built in layers, each a class over the one below, each readable with only the layers
below it in mind:

- ``base.SessionBase`` (here): the state (``sessions.states``), the current token, the schedule
  (``sessions.schedule``), the generation, what trio keeps (made when first needed), reading the
  stored tokens at start (``_restore``), and the reads callers make (``peek``, ``get``: single-flight
  on the round in progress, ``invalidate``);
- ``performing.Performing``: performing the pure flows' steps at the edge (send, sleep, a lost
  refresh token), the one place a request leaves for the IdP;
- ``outcomes.Concluding``: what an attempt's outcome does to the session (``_conclude``) and the one
  place new tokens become current (``_accept``);
- ``logins.PersonLogins``: logins outside the refresh task (device, browser, password, a per-scope
  narrowing, logout);
- ``session.Session``: what a person or the config changes (lock, unlock, new credentials, new
  settings) and the background task's attempts.
"""

from __future__ import annotations

import hmac
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final, cast

import trio

from dc_broker.config import Profile
from dc_broker.errors import ConfigError, UpstreamFault
from dc_broker.idp import oidc
from dc_broker.idp.oidc import Endpoints
from dc_broker.idp.transport import IdpTransport
from dc_broker.observe.counters import Counts
from dc_broker.secret import Secret
from dc_broker.sessions import policy
from dc_broker.sessions.policy import RefreshPolicy
from dc_broker.sessions.schedule import Schedule
from dc_broker.sessions.states import WAITING_FOR_PERSON, Event, State, next_state
from dc_broker.store import SecretStore
from dc_broker.tokens import TokenSet
from dc_token.errors import (
    BrokerError,
    Locked,
    UpstreamError,
    UpstreamUnavailable,
)

if TYPE_CHECKING:
    from dc_broker.sessions.scheduler import Scheduled, Scheduler

log = logging.getLogger("dc_broker.sessions")

#: longest a caller waits for a refresh round before getting upstream_unavailable
DEFAULT_WAIT_LIMIT: Final = 30.0
#: refresh rounds a caller joins before it is told why none brought a token it can use
GET_ROUNDS: Final = 3
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


@dataclass(frozen=True, slots=True)
class Attempt:
    """An attempt at the IdP in flight: the generation it started in, and when."""

    generation: int
    started_at: float


#: what an attempt ends with: new tokens, or the error that stands for its failure
Outcome = TokenSet | BrokerError | UpstreamFault | ConfigError


class SessionBase:
    """What one profile's login is: its state, token, schedule and generation, and the reads that
    never go to the IdP. Every slot of a ``Session`` is declared here."""

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
        "_logouts",
        "_noted",
        "_proven",
        "_refresh_life",
        "_round",
        "_secrets_to_drop",
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
        parent: SessionBase | None = None,
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
        #: per-request scope sessions narrowing this login; they forget their tokens when it changes.
        #: A dict used as a set: in the order they were made, never in the order of their addresses
        #: (what the scheduler is woken with, and so which child goes first, must not vary by run)
        self._children: dict[SessionBase, None] | None = None
        if parent is not None:
            parent.children[self] = None
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
        #: logouts so far (a person's login that began before one is not adopted after it)
        self._logouts = 0
        #: stored secrets a reload made another user's or client's while the vault was locked: dropped
        #: at unlock, before anything is tried (``Session.reconfigure``, ``resume``)
        self._secrets_to_drop: frozenset[str] = frozenset()
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
    def children(self) -> dict[SessionBase, None]:
        if self._children is None:
            self._children = {}
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
        if self.scheduler is not None:  # set by ``Scheduler.add``, whose sessions are all ``Scheduled``
            self.scheduler.wake(cast("Scheduled", self))

    def _event(self, event: Event) -> None:
        self.state = next_state(self.state, event)

    @property
    def login_fingerprint(self) -> str:
        """Whom this session's login is for (its settings' ``Profile.login_fingerprint``, worked out
        when they change): the token it holds is always this login's."""
        return self._fingerprint

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
        for _ in range(GET_ROUNDS):
            now = self.clock()
            tok = self.peek(min_ttl, now)
            if tok is not None:
                return tok
            if self.retired:  # no round will come (its caller may say why: removed, scope evicted)
                raise UpstreamUnavailable(
                    f"profile {self.profile.name!r} left the broker while this request waited; ask again",
                    retry_after=1.0,
                )
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
        if tok is None or tok.expires_at <= self.clock():  # every round's outcome was dropped: no usable token
            raise UpstreamUnavailable(
                f"profile {self.profile.name!r}: {GET_ROUNDS} refreshes in a row ended without a token, each "
                "dropped because the login changed while it was at the identity provider (a new secret, "
                "new settings, a lock, a login or a logout); ask again",
                retry_after=1.0,
            )
        raise UpstreamError(
            f"profile {self.profile.name!r}: the identity provider grants tokens too short for min_ttl "
            f"{min_ttl:g} s (last lifetime {tok.lifetime:.0f} s)"
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

    # ------------------------------------------------------------ a change of what this session is

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
            self._announce()  # token files and watchers look again: the login they served is gone
        self.schedule = self.schedule.retry(self.clock())
        if self.state in WAITING_FOR_PERSON or self.state is State.ERROR:
            self.last_error = None
        self._event(Event.RETRY)
        self._poke()

    def secrets_stored(self, fields: frozenset[str]) -> None:
        """New ``fields`` were stored for this profile (`set_secrets`): they are the new settings', so
        a drop of the old ones still pending (``_secrets_to_drop``) no longer covers them."""
        self._secrets_to_drop -= fields

    # ------------------------------------------------------------ what every layer above uses

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

    def _announce(self) -> None:
        """Wake everyone waiting on ``token_changed`` (a new token, or new settings to look at)."""
        changed, self._token_changed = self._token_changed, None
        if changed is not None:
            changed.set()
