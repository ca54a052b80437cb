"""Logins outside a session's refresh task (``PersonLogins``, the layer above ``outcomes``): a
person's device, browser or password login, a per-request scope narrowing this login, the checks
`dc-broker add` and `rotate` make, and logout. Each holds the login lock while it uses this login's
refresh token, and an IdP failure is told as the wire's error (unavailable, retry), never as a bug.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any, Final

import trio

from dc_broker.errors import UpstreamFault, UpstreamTransient
from dc_broker.idp.oidc import Endpoints
from dc_broker.secret import Secret
from dc_broker.sessions import driver, flows, loopback
from dc_broker.sessions.driver import Done
from dc_broker.sessions.flows import AwaitRedirect, Ended, Flow, LoginLost, Rotated
from dc_broker.sessions.outcomes import Concluding
from dc_broker.sessions.performing import broker_error
from dc_broker.sessions.states import Event
from dc_broker.tokens import Credentials, TokenSet
from dc_token.errors import (
    BrokerError,
    CredentialsRejected,
    Locked,
    LoginRequired,
    UnknownProfile,
    UpstreamUnavailable,
)

log = logging.getLogger("dc_broker.sessions")


#: how long a browser login waits for the browser to come back
BROWSER_LOGIN_TIMEOUT: Final = 300.0
#: the caller's own check, just before a person's login is stored: raises if it may no longer make it
Still = Callable[[], None]
#: what a person's login began for: the settings' login fingerprint and the session's logouts so far
Began = tuple[str, int]


class PersonLogins(Concluding):
    """Logins made outside the refresh task, each holding the login lock while it uses this login at
    the IdP; a new login replaces the current one only once it succeeded (``adopt_login``)."""

    __slots__ = ()

    async def narrow(self, scope: str) -> TokenSet:
        """A token for ``scope`` from this login (``flows.narrow``), never wider than asked. A refresh
        token the IdP rotates on the way is adopted by this login, stored first, so the chain of
        refresh tokens stays single."""
        if self.profile.grant == "client_credentials":
            return await self._drive(flows.narrow(await self._login(), scope))
        await self.get(0.0)  # this login must exist first
        async with self._login_lock:
            began = self._fingerprint  # whom this login is for (a reload may change it meanwhile)
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
                await self._save(new, issued_for=began)
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
        self,
        flow: Flow[TokenSet],
        show: Callable[[Any], dict[str, Any]],
        waits: Any = None,
        still: Still | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Drive an interactive login flow: each step for the person is yielded as ``show`` words it;
        the flow's tokens replace this session's login only once it has succeeded, and only if it is
        still wanted (``_still_for``). An IdP that fails on the way is told as the wire's error
        (unavailable, retry), never as a bug."""
        tokens: TokenSet | None = None
        began = self._began()
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
        await self.adopt_login(tokens, began=began, still=still)
        yield self.logged_in(tokens)

    async def _endpoints_for_login(self) -> Endpoints:
        try:
            return await self._resolve_endpoints()
        except UpstreamFault as exc:
            raise broker_error(self.profile.name, exc) from None

    async def device_login(self, *, still: Still | None = None) -> AsyncIterator[dict[str, Any]]:
        """The OAuth device authorization grant (``flows.device_login``), for a person at another
        screen: yields the code to show them, then the outcome; the new login replaces this session's
        tokens only once it succeeded."""
        name = self.profile.name
        if self.profile.grant == "client_credentials":
            if self.profile.signs_in_with() is None:
                raise CredentialsRejected(
                    f"profile {name!r} uses client credentials: the broker signs in with the stored client "
                    f"secret, so there is nothing to log in; to store a new secret, `dc-broker rotate {name} "
                    "--client-secret`"
                )
            # no secret to ask for: a new login is a new grant with what the client authenticates with
            # (kept through a logout), which is what a logout left this profile waiting for
            if still is not None:
                still()
            self.credentials_changed()
            yield self.logged_in(await self.get(0.0))
            return
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

        async for message in self._interactive(flow, show, still=still):
            yield message

    async def browser_login(self, *, still: Still | None = None) -> AsyncIterator[dict[str, Any]]:
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
            async for message in self._interactive(flow, show, redirect, still):
                yield message
        finally:
            await listener.aclose()

    def logged_in(self, tokens: TokenSet) -> dict[str, Any]:
        """The last message of a login stream: the profile is logged in, for this long."""
        return {"profile": self.profile.name, "logged_in": True, "expires_in": tokens.expires_at - self.clock()}

    async def password_login(self, password: Secret, *, still: Still | None = None) -> TokenSet:
        """`dc-broker login` with a password: checked at the IdP first; only once it is accepted, and
        still wanted (``_still_for``), does it replace the stored password and the current login (a
        wrong one changes nothing). One hold of the login lock from the IdP to the adoption: nothing
        (a logout) lands between the password stored and the login adopted."""
        creds, began = self._credentials_or_none(), self._began()
        async with self._login_lock:
            try:
                login = await self._login(creds)
                tokens = await self._drive(flows.password_login(login, password))
            except UpstreamFault as exc:
                raise broker_error(self.profile.name, exc) from None
            self._still_for(began, still)
            # as stored now: a client secret rotated while the IdP was asked stays
            self.store.set_credentials(self.profile.name, replace(self._credentials_or_none(), password=password))
            await self._adopt(tokens)
        return tokens

    async def check_client(self, *, next_key: bool = False) -> bool:
        """One request that only the client's authentication can fail (``flows.check_client``): a
        key rotation's check that the IdP accepts the next key before it signs for real."""
        return await self._drive(flows.check_client(await self._login(), next_key=next_key))

    async def verify(self) -> TokenSet:
        """One grant with the stored credentials, outside the refresh task (`dc-broker add`, `rotate`):
        its caller words an IdP failure (``UpstreamFault``) for what it was checking."""
        return await self._drive(flows.obtain(await self._login()))

    def _began(self) -> Began:
        """What a person's login begins for: the settings' ``login_fingerprint`` and the logouts so far."""
        return self._fingerprint, self._logouts

    def _still_for(self, began: Began, still: Still | None = None) -> None:
        """A person's login that ``began`` for these settings ends: it is stored only if the profile
        is still configured, for whom it was made, not logged out since, and (``still``: the
        caller's check, e.g. that it may still change this login) still the caller's to make. A
        `dc-broker remove`, `logout`, or an `add --force` for another IdP, client or user while the
        person logged in leaves nothing of it behind."""
        name = self.profile.name
        if self.retired:
            raise UnknownProfile(
                f"profile {name!r} was removed during the login; nothing was stored (`dc-broker list` shows the "
                "profiles)"
            )
        fingerprint, logouts = began
        if self._fingerprint != fingerprint:
            raise LoginRequired(
                f"profile {name!r}: its settings changed during the login (`dc-broker add --force` or `set`); "
                f"nothing was stored: run `dc-broker login {name}` again"
            )
        if self._logouts != logouts:
            raise LoginRequired(
                f"profile {name!r} was logged out during the login (`dc-broker logout` or `remove`); nothing was "
                f"stored: run `dc-broker login {name}` again"
            )
        if still is not None:
            still()

    async def adopt_login(self, tokens: TokenSet, *, began: Began | None = None, still: Still | None = None) -> None:
        """A login made outside the refresh task (device flow, password login) becomes this session's;
        ``began``: what it began for (``_still_for``), when it began before this call."""
        async with self._login_lock:
            self._still_for(self._began() if began is None else began, still)
            await self._adopt(tokens)

    async def _adopt(self, tokens: TokenSet) -> None:
        """``adopt_login`` with the login lock held and the login checked: stored, then current. A
        login dropped while it was being stored (a lock, a reload that changed whom it is for) is
        told as such, never as logged in."""
        name = self.profile.name
        locked = Locked(
            f"profile {name!r}: the vault was locked during the login; run `dc-broker unlock`, then "
            f"`dc-broker login {name}` again"
        )
        if self.store.locked:
            raise locked
        gen = self._changed()
        self._forget_children()
        if not await self._accept(tokens, Event.ADOPTED, gen):
            if self.store.locked:
                raise locked
            raise LoginRequired(
                f"profile {name!r} changed while its new login was being stored (a reload or a lock); it was "
                f"not kept: run `dc-broker login {name}` again"
            )
        self._poke()  # the scheduler picks up the new plan

    async def logout(self, *, still: Still | None = None, keep_unreached: bool = False) -> Ended:
        """End the login at the IdP (``flows.end_login``: its session where the IdP has an end-session
        endpoint, else a revocation) and forget it. The client secret stays (it is not the login),
        except for client credentials, where it is. Returns how the IdP ended it. ``still``: the
        caller's check, made once the logout holds the login (it may have waited for a refresh),
        before anything changes. An IdP that cannot be reached (or answers 5xx) ended nothing: with
        ``keep_unreached`` (`dc-broker logout`) that is ``UpstreamUnavailable`` and nothing changes,
        so the login is still there for a logout to end once the IdP answers; without it (`remove`,
        which forgets the profile whatever the IdP does) the login is forgotten here all the same."""
        name = self.profile.name
        ended = Ended.UNCONFIRMED
        async with self._login_lock:
            if still is not None:
                still()
            tok = self.token
            creds = first = self._credentials_or_none()
            if tok is not None:
                try:
                    ended = await self._drive(flows.end_login(await self._login(creds), tok))
                except (UpstreamFault, BrokerError) as exc:
                    if keep_unreached and isinstance(exc, UpstreamTransient | UpstreamUnavailable):
                        why = str(exc).removeprefix(f"profile {name!r}: ")  # discovery's error names it already
                        raise UpstreamUnavailable(
                            f"profile {name!r}: the identity provider could not end the login: {why}; nothing "
                            f"changed: the login is kept for `dc-broker logout {name}` to end once it answers "
                            f"(`dc-broker remove {name}` forgets it here regardless)",
                            retry_after=getattr(exc, "retry_after", None),
                        ) from None
                    log.warning("profile %s: could not end the login at the identity provider: %s", name, exc)
            self._changed()
            self._logouts += 1  # a person's login that began before this one is not adopted after it
            await self.store.forget_tokens(name)
            # as stored now: a client secret rotated or a key activated while the IdP was asked stays,
            # and so does a password (or a client credentials' secret) stored meanwhile: the logout
            # forgets the login it found, and that new credential came after it
            creds = self._credentials_or_none()
            password = creds.password if creds.password != first.password else None
            keep = creds.client_secret
            if self.profile.grant == "client_credentials" and keep == first.client_secret:
                keep = None
            renewed = password is not None or (self.profile.grant == "client_credentials" and keep is not None)
            # the client's own keys are who the client is, not a login: they stay
            self.store.set_credentials(
                name, Credentials(password=password, client_secret=keep, client_keys=creds.client_keys)
            )
            self.token = None
            self._in_doubt = None
            self._proven = False
            self._forget_children()
            self.last_error = LoginRequired(flows.logged_out_message(self.profile))
            self.schedule = self.schedule.stopped()
            self._event(Event.LOGOUT)
            self._announce()
        if renewed:  # it logs in with the credential stored after the logout began
            self.credentials_changed()
        log.info("profile %s: logged out (at the identity provider: %s)", name, ended.value)
        return ended
