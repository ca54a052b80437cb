"""One ``Session`` per profile: the current token, its refresh task, single-flight and the state machine.

A session owns exactly one login. Its background task (``run``) refreshes ahead of expiry as
``dc_broker.policy`` says, retries with backoff when the IdP fails, and is the only code that talks to
the IdP for this profile, so there is never more than one refresh in flight per login: callers that
need a token the current one cannot satisfy wake the task and wait for the *round* in progress,
sharing its result (single-flight). Reads that the current token satisfies never wait (``peek``).

States (``State``) and the allowed moves between them are plain data (``TRANSITIONS``):

    empty ──► refreshing ──► fresh ──► refreshing ──► fresh ...
                  │  ▲          ▲          │
                  │  └── stale ◄┼──────────┤  (refresh failed, current token still valid)
                  │  ┌─ unavailable ◄──────┘  (refresh failed, no valid token)
                  ▼  ▼
          login_required / rejected / locked   (a person must act; no retries until they do)

Credential order for a refresh: the refresh token (if alive) -> on ``invalid_grant`` the stored
password or client secret -> with neither, ``login_required``. OAuth errors on a primary grant
(bad password, bad secret, client misconfigured) mean ``rejected``: retrying cannot help, so the
session waits for a config or credential change. New tokens go to the store (``save_tokens``)
before the old refresh token is dropped.

Time comes from ``clock`` (``trio.current_time`` by default, so trio's MockClock drives it in tests).
"""

from __future__ import annotations

import hmac
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from enum import StrEnum
from typing import Any, Final

import trio

from dc_broker import oidc, policy
from dc_broker.config import Profile
from dc_broker.oidc import Endpoints, IdpTransport, TokenSet
from dc_broker.policy import RefreshPolicy
from dc_broker.store import Credentials, SecretStore
from dc_token.errors import (
    BrokerError,
    CredentialsRejected,
    Locked,
    LoginRequired,
    OAuthError,
    UnknownProfile,
    UpstreamError,
    UpstreamFault,
    UpstreamGarbage,
    UpstreamTransient,
    UpstreamUnavailable,
)

log = logging.getLogger("dc_broker.sessions")


class State(StrEnum):
    EMPTY = "empty"
    REFRESHING = "refreshing"
    FRESH = "fresh"
    STALE = "stale"
    UNAVAILABLE = "unavailable"
    LOGIN_REQUIRED = "login_required"
    REJECTED = "rejected"
    LOCKED = "locked"


_S = State
_MOVES: Final[dict[State, frozenset[State]]] = {
    _S.EMPTY: frozenset({_S.REFRESHING, _S.LOGIN_REQUIRED, _S.FRESH}),  # -> fresh: restored from the store
    _S.REFRESHING: frozenset({_S.FRESH, _S.STALE, _S.UNAVAILABLE, _S.LOGIN_REQUIRED, _S.REJECTED, _S.LOCKED}),
    _S.FRESH: frozenset({_S.REFRESHING, _S.EMPTY}),
    _S.STALE: frozenset({_S.REFRESHING, _S.UNAVAILABLE, _S.EMPTY}),
    _S.UNAVAILABLE: frozenset({_S.REFRESHING, _S.EMPTY}),
    _S.LOGIN_REQUIRED: frozenset({_S.REFRESHING, _S.EMPTY}),
    _S.REJECTED: frozenset({_S.REFRESHING, _S.EMPTY}),
    _S.LOCKED: frozenset({_S.REFRESHING, _S.EMPTY}),
}
#: the allowed moves; from any state, a person's interactive login (device flow) makes a session
#: fresh, `dc-broker lock` locked and `dc-broker logout` login_required
TRANSITIONS: Final[dict[State, frozenset[State]]] = {
    state: moves | {_S.FRESH, _S.LOCKED, _S.LOGIN_REQUIRED} for state, moves in _MOVES.items()
}
#: states in which no background retry happens until a person changes something
WAITING_FOR_PERSON: Final = frozenset({State.LOGIN_REQUIRED, State.REJECTED, State.LOCKED})

#: distinct per-request scopes one profile may serve at once
MAX_SCOPES_PER_PROFILE: Final = 16

