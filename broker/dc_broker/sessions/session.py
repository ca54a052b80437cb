"""One ``Session`` per profile: the current token, its refresh task, single-flight, and the driver of
the grant flows.

A session owns exactly one login. Its background task (``run``) refreshes ahead of expiry as
``policy`` says, retries with backoff when the IdP fails, and is the only code that talks to
the IdP for this profile, so there is never more than one refresh in flight per login: callers that
need a token the current one cannot satisfy wake the task and wait for the *round* in progress,
sharing its result (single-flight). Reads that the current token satisfies never wait (``peek``).

What to send and what an answer means is decided by the pure flows in ``flows`` (credential
order, narrowing, discovery, device login); this module only drives them (``_drive``: send, clock,
sleep). The state moves only through ``states.next_state`` (``_event``). One place accepts
new tokens (``_accept``: stored before the old refresh token is dropped, then current), one place
schedules the next attempt (``_due_at``, from ``policy``: refresh ahead, floor, backoff, demand
probes). ``settled()`` waits until no attempt is in flight (the daemon's stop path).

Time comes from ``clock`` (``trio.current_time`` by default, so trio's MockClock drives it in tests).
This module never builds an HTTP request nor parses an answer itself.
"""

from __future__ import annotations

import hmac
import logging
import math
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any, Final, TypeVar

import trio

from dc_broker.config import Profile
from dc_broker.errors import RecordCorrupt, UpstreamFault, UpstreamGarbage, UpstreamTransient
from dc_broker.idp import oidc
from dc_broker.idp.oidc import Endpoints, HttpRequest
from dc_broker.idp.transport import IdpTransport
from dc_broker.secret import Secret
from dc_broker.sessions import flows, loopback, policy
from dc_broker.sessions.flows import Answer, AwaitRedirect, Flow, Login, LoginLost, OpenBrowser, ShowCode, Sleep
from dc_broker.sessions.policy import RefreshPolicy
from dc_broker.sessions.states import WAITING_FOR_PERSON, Event, State, next_state
from dc_broker.store import SecretStore
from dc_broker.tokens import Credentials, TokenSet
from dc_token.errors import BrokerError, CredentialsRejected, Locked, LoginRequired, UpstreamError, UpstreamUnavailable

log = logging.getLogger("dc_broker.sessions")
T = TypeVar("T")

