"""The broker's Session against real DOT over real HTTP, in real time (no mock clock: this is network I/O).

DOT grants 6 s access tokens, so the broker's refresh-ahead (75 % +- 5 %) fires every ~4.5 s and half a
minute shows several rotations.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio

from dc_broker.config import Profile
from dc_broker.idp.transport import IdpTransport
from dc_broker.secret import Secret
from dc_broker.sessions.session import Session
from dc_broker.sessions.states import State
from dc_broker.store import MemoryStore
from dc_broker.tokens import Credentials, TokenSet
from dc_token.errors import CredentialsRejected
from tests.conftest import running as background
from tests.integration.conftest import DotServer
from tests.integration.dot_idp import (
    ACCESS_LIFETIME,
    PASSWORD,
    PASSWORD_CLIENT_ID,
    PASSWORD_CLIENT_SECRET,
    SERVICE_CLIENT_ID,
    SERVICE_CLIENT_SECRET,
    TENANT,
    USERNAME,
)
from tests.integration.helpers import basic, bearer

pytestmark = pytest.mark.integration

#: bound on one token round trip (plus the session task noticing) against a local DOT
ROUND = 5.0


def password_profile(server: DotServer, auth_method: str = "basic", **overrides: Any) -> Profile:
    kwargs: dict[str, Any] = {
        "server": server.base,
        "tenant": TENANT,
        "client_id": PASSWORD_CLIENT_ID,
        "grant": "password",
        "username": USERNAME,
        "auth_method": auth_method,
        **overrides,
    }
    return Profile(name="acme", **kwargs)


def service_profile(server: DotServer, auth_method: str = "post") -> Profile:
    return Profile(
        name="svc",
        server=server.base,
        tenant=TENANT,
        client_id=SERVICE_CLIENT_ID,
        grant="client_credentials",
        auth_method=auth_method,
    )


@asynccontextmanager
async def running(profile: Profile, credentials: Credentials) -> AsyncIterator[Session]:
    """A Session with its refresh task running on trio's real clock, talking HTTP to DOT."""
    idp = IdpTransport()
    session = Session(profile, MemoryStore({profile.name: credentials}), idp, rng=random.Random(7))
    try:
        async with background(session.run):
            yield session
    finally:
        await idp.aclose()


async def accepted(server: DotServer, token: TokenSet) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=ROUND) as api:
        resp = await api.get(server.hello_url, headers=bearer(token.access_token.reveal()))
    assert resp.status_code == 200, (resp.status_code, resp.headers.get("www-authenticate"))
    body: dict[str, Any] = resp.json()
    return body


def family_of(server: DotServer, refresh_token: Secret) -> tuple[str, bool]:
    [(family, revoked)] = server.query(
        "SELECT token_family, revoked IS NOT NULL FROM oauth2_provider_refreshtoken WHERE token = ?",
        refresh_token.reveal(),
    )
    return str(family), bool(revoked)


@pytest.mark.parametrize("auth_method", ["basic", "post"])
async def test_password_login(dot_server: DotServer, auth_method: str) -> None:
    creds = Credentials(password=Secret(PASSWORD), client_secret=Secret(PASSWORD_CLIENT_SECRET))
    async with running(password_profile(dot_server, auth_method), creds) as session:
        with trio.fail_after(ROUND):
            token = await session.get()
        assert session.state is State.FRESH
        assert (session.refreshes, session.idp_requests, session.failures) == (1, 1, 0)
        assert token.lifetime == ACCESS_LIFETIME
        assert token.refresh_token is not None
        assert token.refresh_expires_at is None  # DOT sends no refresh_expires_in
        assert token.scope == "read write"
        # refresh-ahead is scheduled inside the token's life, at 75 % +- 5 %
        assert token.obtained_at + 0.7 * ACCESS_LIFETIME <= session.next_attempt_at <= token.expires_at
        assert await accepted(dot_server, token) == {"hello": USERNAME}
        assert family_of(dot_server, token.refresh_token)[1] is False


@pytest.mark.parametrize("auth_method", ["basic", "post"])
async def test_client_credentials(dot_server: DotServer, auth_method: str) -> None:
    creds = Credentials(client_secret=Secret(SERVICE_CLIENT_SECRET))
    async with running(service_profile(dot_server, auth_method), creds) as session:
        with trio.fail_after(ROUND):
            token = await session.get()
        assert session.state is State.FRESH
        assert token.refresh_token is None and token.lifetime == ACCESS_LIFETIME
        await accepted(dot_server, token)


async def test_client_credentials_renews_with_the_secret(dot_server: DotServer) -> None:
    """No refresh token: the next round ahead of expiry is a new client_credentials grant."""
    creds = Credentials(client_secret=Secret(SERVICE_CLIENT_SECRET))
    async with running(service_profile(dot_server), creds) as session:
        with trio.fail_after(ROUND):
            first = await session.get()
        with trio.fail_after(ACCESS_LIFETIME + ROUND):
            await session.token_changed.wait()
        second = session.token
        assert second is not None and second.access_token != first.access_token
        assert second.obtained_at < first.expires_at  # renewed ahead of expiry, not after
        assert session.state is State.FRESH and session.refreshes == 2 == session.idp_requests
        await accepted(dot_server, second)


