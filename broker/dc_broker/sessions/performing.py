"""Performing a session's flow steps at the edge (``Performing``, the layer above
``base.SessionBase``): an HTTP request to the profile's IdP (``_request``: counted, a client
assertion made fresh for each sending, a refresh token put in doubt when its answer is lost), a
sleep, a refresh token the IdP refused; what a login needs to start a flow (``_login``: endpoints,
stored credentials, the refresh token to present); storing tokens with wall-clock times (``_save``).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Final, TypeVar

import trio

from dc_broker.config import Profile
from dc_broker.errors import AnswerLost, RecordCorrupt, UpstreamFault, UpstreamGarbage
from dc_broker.idp import assertions, oidc
from dc_broker.idp.oidc import Endpoints, HttpRequest
from dc_broker.idp.transport import ClientCert
from dc_broker.observe import events
from dc_broker.secret import Secret
from dc_broker.sessions import driver, flows
from dc_broker.sessions.base import SessionBase, shift_times
from dc_broker.sessions.flows import Answer, AwaitRedirect, Flow, Login, LoginLost, Rotated, Sleep, Step
from dc_broker.tokens import Credentials, TokenSet
from dc_token.errors import (
    BrokerError,
    UpstreamError,
    UpstreamUnavailable,
)

log = logging.getLogger("dc_broker.sessions")
T = TypeVar("T")


def broker_error(name: str, exc: UpstreamFault, retry_after: float | None = None) -> BrokerError:
    """What a caller (or `dc-broker login`) is told when the IdP failed: the one translation of an
    ``UpstreamFault`` into the wire's error tree."""
    if isinstance(exc, UpstreamGarbage):
        return UpstreamError(f"profile {name!r}: {exc}", retry_after=retry_after)
    return UpstreamUnavailable(f"profile {name!r}: {exc}", retry_after=retry_after)


#: grants with a stored credential (a re-login when the broker makes them itself), and what is stored
_STORED_GRANTS: Final = {"password": "password", "client_credentials": "client secret"}


class Performing(SessionBase):
    """Performing the steps of the pure grant flows (``flows``, stepped by ``driver``) for one
    profile's login: the one place a request leaves for its IdP."""

    __slots__ = ()

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
        if self._secrets_to_drop:  # the old settings' secrets the vault could not drop: never sent
            creds = creds.without(self._secrets_to_drop)
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

    async def _save(self, tokens: TokenSet, *, issued_for: str | None = None) -> None:
        """Store ``tokens`` (wall-clock times) as the login of ``issued_for`` (a ``login_fingerprint``;
        default the current settings'). A login that began for other settings is stored as theirs:
        restored only if those settings come back, never as the new settings' login."""
        whom = self._fingerprint if issued_for is None else issued_for
        stored = replace(shift_times(tokens, self.wall_clock() - self.clock()), issued_for=whom, notes=())
        await self.store.save_tokens(self.profile.name, stored)

    async def _resolve_endpoints(self) -> Endpoints:
        if self._endpoints is None:
            self._endpoints = oidc.static_endpoints(self.profile)
        if self._endpoints is None:
            issuer = self.profile.issuer
            assert issuer is not None  # config validation guarantees server+tenant, token_url or issuer
            self._endpoints = await self._drive(flows.discover(self.profile, issuer))
        return self._endpoints


def _client_cert(profile: Profile) -> ClientCert | None:
    """The certificate this profile's client presents on the TLS connection (tls_client_auth)."""
    if profile.auth_method != "tls_client_auth" or profile.client_cert is None:
        return None
    return ClientCert(profile.client_cert, profile.client_key)