#: longest a caller waits for a refresh round before getting upstream_unavailable
DEFAULT_WAIT_LIMIT: Final = 30.0
#: how long a browser login waits for the browser to come back
BROWSER_LOGIN_TIMEOUT: Final = 300.0


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
        self._fingerprint = profile.login_fingerprint()  # whom stored tokens are for (never restore others)
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
        self._last_attempt_at = -math.inf
        self._failed_at = -math.inf
        #: the IdP's Retry-After: not even a caller's probe goes before it
        self._told_until = -math.inf
        self._last_forced_at: float | None = None
        # the last refresh did not push the refresh token's deadline out: the IdP session is at its
        # SSO Session Max, so refreshing again buys nothing; re-login with the primary credential
        self._session_capped = False
        #: the refresh-token life the IdP granted below SSO Session Max (its idle timeout)
        self._refresh_life: float | None = None
        self._endpoints: Endpoints | None = oidc.static_endpoints(profile)
        #: (the profile it was worked out for, the proxy its IdP requests go through as shown)
        self._via: tuple[Profile, str | None] | None = None
        self._wake = trio.Event()
        self._round = trio.Event()
        #: cancelled when the profile is removed at run time
        self.cancel_scope = trio.CancelScope()
        #: set (and replaced) whenever a new token arrives or the settings readers use change
        #: (``_announce``); ``watch`` and the token files wait on it
        self.token_changed = trio.Event()
        #: a caller is waiting for a token the current one cannot give
        self._demanded = False
        #: config or secrets changed while an attempt was in flight
        self._changed_meanwhile = False
        #: held while this login's refresh token is in use at the IdP: one use at a time (rotation)
        self._login_lock = trio.Lock()
        self.wall_clock = wall_clock
        self._restore()

    def __repr__(self) -> str:
        return f"Session({self.profile.name!r}, state={self.state.value})"

    def _event(self, event: Event) -> None:
        self.state = next_state(self.state, event)

    def _restore(self) -> None:
        """Pick up tokens a previous run stored, so a restart serves at once and logs nobody in."""
        if self.parent is not None:
            return
        try:
            saved = self.store.saved_tokens(self.profile.name)
        except Locked as exc:  # said once for all profiles by the daemon; unlock restores
            self.last_error = Locked(exc.message)
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
        tokens = _capped(shift_times(saved, self.clock() - self.wall_clock()))
        if tokens.expires_at > self.clock() or tokens.refresh_usable(self.clock()):
            self.token = tokens
            self.last_refresh_at = tokens.obtained_at
            if tokens.expires_at > self.clock():
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
        probe_at = policy.probe_at(
            self.policy,
            failed_at=self._failed_at,
            backoff_until=self._backoff_until,
            told_until=self._told_until,
        )
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
        self.next_attempt_at = now
        self._wake.set()
        return True

    def credentials_changed(self, *, relogin: bool = False) -> None:
        """Config or secrets changed: leave rejected/login_required and try again now. With ``relogin``
        the current login is dropped, so the next grant proves the new credentials."""
        if relogin:
            self.token = None
        self.failures = 0
        self._backoff_until = self._told_until = -math.inf
        self.next_attempt_at = self.clock()
        if self.state in WAITING_FOR_PERSON:
            self.last_error = None
        # an attempt in flight may have read the old credentials: if it ends waiting for a person,
        # it is tried again with the new ones
        self._changed_meanwhile = self.state is State.REFRESHING
        self._event(Event.RETRY)
        self._wake.set()

    def reconfigure(self, profile: Profile) -> None:
        """The profile's settings changed (same name). A change of who may use or change it, or of
        its token files, applies at once and keeps the login (``Profile.same_login``); the sink task
        is woken to look again. Any other change means new endpoints and a new attempt now."""
        if self.profile.same_login(profile):
            self.profile = profile
            self._announce()  # the token files' task rereads profile.sinks; watchers see no new token
            return
        self.profile = profile
        self._endpoints = oidc.static_endpoints(profile)
        self.credentials_changed()

    async def settled(self) -> None:
        """Return once no attempt is in flight (at once if none is)."""
        while self.state is State.REFRESHING:
            await self._round.wait()

    # ------------------------------------------------------------ the background task

    def _due_at(self) -> float:
        """The one place that says when the next attempt starts."""
        allowed = policy.attempt_allowed_at(
            self.policy,
            last_attempt_at=self._last_attempt_at,
            failed_at=self._failed_at,
            backoff_until=self._backoff_until,
            told_until=self._told_until,
            demanded=self._demanded,
        )
        return allowed if self._demanded else max(self.next_attempt_at, allowed)

    async def run(self, *, first_attempt_delay: float = 0.0) -> None:
        """Keep this profile's token fresh until cancelled."""
        now = self.clock()
        tok = self.token
        self.next_attempt_at = now + first_attempt_delay
        if tok is not None and tok.expires_at > now:  # restored: keep its schedule unless already due
            self.next_attempt_at = max(self._refresh_time(tok, capped=False), self.next_attempt_at)
        while True:
            with trio.move_on_at(self._due_at()):
                await self._wake.wait()
            self._wake = trio.Event()
            if self.state in WAITING_FOR_PERSON:
                self._demanded = False
                self._finish_round()
                self.next_attempt_at = math.inf
                continue
            if self.clock() < self._due_at():
                continue  # woken to re-arm the timer (a login was adopted), or too early for a probe
            self._demanded = False
            await self._attempt()
            self._demanded = False  # callers that joined during the attempt were served by its round

    def _finish_round(self) -> None:
        done, self._round = self._round, trio.Event()
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
        self._last_attempt_at = self.clock()
        self._changed_meanwhile = False
        self._event(Event.START)
        try:
            if self.parent is not None:
                await self._attempt_once()
            else:
                # held until the new refresh token is stored *and* current: a narrowing call must
                # never pick up the one this refresh just used (with rotation, that kills the session)
                async with self._login_lock:
                    await self._attempt_once()
        finally:
            if self.state is State.REFRESHING:  # cancelled mid-attempt: the outcome is unknown
                self._event(Event.FAILED_STALE if self._token_valid() else Event.FAILED)
            if self._changed_meanwhile and self.state in (State.LOGIN_REQUIRED, State.REJECTED):
                self.credentials_changed()
            self._finish_round()

    def _token_valid(self) -> bool:
        return self.token is not None and self.token.expires_at > self.clock()

    async def _attempt_once(self) -> None:
        try:
            if self.parent is not None:
                tokens = await self.parent.narrow(self.profile.scope or "")
            else:
                tokens = await self._obtain()
        except Locked as exc:
            self.last_error = exc
            self.next_attempt_at = math.inf
            self._event(Event.LOCK)
            log.debug("profile %s: waiting for `dc-broker unlock`", self.profile.name)
        except (LoginRequired, CredentialsRejected) as exc:
            self.last_error = exc
            if isinstance(exc, LoginRequired) and not self._token_valid():
                self.token = None  # a corrupt record must not drop a still-valid token
            self.next_attempt_at = math.inf
            self._event(Event.NEED_LOGIN if isinstance(exc, LoginRequired) else Event.REFUSED)
            log.warning("profile %s: %s", self.profile.name, exc.message)
        except UpstreamFault as exc:
            self._on_transient(exc)
        except Exception as exc:  # a bug must not end this profile's refresh task, nor the broker
            log.exception("profile %s: refresh failed inside the broker", self.profile.name)
            self._on_transient(UpstreamTransient(f"internal error during refresh ({type(exc).__name__})"))
        else:
            if self.state is State.LOCKED:
                return  # locked meanwhile: no token stays in memory
            await self._accept(tokens, Event.GRANTED)

    async def _accept(self, tokens: TokenSet, event: Event) -> None:
        """The one place new tokens become current: stored first (durable before the old refresh
        token is dropped; stores keep wall-clock times), then served, then scheduled."""
        try:
            if self.parent is None:
                await self._save(tokens)
        except Exception:
            # keep serving from memory: with rotation the old refresh token is already dead
            log.exception("profile %s: could not store the new tokens", self.profile.name)
        if event is Event.ADOPTED:
            self._session_capped = False
            self._refresh_life = None
        # At SSO Session Max the IdP grants refresh tokens with ever shorter lives (max - elapsed);
        # below Max their life is the idle timeout, the same every time. (Comparing deadlines
        # instead misfires when a scope narrowing has just pushed the deadline.)
        life = None if tokens.refresh_expires_at is None else tokens.refresh_expires_at - tokens.obtained_at
        self._session_capped = life is not None and self._refresh_life is not None and life < self._refresh_life - 2.0
        if not self._session_capped:
            self._refresh_life = life
        self.token = tokens
        self.last_error = None
        self.failures = 0
        self._backoff_until = self._told_until = -math.inf
        self.last_refresh_at = self.clock()
        self.refreshes += 1
        self.next_attempt_at = self._refresh_time(tokens, capped=self._session_capped)
        self._event(event)
        self._announce()

    def _announce(self) -> None:
        """Wake everyone waiting on ``token_changed`` (a new token, or new settings to look at)."""
        self.token_changed.set()
        self.token_changed = trio.Event()

    def _on_transient(self, exc: UpstreamFault) -> None:
        now = self.clock()
        self.failures += 1
        delay = policy.backoff_delay(self.policy, self.failures, self.rng.random(), exc.retry_after)
        self._backoff_until = now + delay
        self._failed_at = now
        self._told_until = now + min(exc.retry_after, self.policy.backoff_cap) if exc.retry_after else -math.inf
        self.next_attempt_at = self._backoff_until
        wrapped: BrokerError
        if isinstance(exc, UpstreamGarbage):
            wrapped = UpstreamError(f"profile {self.profile.name!r}: {exc}", retry_after=delay)
        else:
            wrapped = UpstreamUnavailable(f"profile {self.profile.name!r}: {exc}", retry_after=delay)
        self.last_error = wrapped
        self._event(Event.FAILED_STALE if self._token_valid() else Event.FAILED)
        log.warning("profile %s: refresh failed (%s); retry %d in %.1f s", self.profile.name, exc, self.failures, delay)

    # ------------------------------------------------------------ driving the flows

    async def _drive(self, flow: Flow[T], on_lost: Callable[[LoginLost], None] | None = None) -> T:
        """Run a pure flow to its end: send its requests, answer its sleeps, report a lost login."""
        answer: object = None
        try:
            while True:
                try:
                    step = flow.send(answer)
                except StopIteration as stop:
                    result: T = stop.value
                    return result
                answer = await self._do(step, on_lost)
        finally:
            flow.close()

    async def _do(self, step: object, on_lost: Callable[[LoginLost], None] | None) -> object:
        if isinstance(step, HttpRequest):
            self.idp_requests += 1
            sent_at = self.clock()  # the IdP issued its answer after this: lifetimes count from here
            return Answer(await self._send(step), sent_at)
        if isinstance(step, Sleep):
            await trio.sleep(step.seconds)
            return self.clock()
        if isinstance(step, LoginLost):
            log.info("profile %s: refresh token refused (%s); falling back", self.profile.name, step.why)
            if on_lost is not None:
                on_lost(step)
            return None
        raise TypeError(f"this driver cannot perform {step!r}")

    def _shown_route(self) -> str | None:
        """The proxy this profile's IdP requests go through, as shown (None: direct); worked out once
        per profile settings, since ``status`` asks for every profile each time."""
        if self._via is None or self._via[0] is not self.profile:
            url = self.profile.static_token_url() or self.profile.issuer or ""
            self._via = (self.profile, self.idp.via(url, self.profile.proxy))
        return self._via[1]

    async def _send(self, req: HttpRequest) -> oidc.HttpResponse:
        """One request to this profile's IdP, with its CA bundle and through its proxy."""
        return await self.idp.send(req, ca_bundle=self.profile.ca_bundle, proxy=self.profile.proxy)

    def _forget_login(self, _: LoginLost) -> None:
        self.token = None

    def _credentials(self) -> Credentials:
        return self.store.credentials(self.profile.name)

    async def _login(self, creds: Credentials | None = None) -> Login:
        endpoints = await self._resolve_endpoints()  # first: credentials may change meanwhile
        creds = self._credentials() if creds is None else creds
        now = self.clock()
        tok = self.token
        refresh_token = tok.refresh_token if tok is not None and tok.refresh_usable(now) else None
        if refresh_token is None and tok is None:
            refresh_token = creds.refresh_token
        return Login(self.profile, creds, endpoints, refresh_token, prefer_primary=self._session_capped)

    async def _obtain(self) -> TokenSet:
        return await self._drive(flows.obtain(await self._login()), self._forget_login)

    async def _save(self, tokens: TokenSet) -> None:
        stored = replace(shift_times(tokens, self.wall_clock() - self.clock()), issued_for=self._fingerprint)
        await self.store.save_tokens(self.profile.name, stored)

    async def _resolve_endpoints(self) -> Endpoints:
        if self._endpoints is None:
            issuer = self.profile.issuer
            assert issuer is not None  # config validation guarantees server+tenant, token_url or issuer
            self._endpoints = await self._drive(flows.discover(self.profile, issuer))
        return self._endpoints

    # ------------------------------------------------------------ logins outside the refresh task

    async def narrow(self, scope: str) -> TokenSet:
        """A token for ``scope`` from this login (``flows.narrow``). A refresh token the IdP rotates on
        the way is adopted by this login, stored first, so the chain of refresh tokens stays single."""
        if self.profile.grant == "client_credentials":
            return await self._drive(flows.narrow(await self._login(), scope))
        await self.get(0.0)  # this login must exist first
        async with self._login_lock:
            login = await self._login()
            if login.refresh_token is None or self.token is None:
                raise LoginRequired(flows.login_message(self.profile))
            tok = self.token

            def renew(_: LoginLost) -> None:  # this login's refresh token is dead: let it recover
                self.next_attempt_at = self.clock()
                self._wake.set()

            new = await self._drive(flows.narrow(login, scope), renew)
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
        """The OAuth device authorization grant (``flows.device_login``), for a person at another
        screen: yields the code to show them, then the outcome; the new login replaces this session's
        tokens only once it succeeded."""
        name = self.profile.name
        if self.profile.grant == "client_credentials":
            raise CredentialsRejected(
                f"profile {name!r} uses client credentials: the broker signs in with the stored client "
                f"secret, so there is nothing to log in; to replace the secret, `dc-broker remove {name}` "
                f"and `dc-broker add {name} ...` again"
            )
        creds = self._credentials_or_none()
        flow = flows.device_login(self.profile, creds, await self._resolve_endpoints())

        def show(step: ShowCode) -> dict[str, Any]:
            auth = step.authorization
            return {
                "profile": name,
                "verification_uri": auth.verification_uri,
                "verification_uri_complete": auth.verification_uri_complete,
                "user_code": auth.user_code,
                "expires_in": auth.expires_at - self.clock(),
            }

        async for message in self._login_with_person(flow, {ShowCode: show}):
            yield message

    async def browser_login(self) -> AsyncIterator[dict[str, Any]]:
        """Authorization code + PKCE (``flows.browser_login``) with a one-shot listener on a random
        127.0.0.1 port: yields the URL to open, then the outcome once the browser came back."""
        name = self.profile.name
        creds = self._credentials_or_none()
        endpoints = await self._resolve_endpoints()
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

        def show(step: OpenBrowser) -> dict[str, Any]:
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
            async for message in self._login_with_person(flow, {OpenBrowser: show}, {AwaitRedirect: redirect}):
                yield message
        finally:
            await listener.aclose()

    async def _login_with_person(
        self,
        flow: Flow[TokenSet],
        shown: dict[type, Callable[[Any], dict[str, Any]]],
        waits: dict[type, Callable[[Any], Awaitable[object]]] | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Drive an interactive login flow: a step for the person (``shown``: its message) is yielded,
        a step with its own wait (``waits``) awaited, every other step done as for any grant; the
        flow's tokens replace this session's login only once it has succeeded."""
        answer: object = None
        try:
            while True:
                try:
                    step = flow.send(answer)
                except StopIteration as stop:
                    tokens: TokenSet = stop.value
                    break
                if type(step) in shown:
                    yield shown[type(step)](step)
                    answer = None
                elif waits and type(step) in waits:
                    answer = await waits[type(step)](step)
                else:
                    answer = await self._do(step, None)
        finally:
            flow.close()
        await self.adopt_login(tokens)
        yield self.logged_in(tokens)

    def logged_in(self, tokens: TokenSet) -> dict[str, Any]:
        """The last message of a login stream: the profile is logged in, for this long."""
        return {"profile": self.profile.name, "logged_in": True, "expires_in": tokens.expires_at - self.clock()}

    def _credentials_or_none(self) -> Credentials:
        """The stored credentials; none if the record is corrupt (a login replaces it)."""
        try:
            return self._credentials()
        except RecordCorrupt:
            return Credentials()

    async def password_login(self, password: Secret) -> TokenSet:
        """`dc-broker login` with a password: checked at the IdP first; only once it is accepted does
        it replace the stored password and the current login (a wrong one changes nothing)."""
        creds = self._credentials_or_none()
        async with self._login_lock:
            login = await self._login(creds)
            tokens = await self._drive(flows.password_login(login, password))
        self.store.set_credentials(self.profile.name, replace(creds, password=password))
        await self.adopt_login(tokens)
        return tokens

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
        self.next_attempt_at = self._refresh_time(tok, capped=False)
        self._event(Event.RESTORED)
        self._wake.set()  # re-arm the refresh timer

    def lock_out(self) -> None:
        """The vault was locked: drop the token from memory and wait for `dc-broker unlock`."""
        self.token = None
        self.last_error = Locked("the vault is locked; run `dc-broker unlock`")
        self.next_attempt_at = math.inf
        self._event(Event.LOCK)

    async def logout(self) -> bool:
        """Revoke the login at the IdP (best effort: its refresh token, or the access token where
        there is none) and forget it. The client secret stays (it is not the login), except for
        client credentials, where it is. Returns whether the IdP confirmed the revocation."""
        name = self.profile.name
        revoked = False
        async with self._login_lock:
            tok = self.token
            creds = self._credentials_or_none()
            if tok is not None:
                try:
                    endpoints = await self._resolve_endpoints()
                    if endpoints.revocation:
                        client = oidc.client_of(self.profile, creds.client_secret)
                        target, hint = (
                            (tok.refresh_token, "refresh_token")
                            if tok.refresh_token is not None
                            else (tok.access_token, "access_token")
                        )
                        self.idp_requests += 1
                        resp = await self._send(oidc.build_revoke(endpoints.revocation, client, target, hint))
                        revoked = 200 <= resp.status < 300
                except (UpstreamFault, BrokerError) as exc:
                    log.warning("profile %s: could not revoke at the identity provider: %s", name, exc)
            await self.store.forget_tokens(name)
            keep = None if self.profile.grant == "client_credentials" else creds.client_secret
            self.store.set_credentials(name, Credentials(client_secret=keep))
            self.token = None
            self.last_error = LoginRequired(flows.login_message(self.profile))
            self.next_attempt_at = math.inf
            self._event(Event.LOGOUT)
        log.info("profile %s: logged out (revoked at the IdP: %s)", name, revoked)
        return revoked

    async def adopt_login(self, tokens: TokenSet) -> None:
        """A login made outside the refresh task (device flow, password login) becomes this session's."""
        async with self._login_lock:
            await self._accept(tokens, Event.ADOPTED)
            self._wake.set()  # the refresh task picks up the new schedule

    # ------------------------------------------------------------ reporting

    def status(self, now: float, wall_now: float | None = None) -> dict[str, Any]:
        wall = time.time() if wall_now is None else wall_now
        tok = self.token
        out: dict[str, Any] = {
            "profile": self.profile.name,
            "state": self.effective_state(now).value,
            "grant": self.profile.grant,
            "idp": self.profile.describe(),
            "via": self._shown_route(),
            "expires_in": round(tok.expires_at - now, 3) if tok else None,
            "refreshes": self.refreshes,
            "idp_requests": self.idp_requests,
            "last_refresh": round(wall - (now - self.last_refresh_at), 3) if self.last_refresh_at is not None else None,
            "next_refresh_in": round(self.next_attempt_at - now, 3) if math.isfinite(self.next_attempt_at) else None,
            "last_error": self.last_error.message if self.last_error else None,
        }
        return out