@pytest.mark.slow
async def test_refresh_rotation_over_several_lifetimes(dot_server: DotServer) -> None:
    """Login, then >= 3 refresh-token grants, each with the refresh token DOT rotated in last time.

    Every refresh stays in the login's token family (a fallback to the password would start a new
    one), every used refresh token is revoked in DOT's DB and only the newest is live, and each new
    access token arrives before the previous one expires and is accepted by the protected view.
    """
    creds = Credentials(password=Secret(PASSWORD), client_secret=Secret(PASSWORD_CLIENT_SECRET))
    wanted_refreshes = 3
    async with running(password_profile(dot_server), creds) as session:
        with trio.fail_after(ROUND):
            tokens = [await session.get()]
        await accepted(dot_server, tokens[0])
        with trio.fail_after(wanted_refreshes * ACCESS_LIFETIME + ROUND):
            while len(tokens) <= wanted_refreshes:
                await session.token_changed.wait()
                new = session.token
                assert new is not None
                assert session.state is State.FRESH, session.last_error
                assert new.obtained_at < tokens[-1].expires_at, "refreshed only after the old token expired"
                await accepted(dot_server, new)
                tokens.append(new)
        assert session.refreshes == wanted_refreshes + 1
        assert session.idp_requests == session.refreshes  # no failed refresh, no fallback to the password
        assert (session.failures, session.last_error) == (0, None)
    refresh_tokens = [t.refresh_token for t in tokens]
    assert all(rt is not None for rt in refresh_tokens)
    assert len({rt.reveal() for rt in refresh_tokens if rt is not None}) == len(tokens)
    rows = [family_of(dot_server, rt) for rt in refresh_tokens if rt is not None]
    assert len({family for family, _ in rows}) == 1, "a refresh fell back to a new login"
    assert [revoked for _, revoked in rows] == [True] * wanted_refreshes + [False]
    assert tokens[-1].expires_at - tokens[0].obtained_at > 2 * ACCESS_LIFETIME


async def test_revoked_refresh_token_falls_back_to_the_password(dot_server: DotServer) -> None:
    """DOT answers 400 invalid_grant for a revoked refresh token: the session logs in again, still fresh."""
    creds = Credentials(password=Secret(PASSWORD), client_secret=Secret(PASSWORD_CLIENT_SECRET))
    async with running(password_profile(dot_server), creds) as session:
        with trio.fail_after(ROUND):
            first = await session.get()
        assert first.refresh_token is not None
        async with httpx.AsyncClient(timeout=ROUND) as http:
            revoke = await http.post(
                dot_server.revoke_url,
                data={"token": first.refresh_token.reveal(), "token_type_hint": "refresh_token"},
                headers=basic(PASSWORD_CLIENT_ID, PASSWORD_CLIENT_SECRET),
            )
            assert revoke.status_code == 200
            # DOT deleted the access token with it; the API says 401, the caller tells the broker
            assert (
                await http.get(dot_server.hello_url, headers=bearer(first.access_token.reveal()))
            ).status_code == 401
        assert session.invalidate(first.access_token.reveal())
        with trio.fail_after(ROUND):
            second = await session.get()
        assert session.state is State.FRESH
        assert (session.refreshes, session.idp_requests) == (2, 3)  # refresh refused, then the password grant
        assert second.refresh_token is not None
        assert family_of(dot_server, second.refresh_token)[0] != family_of(dot_server, first.refresh_token)[0]
        await accepted(dot_server, second)


@pytest.mark.parametrize(
    ("profile_of", "credentials", "error"),
    [
        pytest.param(
            password_profile,
            Credentials(password=Secret("not-the-password-4c1e"), client_secret=Secret(PASSWORD_CLIENT_SECRET)),
            "invalid_grant: Invalid credentials given.",
            id="wrong-password",
        ),
        pytest.param(
            password_profile,
            Credentials(password=Secret(PASSWORD), client_secret=Secret("not-the-secret-9f2c")),
            "invalid_client",
            id="wrong-secret-password-grant",
        ),
        pytest.param(
            service_profile,
            Credentials(client_secret=Secret("not-the-secret-9f2c")),
            "invalid_client",
            id="wrong-secret-client-credentials",
        ),
        pytest.param(
            lambda server: password_profile(server, scope="openid"),
            Credentials(password=Secret(PASSWORD), client_secret=Secret(PASSWORD_CLIENT_SECRET)),
            "invalid_scope",  # DOT without OIDC: a Keycloak-style scope = "openid" profile is refused
            id="scope-openid",
        ),
        pytest.param(
            lambda server: password_profile(server, tenant="other"),
            Credentials(password=Secret(PASSWORD), client_secret=Secret(PASSWORD_CLIENT_SECRET)),
            "no such endpoint",
            id="unknown-tenant",
        ),
    ],
)
async def test_rejected_credentials(
    dot_server: DotServer, profile_of: Any, credentials: Credentials, error: str
) -> None:
    async with running(profile_of(dot_server), credentials) as session:
        started = time.monotonic()
        with trio.fail_after(ROUND), pytest.raises(CredentialsRejected) as exc_info:
            await session.get()
        assert session.state is State.REJECTED
        assert error in exc_info.value.message and "HTTP " in exc_info.value.message
        # rejected waits for a person: no retries, and the next caller gets the same answer at once
        with trio.fail_after(1), pytest.raises(CredentialsRejected):
            await session.get()
        await trio.sleep(0.3)
        assert session.idp_requests == 1 and session.state is State.REJECTED
        assert time.monotonic() - started < ROUND
        for secret in (credentials.password, credentials.client_secret):
            assert secret is None or secret.reveal() not in exc_info.value.message