#: longest a caller waits for a refresh round before getting upstream_unavailable
DEFAULT_WAIT_LIMIT: Final = 30.0


def shift_times(tokens: TokenSet, delta: float) -> TokenSet:
    """The same token set on another clock (``delta`` = other clock - this clock)."""
    return replace(
        tokens,
        obtained_at=tokens.obtained_at + delta,
        expires_at=tokens.expires_at + delta,
        refresh_expires_at=None if tokens.refresh_expires_at is None else tokens.refresh_expires_at + delta,
    )


class Session:
    """The live state of one profile's login."""

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
    ) -> None:
        #: for a per-request scope: the profile's main session, whose login this one narrows
        self.parent = parent
        self.profile = profile
        self.store = store
        self.idp = idp
        self.policy = refresh_policy
        self.clock = clock
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self.wait_limit = wait_limit
        self.state = State.EMPTY
        self.token: TokenSet | None = None
        self.last_error: BrokerError | None = None
        self.last_refresh_at: float | None = None
        self.refreshes = 0
        self.idp_requests = 0
        self.failures = 0
        self.next_attempt_at = math.inf
        self._backoff_until = -math.inf
        self._last_forced_at: float | None = None
        # the last refresh did not push the refresh token's deadline out: the IdP session is at its
        # SSO Session Max, so refreshing again buys nothing; re-login with the primary credential
        self._session_capped = False
        #: the refresh-token life the IdP granted below SSO Session Max (its idle timeout)
        self._refresh_life: float | None = None
        self._endpoints: Endpoints | None = oidc.static_endpoints(profile)
        self._wake = trio.Event()
        self._round = trio.Event()
        #: cancelled when the profile is removed at run time
        self.cancel_scope = trio.CancelScope()
        #: set (and replaced) whenever a new token arrives; ``watch`` waits on it
        self.token_changed = trio.Event()
        #: a caller is waiting for a token the current one cannot give
        self._demanded = False
        #: held while this login's refresh token is in use at the IdP: one use at a time (rotation)
        self._login_lock = trio.Lock()
        self.wall_clock = wall_clock
        self._restore()

    def __repr__(self) -> str:
        return f"Session({self.profile.name!r}, state={self.state.value})"

    def _restore(self) -> None:
        """Pick up tokens a previous run stored, so a restart serves at once and logs nobody in."""
        if self.parent is not None:
            return
        try:
            saved = self.store.saved_tokens(self.profile.name)
        except Locked:
            return  # said once for all profiles by the daemon; unlock restores
        except BrokerError as exc:  # e.g. this record is corrupt
            log.warning("profile %s: stored tokens not usable: %s", self.profile.name, exc.message)
            return
        if saved is None:
            return
        tokens = shift_times(saved, self.clock() - self.wall_clock())
        if tokens.expires_at > self.clock() or tokens.refresh_usable(self.clock()):
            self.token = tokens
            self.last_refresh_at = tokens.obtained_at
            if tokens.expires_at > self.clock():
                self._move(State.FRESH)

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
        """``state``, except that a stale session whose token has since expired is unavailable."""
        if self.state is State.STALE and (self.token is None or self.token.expires_at <= now):
            return State.UNAVAILABLE
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
            round_done = self._round
            self._demanded = True
            self._wake.set()
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
        if self.state in WAITING_FOR_PERSON and self.last_error is not None:
            raise self.last_error
        if now < self._backoff_until:
            retry_after = self._backoff_until - now
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
        self.next_attempt_at = now
        self._wake.set()
        return True

    def credentials_changed(self, *, relogin: bool = False) -> None:
        """Config or secrets changed: leave rejected/login_required and try again now. With ``relogin``
        the current login is dropped, so the next grant proves the new credentials."""
        if relogin:
            self.token = None
        self.failures = 0
        self._backoff_until = -math.inf
        self.next_attempt_at = self.clock()
        if self.state in WAITING_FOR_PERSON:
            self._move(State.EMPTY)
            self.last_error = None
        self._wake.set()

    # ------------------------------------------------------------ the background task

    async def run(self, *, first_attempt_delay: float = 0.0) -> None:
        """Keep this profile's token fresh until cancelled."""
        now = self.clock()
        tok = self.token
        self.next_attempt_at = now + first_attempt_delay
        if tok is not None and tok.expires_at > now:  # restored: keep its schedule unless already due
            due = policy.refresh_at(
                self.policy,
                obtained_at=tok.obtained_at,
                expires_at=tok.expires_at,
                refresh_expires_at=tok.refresh_expires_at,
                rand=self.rng.random(),
            )
            self.next_attempt_at = max(due, self.next_attempt_at)
        while True:
            with trio.move_on_at(self.next_attempt_at):
                await self._wake.wait()
            if self.state in WAITING_FOR_PERSON:
                self._finish_round()
                self._wake = trio.Event()
                self.next_attempt_at = math.inf
                continue
            if self.clock() < self._backoff_until:
                # woken during backoff: waiters were told retry_after; nothing to do
                self._wake = trio.Event()
                continue
            if not self._demanded and self.clock() < self.next_attempt_at:
                self._wake = trio.Event()  # woken only to re-arm the timer (a login was adopted)
                continue
            self._demanded = False
            await self._attempt()
            self._wake = trio.Event()
            self._demanded = False  # callers that joined during the attempt were served by its round

    def _finish_round(self) -> None:
        done, self._round = self._round, trio.Event()
        done.set()

    def _move(self, new: State) -> None:
        if new is not self.state and new not in TRANSITIONS[self.state]:
            raise AssertionError(f"session {self.profile.name}: illegal move {self.state} -> {new}")
        self.state = new

    async def _attempt(self) -> None:
        self._move(State.REFRESHING)
        try:
            if self.parent is not None:
                await self._attempt_once()
            else:
                # held until the new refresh token is stored *and* current: a narrowing call must
                # never pick up the one this refresh just used (with rotation, that kills the session)
                async with self._login_lock:
                    await self._attempt_once()
        finally:
            self._finish_round()

    async def _attempt_once(self) -> None:
        try:
            if self.parent is not None:
                tokens = await self.parent.narrow(self.profile.scope or "")
            else:
                tokens = await self._obtain()
        except Locked as exc:
            self.last_error = exc
            self.next_attempt_at = math.inf
            self._move(State.LOCKED)
            log.debug("profile %s: waiting for `dc-broker unlock`", self.profile.name)
        except (LoginRequired, CredentialsRejected) as exc:
            self.last_error = exc
            self.token = None if isinstance(exc, LoginRequired) else self.token
            self.next_attempt_at = math.inf
            self._move(State.LOGIN_REQUIRED if isinstance(exc, LoginRequired) else State.REJECTED)
            log.warning("profile %s: %s", self.profile.name, exc.message)
        except UpstreamFault as exc:
            self._on_transient(exc)
        except Exception as exc:  # a bug must not end this profile's refresh task, nor the broker
            log.exception("profile %s: refresh failed inside the broker", self.profile.name)
            self._on_transient(UpstreamTransient(f"internal error during refresh ({type(exc).__name__})"))
        else:
            try:
                # durable before the old refresh token is dropped; stores keep wall-clock times
                if self.parent is None:
                    await self._save(tokens)
            except Exception:
                # keep serving from memory: with rotation the old refresh token is already dead
                log.exception("profile %s: could not store the new tokens", self.profile.name)
            now = self.clock()
            # At SSO Session Max the IdP grants refresh tokens with ever shorter lives (max - elapsed);
            # below Max their life is the idle timeout, the same every time. (Comparing deadlines
            # instead misfires when a scope narrowing has just pushed the deadline.)
            life = None if tokens.refresh_expires_at is None else tokens.refresh_expires_at - tokens.obtained_at
            self._session_capped = (
                life is not None and self._refresh_life is not None and life < self._refresh_life - 2.0
            )
            if not self._session_capped:
                self._refresh_life = life
            self.token = tokens
            self.last_error = None
            self.failures = 0
            self._backoff_until = -math.inf
            self.last_refresh_at = now
            self.refreshes += 1
            self.next_attempt_at = policy.refresh_at(
                self.policy,
                obtained_at=tokens.obtained_at,
                expires_at=tokens.expires_at,
                # at session max the refresh deadline cannot move: schedule on the access token alone
                refresh_expires_at=None if self._session_capped else tokens.refresh_expires_at,
                rand=self.rng.random(),
            )
            self._move(State.FRESH)
            self.token_changed.set()
            self.token_changed = trio.Event()

    def _on_transient(self, exc: UpstreamFault) -> None:
        now = self.clock()
        self.failures += 1
        delay = policy.backoff_delay(self.policy, self.failures, self.rng.random(), exc.retry_after)
        self._backoff_until = now + delay
        self.next_attempt_at = self._backoff_until
        wrapped: BrokerError
        if isinstance(exc, UpstreamGarbage):
            wrapped = UpstreamError(f"profile {self.profile.name!r}: {exc}", retry_after=delay)
        else:
            wrapped = UpstreamUnavailable(f"profile {self.profile.name!r}: {exc}", retry_after=delay)
        self.last_error = wrapped
        valid = self.token is not None and self.token.expires_at > now
        self._move(State.STALE if valid else State.UNAVAILABLE)
        log.warning(
            "profile %s: refresh failed (%s); retry %d in %.1f s",
            self.profile.name,
            exc,
            self.failures,
            delay,
        )

    # ------------------------------------------------------------ one refresh, credential by credential

    async def _obtain(self) -> TokenSet:
        name = self.profile.name
        creds = self.store.credentials(name)
        endpoints = await self._resolve_endpoints()
        client = oidc.client_of(self.profile, creds.client_secret)
        now = self.clock()
        tok = self.token
        refresh_token = tok.refresh_token if tok is not None and tok.refresh_usable(now) else None
        if refresh_token is None and tok is None:
            refresh_token = creds.refresh_token
        if self._session_capped and self._primary_grant_possible(creds):
            refresh_token = None  # a fresh login now beats refreshing a session that is about to end
        scope = self.profile.scope
        if refresh_token is not None:
            try:
                return await self._grant(oidc.build_refresh(endpoints.token, client, refresh_token))
            except OAuthError as exc:
                if exc.error != "invalid_grant":
                    raise self._rejected(exc) from None
                log.info("profile %s: refresh token refused (%s); falling back", name, exc.description)
                self.token = None
        if not self._primary_grant_possible(creds):
            raise LoginRequired(self._login_message())
        if self.profile.grant == "password":
            assert creds.password is not None and self.profile.username
            req = oidc.build_password(endpoints.token, client, self.profile.username, creds.password, scope)
        else:
            req = oidc.build_client_credentials(endpoints.token, client, scope)
        try:
            return await self._grant(req)
        except OAuthError as exc:
            raise self._rejected(exc) from None

    async def _save(self, tokens: TokenSet) -> None:
        await self.store.save_tokens(self.profile.name, shift_times(tokens, self.wall_clock() - self.clock()))

    async def narrow(self, scope: str) -> TokenSet:
        """A token for ``scope`` from this login: the refresh grant with a narrower scope (or, for
        client credentials, a grant with that scope). A refresh token the IdP rotates on the way is
        adopted by this login, stored first, so the chain of refresh tokens stays single."""
        creds = self.store.credentials(self.profile.name)
        endpoints = await self._resolve_endpoints()
        client = oidc.client_of(self.profile, creds.client_secret)
        if self.profile.grant == "client_credentials":
            if creds.client_secret is None:
                raise LoginRequired(self._login_message())
            try:
                return await self._grant(oidc.build_client_credentials(endpoints.token, client, scope))
            except OAuthError as exc:
                raise self._rejected(exc, narrowing_to=scope) from None
        await self.get(0.0)  # this login must exist first
        async with self._login_lock:
            tok = self.token
            now = self.clock()
            if tok is None or tok.refresh_token is None or not tok.refresh_usable(now):
                raise LoginRequired(self._login_message())
            try:
                new = await self._grant(oidc.build_refresh(endpoints.token, client, tok.refresh_token, scope))
            except OAuthError as exc:
                if exc.error == "invalid_grant":
                    self.next_attempt_at = now  # this login's refresh token is dead: let it recover
                    self._wake.set()
                    raise UpstreamGarbage(f"the login behind scope {scope!r} must be renewed first") from None
                raise self._rejected(exc, narrowing_to=scope) from None
            if new.refresh_token is not None and new.refresh_token != tok.refresh_token:
                adopted = replace(tok, refresh_token=new.refresh_token, refresh_expires_at=new.refresh_expires_at)
                await self._save(adopted)
                current = self.token  # may have been replaced meanwhile (invalidate): keep its other fields
                if current is not None and current.refresh_token == tok.refresh_token:
                    self.token = replace(
                        current, refresh_token=new.refresh_token, refresh_expires_at=new.refresh_expires_at
                    )
        return replace(new, refresh_token=None, refresh_expires_at=None)

    async def device_login(self) -> AsyncIterator[dict[str, Any]]:
        """The OAuth device authorization grant, for a person at another screen. Yields the code to
        show them, then polls (honouring ``interval`` and ``slow_down``) until they approve, deny, or
        the code expires; the new login replaces this session's tokens."""
        name = self.profile.name
        creds = self.store.credentials(name)
        endpoints = await self._resolve_endpoints()
        if endpoints.device is None:
            raise CredentialsRejected(
                f"profile {name!r} has no device authorization endpoint; configure it with server + tenant or issuer"
            )
        client = oidc.client_of(self.profile, creds.client_secret)
        self.idp_requests += 1
        resp = await self.idp.send(
            oidc.build_device_start(endpoints.device, client, self.profile.scope), ca_bundle=self.profile.ca_bundle
        )
        try:
            auth = oidc.parse_device_start(resp, self.clock())
        except OAuthError as exc:
            raise self._rejected(exc) from None
        yield {
            "profile": name,
            "verification_uri": auth.verification_uri,
            "verification_uri_complete": auth.verification_uri_complete,
            "user_code": auth.user_code,
            "expires_in": auth.expires_at - self.clock(),
        }
        interval = auth.interval
        while True:
            await trio.sleep(interval)
            if self.clock() >= auth.expires_at:
                raise LoginRequired(f"profile {name!r}: the login code expired; run `dc-broker login {name}` again")
            try:
                tokens = await self._grant(oidc.build_device_poll(endpoints.token, client, auth.device_code))
            except OAuthError as exc:
                if exc.error == "authorization_pending":
                    continue
                if exc.error == "slow_down":
                    interval += 5.0  # RFC 8628 3.5
                    continue
                if exc.error == "expired_token":
                    raise LoginRequired(
                        f"profile {name!r}: the login code expired; run `dc-broker login {name}` again"
                    ) from None
                if exc.error == "access_denied":
                    raise CredentialsRejected(
                        f"profile {name!r}: the login was denied at the identity provider"
                    ) from None
                raise self._rejected(exc) from None
            await self.adopt_login(tokens)
            yield {"profile": name, "logged_in": True, "expires_in": tokens.expires_at - self.clock()}
            return

    async def verify(self) -> TokenSet:
        """One grant with the stored credentials, outside the refresh task (`dc-broker add`)."""
        return await self._obtain()

    def resume(self) -> None:
        """After unlock: a stored, still-valid token is served at once and refreshed on its own schedule;
        without one, try now."""
        self.last_error = None
        if self.token is None:
            self._restore()
        tok = self.token
        now = self.clock()
        if tok is None or tok.expires_at <= now:
            self.credentials_changed()
            return
        self.next_attempt_at = policy.refresh_at(
            self.policy,
            obtained_at=tok.obtained_at,
            expires_at=tok.expires_at,
            refresh_expires_at=tok.refresh_expires_at,
            rand=self.rng.random(),
        )
        if self.state is not State.FRESH:
            self._move(State.FRESH)
        self._wake.set()  # re-arm the refresh timer

    def lock_out(self) -> None:
        """The vault was locked: drop the token from memory and wait for `dc-broker unlock`."""
        self.token = None
        self.last_error = Locked("the vault is locked; run `dc-broker unlock`")
        self.next_attempt_at = math.inf
        self._move(State.LOCKED)

    async def logout(self) -> bool:
        """Revoke the login at the IdP (best effort) and forget its secrets and tokens. Returns
        whether the IdP confirmed the revocation."""
        name = self.profile.name
        revoked = False
        async with self._login_lock:
            tok = self.token
            if tok is not None and tok.refresh_token is not None:
                try:
                    endpoints = await self._resolve_endpoints()
                    if endpoints.revocation:
                        creds = self.store.credentials(name)
                        client = oidc.client_of(self.profile, creds.client_secret)
                        resp = await self.idp.send(
                            oidc.build_revoke(endpoints.revocation, client, tok.refresh_token),
                            ca_bundle=self.profile.ca_bundle,
                        )
                        revoked = 200 <= resp.status < 300
                except (UpstreamFault, BrokerError) as exc:
                    log.warning("profile %s: could not revoke at the identity provider: %s", name, exc)
            await self.store.forget_tokens(name)
            self.store.set_credentials(name, Credentials())
            self.token = None
            self.last_error = LoginRequired(self._login_message())
            self.next_attempt_at = math.inf
            if self.state is not State.REFRESHING:  # an attempt waiting for the lock ends there itself
                self._move(State.LOGIN_REQUIRED)
        log.info("profile %s: logged out (revoked at the IdP: %s)", name, revoked)
        return revoked

    async def adopt_login(self, tokens: TokenSet) -> None:
        """A login made outside the refresh task (device flow) becomes this session's login."""
        async with self._login_lock:
            await self._save(tokens)
            self.token = tokens
            self.last_error = None
            self.failures = 0
            self._backoff_until = -math.inf
            self._session_capped = False
            self.last_refresh_at = self.clock()
            self.refreshes += 1
            self.next_attempt_at = policy.refresh_at(
                self.policy,
                obtained_at=tokens.obtained_at,
                expires_at=tokens.expires_at,
                refresh_expires_at=tokens.refresh_expires_at,
                rand=self.rng.random(),
            )
            self._move(State.FRESH)
            self.token_changed.set()
            self.token_changed = trio.Event()
            self._wake.set()  # the refresh task picks up the new schedule

    def _primary_grant_possible(self, creds: Credentials) -> bool:
        if self.profile.grant == "password":
            return creds.password is not None and bool(self.profile.username)
        return self.profile.grant == "client_credentials" and creds.client_secret is not None

    def _login_message(self) -> str:
        name = self.profile.name
        if self.profile.grant == "device":
            return f"profile {name!r}: no valid login; run `dc-broker login {name}`"
        what = "password" if self.profile.grant == "password" else "client secret"
        return f"profile {name!r}: no {what} stored and no valid login; run `dc-broker login {name}`"

    def _rejected(self, exc: OAuthError, *, narrowing_to: str | None = None) -> CredentialsRejected:
        name = self.profile.name
        if exc.error == "invalid_scope":
            scope, why = (
                (narrowing_to, "a per-request scope can only narrow the profile's own scope")
                if narrowing_to is not None
                else (self.profile.scope, "fix the profile's scope")
            )
            return CredentialsRejected(
                f"profile {name!r}: the identity provider refuses scope {scope!r} ({exc}); {why}"
            )
        if exc.error == "not_found":
            return CredentialsRejected(
                f"profile {name!r}: {self.profile.describe()} answers 404 Not Found ({exc.description}); "
                "check server, tenant, "
                "legacy_paths (Keycloak 17+ has no /auth) or issuer"
            )
        return CredentialsRejected(
            f"profile {name!r}: the identity provider refused the credentials ({exc}); "
            f"fix the profile or run `dc-broker login {name}`"
        )

    async def _grant(self, req: oidc.HttpRequest) -> TokenSet:
        self.idp_requests += 1
        resp = await self.idp.send(req, ca_bundle=self.profile.ca_bundle)
        return oidc.parse_token_response(resp, self.clock())

    async def _resolve_endpoints(self) -> Endpoints:
        if self._endpoints is None:
            issuer = self.profile.issuer
            assert issuer is not None  # config validation guarantees server+tenant, token_url or issuer
            resp = await self.idp.send(oidc.build_discovery(issuer), ca_bundle=self.profile.ca_bundle)
            try:
                self._endpoints = oidc.parse_discovery(resp, issuer)
            except OAuthError as exc:
                raise UpstreamGarbage(f"discovery at {issuer} failed: {exc}") from None
        return self._endpoints

    # ------------------------------------------------------------ reporting

    def status(self, now: float, wall_now: float | None = None) -> dict[str, Any]:
        wall = time.time() if wall_now is None else wall_now
        tok = self.token
        out: dict[str, Any] = {
            "profile": self.profile.name,
            "state": self.effective_state(now).value,
            "grant": self.profile.grant,
            "idp": self.profile.describe(),
            "expires_in": round(tok.expires_at - now, 3) if tok else None,
            "refreshes": self.refreshes,
            "idp_requests": self.idp_requests,
            "last_refresh": round(wall - (now - self.last_refresh_at), 3) if self.last_refresh_at is not None else None,
            "next_refresh_in": round(self.next_attempt_at - now, 3) if math.isfinite(self.next_attempt_at) else None,
            "last_error": self.last_error.message if self.last_error else None,
        }
        return out


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
    ) -> None:
        self.store = store
        self.idp = idp
        self.policy = refresh_policy
        self.clock = clock
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._by_name: dict[str, Session] = {
            name: Session(p, store, idp, refresh_policy=refresh_policy, clock=clock, rng=self.rng)
            for name, p in profiles.items()
        }
        self._scoped: dict[tuple[str, str], Session] = {}
        self._nursery: trio.Nursery | None = None

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
            await trio.sleep_forever()  # profiles added later (reload) start here, even after none at first

    async def _run_one(self, session: Session, delay: float) -> None:
        with session.cancel_scope:
            await session.run(first_attempt_delay=delay)

    def add(self, profile: Profile) -> Session:
        """Add (or replace the settings of) a profile at run time."""
        existing = self._by_name.get(profile.name)
        if existing is not None:
            existing.profile = profile
            existing._endpoints = oidc.static_endpoints(profile)
            existing.credentials_changed()
            return existing
        session = Session(profile, self.store, self.idp, refresh_policy=self.policy, clock=self.clock, rng=self.rng)
        self._by_name[profile.name] = session
        if self._nursery is not None:
            self._nursery.start_soon(self._run_one, session, 0.0)
        return session

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
                old = self._scoped.pop(mine[0])
                old.token = None
                old.cancel_scope.cancel()
            child = Session(
                replace(base.profile, scope=scope),
                self.store,
                self.idp,
                refresh_policy=self.policy,
                clock=self.clock,
                rng=self.rng,
                parent=base,
            )
            self._scoped[(name, scope)] = child
            if self._nursery is not None:
                self._nursery.start_soon(self._run_one, child, math.inf)  # refreshes on demand first
        return child

    def _drop_scoped(self, name: str) -> None:
        for key in [k for k in self._scoped if k[0] == name]:
            child = self._scoped.pop(key)
            child.token = None
            child.cancel_scope.cancel()

    def _all(self) -> list[Session]:
        return [*self._by_name.values(), *self._scoped.values()]

    def locked(self) -> None:
        """The vault was locked: no token stays in memory, none is served until unlock."""
        for session in self._all():
            session.lock_out()

    def unlocked(self) -> None:
        """The vault was unlocked: stored tokens are served again on their schedule."""
        for session in self._all():
            session.resume()

    def remove(self, name: str) -> None:
        """Forget a profile: its refresh task stops and its token leaves memory."""
        self._drop_scoped(name)
        session = self._by_name.pop(name, None)
        if session is not None:
            session.token = None
            session.cancel_scope.cancel()

    def reload(self, profiles: dict[str, Profile]) -> tuple[list[str], list[str], list[str]]:
        """Make the running set match ``profiles`` without dropping tokens of unchanged profiles.
        Returns (added, changed, removed) names."""
        added = [n for n in profiles if n not in self._by_name]
        changed = [n for n in profiles if n in self._by_name and self._by_name[n].profile != profiles[n]]
        removed = [n for n in self._by_name if n not in profiles]
        for name in removed:
            self.remove(name)
        for name in changed:
            self._drop_scoped(name)
        for name in added + changed:
            self.add(profiles[name])
        return added, changed, removed

    def status(self) -> list[dict[str, Any]]:
        now = self.clock()
        wall = time.time()
        return [self._by_name[n].status(now, wall) for n in sorted(self._by_name)]
