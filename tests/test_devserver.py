"""The dev IdP (dc_broker.devserver): Keycloak-exact grants, errors, session expiry, rotation, the
device flow, faults and the demo API, driven in-process through httpx's ASGI transport with a fake
clock, plus real HTTP through serve() and the ``python -m dc_broker.devserver`` process."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import quote

import httpx
import jwt
import pytest
import trio

from dc_broker.devidp.authcode import s256
from dc_broker.devserver import DevClient, DevIdP, DevRealm, DevUser, demo_realm, main, serve
from dc_broker.errors import OAuthError
from dc_broker.idp import refusals
from tests.conftest import running
from tests.test_refusals import KEYCLOAK

BASE = "http://idp.test"
OIDC = "/realms/demo/protocol/openid-connect"
LEGACY = "/auth/realms/demo/protocol/openid-connect"
TOKEN = f"{OIDC}/token"
API = "/dp/api/v1/aiconnections/types"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
CLI = ("dc-cli", "dc-cli-secret")
#: keycloak.md: "another client's refresh token: 400 invalid_grant ..."
OTHER_CLIENTS = "Invalid refresh token. Token client and authorized client don't match"
T0 = 1_750_000_000.0


class FakeClock:
    """Unix seconds that move only when told to."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def realm_overrides() -> dict[str, Any]:
    return {}


@pytest.fixture
def idp(clock: FakeClock, realm_overrides: dict[str, Any]) -> DevIdP:
    return DevIdP([demo_realm(**realm_overrides)], clock=clock)


@pytest.fixture
async def client(idp: DevIdP) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=idp.app), base_url=BASE) as c:
        yield c


def basic(client_id: str, secret: str) -> dict[str, str]:
    raw = f"{quote(client_id, safe='')}:{quote(secret, safe='')}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


async def post(
    client: httpx.AsyncClient,
    form: dict[str, str],
    *,
    auth: tuple[str, str] | None = CLI,
    path: str = TOKEN,
) -> httpx.Response:
    headers = basic(*auth) if auth else {}
    return await client.post(path, data=form, headers=headers)


async def login(client: httpx.AsyncClient, user: str = "demo", **extra: str) -> dict[str, Any]:
    resp = await post(client, {"grant_type": "password", "username": user, "password": user, **extra})
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


async def refresh(client: httpx.AsyncClient, token: str, **extra: str) -> httpx.Response:
    return await post(client, {"grant_type": "refresh_token", "refresh_token": token, **extra})


def claims_of(token: str) -> dict[str, Any]:
    payload: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return payload


def error_of(resp: httpx.Response) -> tuple[int, str, str]:
    body = resp.json()
    return resp.status_code, body["error"], body["error_description"]


async def call_api(client: httpx.AsyncClient, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return await client.get(API, headers=headers)


# -- discovery and keys ------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", ["", "/auth"])
async def test_discovery_under_both_prefixes(client: httpx.AsyncClient, prefix: str) -> None:
    resp = await client.get(f"{prefix}/realms/demo/.well-known/openid-configuration")
    doc = resp.json()
    iss = f"{BASE}{prefix}/realms/demo"
    assert resp.status_code == 200
    assert doc["issuer"] == iss
    assert doc["token_endpoint"] == f"{iss}/protocol/openid-connect/token"
    assert doc["device_authorization_endpoint"] == f"{iss}/protocol/openid-connect/auth/device"
    assert doc["revocation_endpoint"] == f"{iss}/protocol/openid-connect/revoke"
    assert doc["end_session_endpoint"] == f"{iss}/protocol/openid-connect/logout"
    assert doc["introspection_endpoint"] == f"{iss}/protocol/openid-connect/token/introspect"
    assert doc["jwks_uri"] == f"{iss}/protocol/openid-connect/certs"
    assert set(doc["grant_types_supported"]) >= {"password", "client_credentials", "refresh_token", DEVICE_GRANT}
    assert doc["token_endpoint_auth_methods_supported"] == [
        "client_secret_basic",
        "client_secret_post",
        "private_key_jwt",
        "client_secret_jwt",
        "tls_client_auth",
    ]


@pytest.mark.parametrize(
    "request_",
    [
        ("GET", "/realms/nope/.well-known/openid-configuration"),
        ("GET", "/auth/realms/nope/protocol/openid-connect/certs"),
        ("POST", "/realms/nope/protocol/openid-connect/token"),
        ("POST", "/realms/nope/protocol/openid-connect/auth/device"),
    ],
)
async def test_unknown_realm_is_404(client: httpx.AsyncClient, request_: tuple[str, str]) -> None:
    resp = await client.request(*request_, data={"grant_type": "password"} if request_[0] == "POST" else None)
    assert (resp.status_code, resp.json()) == (404, {"error": "Realm does not exist"})


async def test_access_token_verifies_against_jwks(client: httpx.AsyncClient, idp: DevIdP) -> None:
    jwks = (await client.get(f"{OIDC}/certs")).json()
    body = await login(client)
    header = jwt.get_unverified_header(body["access_token"])
    (jwk,) = [k for k in jwks["keys"] if k["kid"] == header["kid"]]
    assert header["alg"] == "RS256" and header["kid"] == idp.kid
    key = jwt.PyJWK(jwk).key
    claims = jwt.decode(body["access_token"], key, algorithms=["RS256"], options={"verify_exp": False})
    assert claims["iss"] == f"{BASE}/realms/demo"
    assert claims["typ"] == "Bearer" and claims["azp"] == "dc-cli" and claims["preferred_username"] == "demo"
    assert claims["sid"] == body["session_state"]
    assert claims["exp"] - claims["iat"] == 1800 and claims["iat"] == int(T0)
    assert "dc-api" in claims["realm_access"]["roles"]
    assert claims["scope"] == body["scope"] and claims["jti"] and claims["sub"]
    other = DevIdP([demo_realm()])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=other.app), base_url=BASE) as c:
        other_key = jwt.PyJWK((await c.get(f"{OIDC}/certs")).json()["keys"][0]).key
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(body["access_token"], other_key, algorithms=["RS256"])


# -- password grant and client authentication ------------------------------------------------------
async def test_password_grant_success_is_keycloak_shaped(client: httpx.AsyncClient) -> None:
    resp = await post(client, {"grant_type": "password", "username": "demo", "password": "demo"})
    body = resp.json()
    assert resp.status_code == 200 and resp.headers["cache-control"] == "no-store"
    assert list(body) == [
        "access_token",
        "expires_in",
        "refresh_expires_in",
        "refresh_token",
        "token_type",
        "not-before-policy",
        "session_state",
        "scope",
    ]
    assert (body["expires_in"], body["refresh_expires_in"], body["token_type"]) == (1800, 1800, "Bearer")
    assert (body["not-before-policy"], body["scope"]) == (0, "profile email")


async def test_openid_scope_adds_id_token(client: httpx.AsyncClient) -> None:
    body = await login(client, scope="openid")
    assert body["scope"] == "openid profile email"
    id_claims = claims_of(body["id_token"])
    assert (id_claims["typ"], id_claims["aud"], id_claims["sid"]) == ("ID", "dc-cli", body["session_state"])


async def test_legacy_prefix_issues_legacy_issuer(client: httpx.AsyncClient) -> None:
    resp = await post(
        client, {"grant_type": "password", "username": "demo", "password": "demo"}, path=f"{LEGACY}/token"
    )
    assert claims_of(resp.json()["access_token"])["iss"] == f"{BASE}/auth/realms/demo"


async def test_client_secret_post_and_public_client(client: httpx.AsyncClient) -> None:
    form = {"grant_type": "password", "username": "demo", "password": "demo"}
    posted = await post(client, form | {"client_id": "dc-cli", "client_secret": "dc-cli-secret"}, auth=None)
    public = await post(client, form | {"client_id": "dc-public"}, auth=None)
    assert posted.status_code == public.status_code == 200
    assert claims_of(public.json()["access_token"])["azp"] == "dc-public"


async def test_basic_auth_credentials_are_urlencoded(client: httpx.AsyncClient, idp: DevIdP) -> None:
    idp.realm("demo").clients.append(DevClient("odd:id", "s3cr%t:+ &x"))
    form = {"grant_type": "password", "username": "demo", "password": "demo"}
    resp = await post(client, form, auth=("odd:id", "s3cr%t:+ &x"))
    assert resp.status_code == 200, resp.text


async def test_usernames_are_case_insensitive(client: httpx.AsyncClient) -> None:
    resp = await post(client, {"grant_type": "password", "username": "DEMO", "password": "demo"})
    assert claims_of(resp.json()["access_token"])["preferred_username"] == "demo"


ERROR_ROWS: list[tuple[str, dict[str, str], tuple[str, str] | None, tuple[int, str, str]]] = [
    (
        "wrong password",
        {"grant_type": "password", "username": "demo", "password": "nope"},
        CLI,
        (401, "invalid_grant", "Invalid user credentials"),
    ),
    (
        "unknown user",
        {"grant_type": "password", "username": "ghost", "password": "x"},
        CLI,
        (400, "invalid_grant", "Invalid user credentials"),
    ),
    (
        "disabled user",
        {"grant_type": "password", "username": "disabled", "password": "disabled"},
        CLI,
        (400, "invalid_grant", "Account disabled"),
    ),
    (
        "direct grants off",
        {"grant_type": "password", "username": "demo", "password": "demo"},
        ("no-direct", "no-direct-secret"),
        (400, "unauthorized_client", "Client not allowed for direct access grants"),
    ),
    (
        "wrong secret",
        {"grant_type": "password", "username": "demo", "password": "demo"},
        ("dc-cli", "wrong"),
        (401, "unauthorized_client", "Invalid client or Invalid client credentials"),
    ),
    (
        "confidential client without secret",
        {"grant_type": "password", "username": "demo", "password": "demo", "client_id": "dc-cli"},
        None,
        (401, "unauthorized_client", "Invalid client or Invalid client credentials"),
    ),
    (
        "unknown client",
        {"grant_type": "password", "username": "demo", "password": "demo"},
        ("ghost", "x"),
        (401, "invalid_client", "Invalid client or Invalid client credentials"),
    ),
    (
        "no client at all",
        {"grant_type": "password", "username": "demo", "password": "demo"},
        None,
        (400, "invalid_client", "Missing client_id parameter"),
    ),
    (
        "garbage refresh token",
        {"grant_type": "refresh_token", "refresh_token": "garbage"},
        CLI,
        (400, "invalid_grant", "Invalid refresh token"),
    ),
    (
        "unsupported grant",
        {"grant_type": "urn:ietf:params:oauth:grant-type:saml2-bearer", "assertion": "x"},
        CLI,
        (400, "unsupported_grant_type", "Unsupported grant_type"),
    ),
    (
        "unknown authorization code",
        {"grant_type": "authorization_code", "code": "x"},
        CLI,
        (400, "invalid_grant", "Code not valid"),
    ),
    ("missing grant_type", {}, CLI, (400, "invalid_request", "Missing form parameter: grant_type")),
    (
        "missing username",
        {"grant_type": "password", "password": "demo"},
        CLI,
        (400, "invalid_request", "Missing parameter: username"),
    ),
    (
        "missing password",
        {"grant_type": "password", "username": "demo"},
        CLI,
        (400, "invalid_request", "Missing parameter: password"),
    ),
    ("missing refresh token", {"grant_type": "refresh_token"}, CLI, (400, "invalid_request", "No refresh token")),
    (
        "missing device code",
        {"grant_type": DEVICE_GRANT},
        CLI,
        (400, "invalid_request", "Missing parameter: device_code"),
    ),
    (
        "unknown scope",
        {"grant_type": "password", "username": "demo", "password": "demo", "scope": "openid admin"},
        CLI,
        (400, "invalid_scope", "Invalid scopes: openid admin"),
    ),
    (
        "client_credentials for a client without service account",
        {"grant_type": "client_credentials"},
        CLI,
        (401, "unauthorized_client", "Client not enabled to retrieve service account"),
    ),
    (
        "client_credentials for a public client",
        {"grant_type": "client_credentials", "client_id": "dc-public"},
        None,
        (401, "unauthorized_client", "Public client not allowed to retrieve service account"),
    ),
]


@pytest.mark.parametrize(("form", "auth", "expected"), [r[1:] for r in ERROR_ROWS], ids=[r[0] for r in ERROR_ROWS])
async def test_error_table(
    client: httpx.AsyncClient, form: dict[str, str], auth: tuple[str, str] | None, expected: tuple[int, str, str]
) -> None:
    resp = await post(client, form, auth=auth)
    assert error_of(resp) == expected
    assert resp.headers["cache-control"] == "no-store"


# -- settings that refuse, answered exactly as Keycloak does ----------------------------------------
DEVICE_OFF_AT_START = (
    "Client is not allowed to initiate OAuth 2.0 Device Authorization Grant. The flow is disabled for the client."
)
PASSWORD_FORM = {"grant_type": "password", "username": "demo", "password": "demo"}
#: (id, realm settings, client settings, request, client auth, path, grant, Keycloak's answer) where
#: Keycloak's answer is keycloak.md's; each is also a row of test_refusals.KEYCLOAK, the refusal table's
SETTING_ROWS: list[
    tuple[str, dict[str, Any], dict[str, Any], dict[str, str], tuple[str, str] | None, str, str, tuple[int, str, str]]
] = [
    ("https-required", {"ssl_required": "all"}, {}, PASSWORD_FORM, CLI, TOKEN, "password",
     (403, "invalid_request", "HTTPS required")),
    ("realm-disabled", {"enabled": False}, {}, PASSWORD_FORM, CLI, TOKEN, "password",
     (403, "access_denied", "Realm not enabled")),
    ("offline-not-allowed", {}, {"dc-cli": {"offline_allowed": False}}, PASSWORD_FORM | {"scope": "offline_access"},
     CLI, TOKEN, "password", (400, "not_allowed", "Offline tokens not allowed for the user or client")),
    ("dpop-required", {}, {"dc-cli": {"dpop": "required"}}, PASSWORD_FORM, CLI, TOKEN, "password",
     (400, "invalid_dpop_proof", "DPoP proof is missing")),
    ("service-account-disabled", {}, {"dc-service": {"service_account_enabled": False}},
     {"grant_type": "client_credentials"}, ("dc-service", "dc-service-secret"), TOKEN, "client_credentials",
     (401, "invalid_request", "User 'service-account-dc-service' disabled")),
    ("device-grant-off", {}, {"dc-public": {"device_grant": False}},
     {"grant_type": DEVICE_GRANT, "device_code": "any", "client_id": "dc-public"}, None, TOKEN, "device",
     (400, "invalid_grant", "Client not allowed for OAuth 2.0 Device Authorization Grant")),
    ("device-grant-off-at-start", {}, {"dc-public": {"device_grant": False}}, {"client_id": "dc-public"}, None,
     f"{OIDC}/auth/device", "device", (400, "unauthorized_client", DEVICE_OFF_AT_START)),
    ("direct-grants-off", {}, {"dc-cli": {"direct_grants": False}}, PASSWORD_FORM, CLI, TOKEN, "password",
     (400, "unauthorized_client", "Client not allowed for direct access grants")),
]  # fmt: skip


def table_row(answer: tuple[int, str, str], grant: str) -> refusals.Meaning:
    """The refusal table's row for ``answer`` (its client's name made the table's "svc"): there must
    be one, so the dev IdP and the table cannot drift apart unnoticed; returns what it means."""
    status, error, said = answer
    said = said.replace("dc-service", "svc")
    (meaning,) = [m for st, e, d, g, m in KEYCLOAK if (st, e, d, g) == (status, error, said, grant)]
    assert refusals.classify(OAuthError(error, said, status), grant).meaning is meaning
    return meaning


@pytest.mark.parametrize(
    ("realm_overrides", "client_settings", "form", "auth", "path", "grant", "expected"),
    [r[1:] for r in SETTING_ROWS],
    ids=[r[0] for r in SETTING_ROWS],
)
async def test_each_refusing_setting_answers_as_keycloak_does(
    client: httpx.AsyncClient,
    idp: DevIdP,
    client_settings: dict[str, dict[str, Any]],
    form: dict[str, str],
    auth: tuple[str, str] | None,
    path: str,
    grant: str,
    expected: tuple[int, str, str],
) -> None:
    """The settings the end-to-end tests refuse with (tests/test_keycloak_e2e.py): the dev IdP itself
    sends Keycloak's exact status, error and error_description, and the refusal table reads that as
    a setting to fix, never a dead token or a wrong credential."""
    for client_id, changes in client_settings.items():
        for name, value in changes.items():
            setattr(idp.realm("demo").client(client_id), name, value)
    resp = await post(client, form, auth=auth, path=path)
    assert error_of(resp) == expected
    assert table_row(expected, grant) is refusals.Meaning.MISCONFIGURED


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ({"ssl_required": "all"}, (403, "invalid_request", "HTTPS required")),
        ({"enabled": False}, (403, "access_denied", "Realm not enabled")),
        ({"dpop": "required"}, (400, "invalid_dpop_proof", "DPoP proof is missing")),
    ],
    ids=["https-required", "realm-disabled", "dpop-required"],
)
async def test_a_setting_that_refuses_a_refresh_leaves_the_refresh_token_alive(
    client: httpx.AsyncClient, idp: DevIdP, setting: dict[str, Any], expected: tuple[int, str, str]
) -> None:
    """keycloak.md: "None of these says the refresh token is dead": the same words on a refresh, and
    the token works again once the setting is undone."""
    body = await login(client)
    owner = idp.realm("demo").client("dc-cli") if "dpop" in setting else idp.realm("demo")
    before = {name: getattr(owner, name) for name in setting}
    for name, value in setting.items():
        setattr(owner, name, value)
    assert error_of(await refresh(client, body["refresh_token"])) == expected
    assert table_row(expected, "refresh_token") is refusals.Meaning.MISCONFIGURED
    for name, value in before.items():
        setattr(owner, name, value)
    assert (await refresh(client, body["refresh_token"])).status_code == 200


async def test_a_dpop_bound_client_is_answered_with_token_type_dpop(client: httpx.AsyncClient, idp: DevIdP) -> None:
    """keycloak.md: "DPoP-bound clients: token_type "DPoP" in answers"."""
    idp.realm("demo").client("dc-cli").dpop = "bound"  # type: ignore[union-attr]
    resp = await post(client, PASSWORD_FORM)
    assert resp.status_code == 200 and resp.json()["token_type"] == "DPoP"


@pytest.mark.parametrize("realm_overrides", [{"brute_force": True, "failure_factor": 1, "wait_increment": 60}])
async def test_a_brute_force_locked_user_gets_invalid_user_credentials_for_the_right_password(
    client: httpx.AsyncClient, clock: FakeClock
) -> None:
    """keycloak.md: a temporarily locked user gets 400 invalid_grant "Invalid user credentials" (401
    before about KC 24) EVEN WITH THE RIGHT PASSWORD; the lock lifts by itself. A wrong password is
    401 (Keycloak 24+: the 400 tells a lock apart, which nothing may rely on)."""
    wrong = await post(client, PASSWORD_FORM | {"password": "nope"})
    assert error_of(wrong) == (401, "invalid_grant", "Invalid user credentials")
    locked = await post(client, PASSWORD_FORM)
    assert error_of(locked) == (400, "invalid_grant", "Invalid user credentials")
    assert table_row(error_of(locked), "password") is refusals.Meaning.MAYBE_LOCKED
    clock.advance(59)
    assert error_of(await post(client, PASSWORD_FORM)) == (400, "invalid_grant", "Invalid user credentials")
    clock.advance(1.5)  # Keycloak's default wait, 60 s, is over: the lock lifted by itself
    assert (await post(client, PASSWORD_FORM)).status_code == 200


async def test_required_actions_block_login(client: httpx.AsyncClient, idp: DevIdP) -> None:
    idp.realm("demo").users.append(DevUser("newbie", "newbie", required_actions=True))
    resp = await post(client, {"grant_type": "password", "username": "newbie", "password": "newbie"})
    assert error_of(resp) == (400, "invalid_grant", "Account is not fully set up")


async def test_realm_changes_apply_at_runtime(client: httpx.AsyncClient, idp: DevIdP) -> None:
    idp.realm("demo").users[0].password = "changed"
    idp.realm("demo").clients[0].secret = "rotated"
    form = {"grant_type": "password", "username": "demo", "password": "changed"}
    assert error_of(await post(client, form))[1] == "unauthorized_client"
    assert (await post(client, form, auth=("dc-cli", "rotated"))).status_code == 200


# -- client_credentials --------------------------------------------------------------------------------
async def test_client_credentials_has_no_refresh_token(client: httpx.AsyncClient) -> None:
    resp = await post(client, {"grant_type": "client_credentials"}, auth=("dc-service", "dc-service-secret"))
    body = resp.json()
    assert resp.status_code == 200 and "refresh_token" not in body
    assert (body["refresh_expires_in"], body["expires_in"]) == (0, 1800)
    claims = claims_of(body["access_token"])
    assert claims["preferred_username"] == "service-account-dc-service" and "dc-api" in claims["realm_access"]["roles"]
    assert (await call_api(client, body["access_token"])).status_code == 200


# -- refresh and session lifetimes --------------------------------------------------------------------
async def test_refresh_resets_idle_and_narrows_scope(client: httpx.AsyncClient, clock: FakeClock) -> None:
    first = await login(client, scope="openid")
    clock.advance(1000)
    resp = await refresh(client, first["refresh_token"], scope="openid profile")
    body = resp.json()
    assert resp.status_code == 200 and body["session_state"] == first["session_state"]
    assert body["refresh_expires_in"] == 1800 and body["scope"] == "openid profile email"
    clock.advance(1700)  # 2700 s after login: only alive because the refresh reset the idle timer
    assert (await refresh(client, body["refresh_token"])).status_code == 200
    # Keycloak 23+: a client scope the login never had is dropped silently (200, the token lacks it)
    widened = await refresh(client, body["refresh_token"], scope="openid offline_access")
    assert widened.status_code == 200 and widened.json()["scope"] == "openid profile email"
    # what is no client scope at all is refused (openid is exempt)
    bogus = await refresh(client, body["refresh_token"], scope="openid bogus")
    assert error_of(bogus) == (400, "invalid_scope", "Invalid scopes: openid bogus")


@pytest.mark.parametrize("realm_overrides", [{"refresh_scope": "ignore"}])
async def test_rh_sso_ignores_scope_on_refresh(client: httpx.AsyncClient) -> None:
    first = await login(client, scope="openid phone")
    body = (await refresh(client, first["refresh_token"], scope="openid")).json()
    assert body["scope"] == first["scope"] == "openid phone profile email"


async def test_idle_expiry_kills_refresh_token(client: httpx.AsyncClient, clock: FakeClock) -> None:
    body = await login(client)
    clock.advance(1800)
    assert (await refresh(client, body["refresh_token"])).status_code == 200  # the deadline itself is fine
    clock.advance(1800.5)
    old = await refresh(client, body["refresh_token"])
    assert error_of(old) == (400, "invalid_grant", "Token is not active")


@pytest.mark.parametrize("realm_overrides", [{"sso_idle": 1800, "sso_max": 3000}])
async def test_session_max_caps_refresh_and_access_lifetimes(client: httpx.AsyncClient, clock: FakeClock) -> None:
    token = (await login(client))["refresh_token"]
    for elapsed, refresh_left in [(1500, 1500), (2900, 100)]:
        clock.now = T0 + elapsed
        body = (await refresh(client, token)).json()
        assert body["refresh_expires_in"] == refresh_left
        assert body["expires_in"] == min(1800, refresh_left)
        token = body["refresh_token"]
    clock.now = T0 + 3001
    assert error_of(await refresh(client, token)) == (400, "invalid_grant", "Token is not active")


async def test_old_token_dead_but_session_alive_says_token_not_active(
    client: httpx.AsyncClient, clock: FakeClock
) -> None:
    first = await login(client)
    clock.advance(1000)
    second = (await refresh(client, first["refresh_token"])).json()
    clock.advance(900)  # first token's own exp passed; the session lives on via the second
    assert error_of(await refresh(client, first["refresh_token"]))[2] == "Token is not active"
    assert (await refresh(client, second["refresh_token"])).status_code == 200


async def test_killed_sessions_say_session_not_active(client: httpx.AsyncClient, idp: DevIdP) -> None:
    demo, viewer = await login(client), await login(client, "viewer")
    assert idp.active_sessions("demo") == 2
    idp.kill_sessions("demo", "demo")
    assert error_of(await refresh(client, demo["refresh_token"])) == (400, "invalid_grant", "Session not active")
    assert (await refresh(client, viewer["refresh_token"])).status_code == 200
    idp.kill_sessions("demo")
    assert error_of(await refresh(client, viewer["refresh_token"]))[2] == "Session not active"
    assert idp.active_sessions("demo") == 0


async def test_refresh_checks_client_issuer_and_user(client: httpx.AsyncClient, idp: DevIdP) -> None:
    body = await login(client)
    other = await post(
        client,
        {"grant_type": "refresh_token", "refresh_token": body["refresh_token"], "client_id": "dc-public"},
        auth=None,
    )
    assert error_of(other) == (400, "invalid_grant", OTHER_CLIENTS)
    legacy = await post(
        client, {"grant_type": "refresh_token", "refresh_token": body["refresh_token"]}, path=f"{LEGACY}/token"
    )
    assert error_of(legacy) == (400, "invalid_grant", "Invalid refresh token")  # iss must not change
    idp.realm("demo").users[0].enabled = False
    assert error_of(await refresh(client, body["refresh_token"])) == (400, "invalid_grant", "User disabled")


async def test_another_clients_refresh_token_is_checked_for_expiry_first(
    client: httpx.AsyncClient, idp: DevIdP, clock: FakeClock
) -> None:
    """keycloak.md: "another client's refresh token: ... (expiry is checked first)"; and the same
    words from the logout endpoint, where the token is not spent (revocation says it otherwise)."""
    body = await login(client)
    as_other = {"refresh_token": body["refresh_token"], "client_id": "dc-public"}
    ended = await post(client, as_other, auth=None, path=f"{OIDC}/logout")
    assert error_of(ended) == (400, "invalid_grant", OTHER_CLIENTS)
    assert (await refresh(client, body["refresh_token"])).status_code == 200  # a refused logout ends nothing
    clock.advance(1801)
    late = await post(client, as_other | {"grant_type": "refresh_token"}, auth=None)
    assert error_of(late) == (400, "invalid_grant", "Token is not active")


async def test_offline_tokens_have_no_expiry_but_offline_idle(client: httpx.AsyncClient, clock: FakeClock) -> None:
    body = await login(client, scope="offline_access")
    assert body["refresh_expires_in"] == 0 and body["scope"] == "offline_access profile email"
    clock.advance(20 * 86400)
    again = (await refresh(client, body["refresh_token"])).json()
    assert again["refresh_expires_in"] == 0 and again["expires_in"] == 1800
    clock.advance(30 * 86400 + 1)
    dead = await refresh(client, again["refresh_token"])
    assert error_of(dead) == (400, "invalid_grant", "Offline session not active")


@pytest.mark.parametrize("realm_overrides", [{"rotate_refresh_tokens": True}])
async def test_rotation_reuse_detaches_the_client(client: httpx.AsyncClient, idp: DevIdP) -> None:
    first = await login(client)
    second = (await refresh(client, first["refresh_token"])).json()
    assert second["refresh_token"] != first["refresh_token"]
    reused = await refresh(client, first["refresh_token"])
    assert error_of(reused) == (400, "invalid_grant", "Maximum allowed refresh token reuse exceeded")
    assert idp.stats.refresh_reuse == 1
    # only this client's part of the session ends: its newest token says so, the user session lives on
    newest = await refresh(client, second["refresh_token"])
    assert error_of(newest) == (400, "invalid_grant", "Session doesn't have required client")
    sid = first["session_state"]
    assert idp._state.sessions.session(sid).alive


@pytest.mark.parametrize("realm_overrides", [{"rotate_refresh_tokens": True}])
async def test_an_older_refresh_token_is_stale(client: httpx.AsyncClient, idp: DevIdP, clock: FakeClock) -> None:
    first = await login(client)
    clock.advance(10)
    second = (await refresh(client, first["refresh_token"])).json()
    clock.advance(10)
    assert (await refresh(client, second["refresh_token"])).status_code == 200
    assert error_of(await refresh(client, first["refresh_token"])) == (400, "invalid_grant", "Stale token")


@pytest.mark.parametrize("realm_overrides", [{"rotate_refresh_tokens": True, "refresh_token_max_reuse": 1}])
async def test_rotation_allows_max_reuse(client: httpx.AsyncClient, idp: DevIdP) -> None:
    first = await login(client)
    assert (await refresh(client, first["refresh_token"])).status_code == 200
    assert (await refresh(client, first["refresh_token"])).status_code == 200
    assert error_of(await refresh(client, first["refresh_token"]))[2] == "Maximum allowed refresh token reuse exceeded"
    assert idp.stats.refresh_reuse == 2


async def test_without_rotation_refresh_tokens_are_reusable(client: httpx.AsyncClient, idp: DevIdP) -> None:
    first = await login(client)
    for _ in range(3):
        assert (await refresh(client, first["refresh_token"])).status_code == 200
    assert idp.stats.refresh_reuse == 0


# -- logout, revoke, introspect -------------------------------------------------------------------------
async def test_logout_ends_the_session(client: httpx.AsyncClient) -> None:
    body = await login(client)
    resp = await post(client, {"refresh_token": body["refresh_token"]}, path=f"{OIDC}/logout")
    assert resp.status_code == 204
    assert error_of(await refresh(client, body["refresh_token"]))[2] == "Session not active"
    assert (await call_api(client, body["access_token"])).status_code == 401
    garbage = await post(client, {"refresh_token": "garbage"}, path=f"{OIDC}/logout")
    assert error_of(garbage) == (400, "invalid_grant", "Invalid refresh token")


async def test_revoke_refresh_and_access_tokens(client: httpx.AsyncClient, idp: DevIdP) -> None:
    one, two = await login(client), await login(client)
    revoked = await post(client, {"token": one["refresh_token"]}, path=f"{OIDC}/revoke")
    assert revoked.status_code == 200 and revoked.content == b""
    # Keycloak 23+: revoking detaches this client; the user session (and its browser SSO) lives on
    assert error_of(await refresh(client, one["refresh_token"]))[2] == "Session doesn't have required client"
    assert idp._state.sessions.session(one["session_state"]).alive
    assert (await post(client, {"token": two["access_token"]}, path=f"{OIDC}/revoke")).status_code == 200
    assert (await call_api(client, two["access_token"])).status_code == 401
    assert (await refresh(client, two["refresh_token"])).status_code == 200
    # an unknown or dead token: 200 all the same, with Keycloak's invalid_token body
    for token in ("unknown", one["refresh_token"]):
        again = await post(client, {"token": token}, path=f"{OIDC}/revoke")
        assert again.status_code == 200 and again.json()["error"] == "invalid_token"


@pytest.mark.parametrize("realm_overrides", [{"revoke_scope": "user"}])
async def test_keycloak_22_revoke_detaches_the_client_from_every_session_of_the_user(client: httpx.AsyncClient) -> None:
    one, two = await login(client), await login(client)
    assert (await post(client, {"token": one["refresh_token"]}, path=f"{OIDC}/revoke")).status_code == 200
    assert error_of(await refresh(client, two["refresh_token"]))[2] == "Session doesn't have required client"


async def test_introspection(client: httpx.AsyncClient, clock: FakeClock) -> None:
    body = await login(client)
    path = f"{OIDC}/token/introspect"
    access = (await post(client, {"token": body["access_token"]}, path=path)).json()
    assert access["active"] is True and access["username"] == "demo" and access["client_id"] == "dc-cli"
    refresh_info = (await post(client, {"token": body["refresh_token"]}, path=path)).json()
    assert refresh_info["active"] is True and refresh_info["typ"] == "Refresh"
    assert (await post(client, {"token": "junk"}, path=path)).json() == {"active": False}
    clock.advance(1801)
    assert (await post(client, {"token": body["access_token"]}, path=path)).json() == {"active": False}
    assert (await post(client, {"token": body["refresh_token"]}, path=path)).json() == {"active": False}
    public = await post(client, {"token": "x", "client_id": "dc-public"}, auth=None, path=path)
    assert error_of(public) == (403, "invalid_request", "Client not allowed.")


# -- device flow -------------------------------------------------------------------------------------
async def start_device(client: httpx.AsyncClient, **extra: str) -> dict[str, Any]:
    resp = await post(client, {"client_id": "dc-public", **extra}, auth=None, path=f"{OIDC}/auth/device")
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


async def poll(client: httpx.AsyncClient, device_code: str) -> httpx.Response:
    form = {"grant_type": DEVICE_GRANT, "device_code": device_code, "client_id": "dc-public"}
    return await post(client, form, auth=None)


@pytest.mark.parametrize(("realm_overrides", "interval"), [({}, 5), ({"device_interval": 1}, 1)])
async def test_device_flow_pending_slow_down_approved(
    client: httpx.AsyncClient, idp: DevIdP, clock: FakeClock, interval: int
) -> None:
    start = await start_device(client, scope="openid")
    assert (start["expires_in"], start["interval"]) == (600, interval)  # 5: Keycloak's default
    assert start["verification_uri"] == f"{BASE}/realms/demo/device"
    assert start["verification_uri_complete"] == f"{BASE}/realms/demo/device?user_code={start['user_code']}"
    code = start["device_code"]
    assert error_of(await poll(client, code))[1] == "authorization_pending"
    clock.advance(0.4 * interval)
    assert error_of(await poll(client, code)) == (400, "slow_down", "Slow down")
    clock.advance(interval)
    assert error_of(await poll(client, code))[1] == "authorization_pending"
    idp.approve_device(start["user_code"].lower().replace("-", ""), "demo")  # codes match loosely
    clock.advance(interval)
    body = (await poll(client, code)).json()
    assert body["scope"] == "openid profile email" and "id_token" in body and body["refresh_expires_in"] == 1800
    assert claims_of(body["access_token"])["preferred_username"] == "demo"
    clock.advance(interval)
    assert error_of(await poll(client, code)) == (400, "invalid_grant", "Device code not valid")
    idp.realm("demo").device_interval = 3  # a changed setting holds for the authorizations made after it
    assert (await start_device(client))["interval"] == 3


async def test_slow_down_counts_from_the_last_accepted_poll(client: httpx.AsyncClient, clock: FakeClock) -> None:
    """keycloak.md: "slow_down counts from the last accepted poll": a poll answered slow_down does
    not start the interval again (Keycloak's polling mark lives ``interval`` s from the poll that set it)."""
    code = (await start_device(client))["device_code"]  # interval 5
    assert error_of(await poll(client, code))[1] == "authorization_pending"  # t=0: accepted
    clock.advance(3)
    assert error_of(await poll(client, code)) == (400, "slow_down", "Slow down")  # t=3: too early, refused
    clock.advance(2.5)  # t=5.5: 5.5 s after the accepted poll, 2.5 s after the refused one
    pending = (400, "authorization_pending", "The authorization request is still pending")
    assert error_of(await poll(client, code)) == pending
    clock.advance(4)  # t=9.5: 4 s after the accepted poll at 5.5
    assert error_of(await poll(client, code)) == (400, "slow_down", "Slow down")


def test_a_bad_device_interval_on_the_command_line_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("0", "-1", "0.5", "soon"):
        with pytest.raises(SystemExit) as info:
            main(["--device-interval", bad])  # refused while parsing: nothing is served
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert f"argument --device-interval: {bad!r} is not a whole number of seconds, 1 or more" in err


async def test_device_flow_denied_and_expired(client: httpx.AsyncClient, idp: DevIdP, clock: FakeClock) -> None:
    denied, expired = await start_device(client), await start_device(client)
    idp.deny_device(denied["user_code"])
    assert error_of(await poll(client, denied["device_code"])) == (
        400,
        "access_denied",
        "The end user denied the authorization request",
    )
    clock.advance(601)
    assert error_of(await poll(client, expired["device_code"])) == (400, "expired_token", "Device code is expired")
    with pytest.raises(KeyError):
        idp.approve_device(expired["user_code"], "demo")


async def test_device_flow_refusals(client: httpx.AsyncClient, idp: DevIdP) -> None:
    start = await start_device(client)
    with pytest.raises(KeyError):
        idp.approve_device(start["user_code"], "ghost")
    with pytest.raises(ValueError, match="disabled"):
        idp.approve_device(start["user_code"], "disabled")
    other_client = await post(client, {"grant_type": DEVICE_GRANT, "device_code": start["device_code"]})
    assert error_of(other_client) == (400, "invalid_grant", "Device code not valid")
    idp.realm("demo").client("dc-public").device_grant = False  # type: ignore[union-attr]
    refused = await post(client, {"client_id": "dc-public"}, auth=None, path=f"{OIDC}/auth/device")
    assert error_of(refused)[:2] == (400, "unauthorized_client")


async def test_device_verification_page(client: httpx.AsyncClient, clock: FakeClock) -> None:
    start = await start_device(client)
    page = await client.get(start["verification_uri_complete"])
    assert page.status_code == 200 and start["user_code"] in page.text and "<form" in page.text
    url = start["verification_uri"]
    form = {"user_code": start["user_code"], "username": "demo", "action": "approve"}
    wrong = await client.post(url, data=form | {"password": "nope"})
    assert wrong.status_code == 400 and "Invalid user credentials" in wrong.text
    bad_code = await client.post(url, data=form | {"user_code": "XXXX-XXXX", "password": "demo"})
    assert bad_code.status_code == 400 and "Invalid code" in bad_code.text
    ok = await client.post(url, data=form | {"password": "demo"})
    assert ok.status_code == 200 and "Successful" in ok.text
    assert (await poll(client, start["device_code"])).status_code == 200
    other = await start_device(client)
    await client.post(url, data={"user_code": other["user_code"], "action": "deny"})
    assert error_of(await poll(client, other["device_code"]))[1] == "access_denied"


# -- authorization code + PKCE ---------------------------------------------------------------------------
REDIRECT = "http://127.0.0.1:8400/callback"
VERIFIER = "v" * 43


async def auth_code(client: httpx.AsyncClient, **params: str) -> str:
    """A code from the login page for dc-public (the first call signs in; the SSO cookie skips it then)."""
    query = {"client_id": "dc-public", "redirect_uri": REDIRECT, "response_type": "code", "scope": "openid",
             "state": "S", "code_challenge": s256(VERIFIER), "code_challenge_method": "S256", **params}  # fmt: skip
    page = await client.get(f"{OIDC}/auth", params=query)
    if page.status_code == 200:  # the login page
        page = await client.post(f"{OIDC}/auth", data=query | {"username": "demo", "password": "demo"})
    assert page.status_code == 302, page.text
    location = httpx.URL(page.headers["location"])
    assert str(location).startswith(REDIRECT) and location.params["state"] == "S"
    return location.params["code"]


async def exchange(client: httpx.AsyncClient, code: str, **form: str) -> httpx.Response:
    base = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT, "client_id": "dc-public",
            "code_verifier": VERIFIER}  # fmt: skip
    merged = {k: v for k, v in (base | form).items() if v}
    return await post(client, merged, auth=None)


async def test_code_exchange_refusals_in_keycloaks_words(client: httpx.AsyncClient) -> None:
    """keycloak.md lists no code or PKCE texts; these are the dev IdP's, each a 400 invalid_grant as
    Keycloak's are: a missing verifier in Keycloak's own words (its OAuthProofKeyForCodeExchangeTest),
    a wrong one as Keycloak 26 says it. A refused exchange spends the code, as Keycloak's does."""
    wrong_verifier = await exchange(client, await auth_code(client), code_verifier="w" * 43)
    assert error_of(wrong_verifier) == (400, "invalid_grant", "PKCE verification failed: Code mismatch")
    no_verifier = await exchange(client, await auth_code(client), code_verifier="")
    assert error_of(no_verifier) == (400, "invalid_grant", "PKCE code verifier not specified")
    other_redirect = await exchange(client, await auth_code(client), redirect_uri="http://127.0.0.1:8401/callback")
    assert error_of(other_redirect) == (400, "invalid_grant", "Incorrect redirect_uri")
    no_redirect = await exchange(client, await auth_code(client), redirect_uri="")
    assert error_of(no_redirect) == (400, "invalid_grant", "Incorrect redirect_uri")
    code = await auth_code(client)
    other_client = await post(client, {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT,
                                       "code_verifier": VERIFIER})  # fmt: skip
    assert error_of(other_client) == (400, "invalid_grant", "Auth error")
    assert error_of(await exchange(client, code)) == (400, "invalid_grant", "Code not valid")  # spent
    good = await auth_code(client)
    assert (await exchange(client, good)).status_code == 200
    assert error_of(await exchange(client, good)) == (400, "invalid_grant", "Code not valid")  # used once
    for said in ("PKCE verification failed: Code mismatch", "Code not valid"):
        assert table_row((400, "invalid_grant", said), "authorization_code") is refusals.Meaning.CREDENTIAL_WRONG


@pytest.mark.parametrize(
    ("params", "said"),
    [
        ({"redirect_uri": "https://evil.example/cb"}, "Invalid parameter: client_id or redirect_uri"),
        ({"client_id": "ghost"}, "Invalid parameter: client_id or redirect_uri"),
        ({"code_challenge": ""}, "Missing parameter: code_challenge (PKCE S256)"),
        ({"code_challenge_method": "plain"}, "Missing parameter: code_challenge (PKCE S256)"),
    ],
    ids=["redirect-not-loopback", "unknown-client", "no-challenge", "plain"],
)
async def test_the_login_page_refuses_a_bad_redirect_or_no_pkce(
    client: httpx.AsyncClient, params: dict[str, str], said: str
) -> None:
    """The dev IdP's own texts (keycloak.md has none for the authorization endpoint): a page, 400, and
    no redirect anywhere."""
    query = {"client_id": "dc-public", "redirect_uri": REDIRECT, "response_type": "code",
             "code_challenge": s256(VERIFIER), "code_challenge_method": "S256", **params}  # fmt: skip
    page = await client.get(f"{OIDC}/auth", params=query)
    assert page.status_code == 400 and "location" not in page.headers
    assert f"<p class=error>{said}</p>" in page.text


# -- the demo API -------------------------------------------------------------------------------------
async def test_demo_api_200_401_403(client: httpx.AsyncClient, clock: FakeClock) -> None:
    demo, viewer = await login(client), await login(client, "viewer")
    ok = await call_api(client, demo["access_token"])
    assert ok.status_code == 200 and {"id": "openai", "name": "OpenAI", "auth": "api_key"} in ok.json()
    forbidden = await call_api(client, viewer["access_token"])
    assert forbidden.status_code == 403
    missing = await call_api(client, None)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    foreign = (await _foreign_token())["access_token"]
    for bad in ["not-a-jwt", demo["access_token"][:-4] + "AAAA", foreign]:
        resp = await call_api(client, bad)
        assert resp.status_code == 401 and resp.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    clock.advance(1800)
    assert (await call_api(client, demo["access_token"])).status_code == 200
    clock.advance(1)
    assert (await call_api(client, demo["access_token"])).status_code == 401


async def _foreign_token() -> dict[str, Any]:
    other = DevIdP([demo_realm()])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=other.app), base_url=BASE) as c:
        return await login(c)


async def test_demo_api_role_is_configurable(clock: FakeClock) -> None:
    idp = DevIdP([demo_realm()], clock=clock, api_role="uma_authorization")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=idp.app), base_url=BASE) as c:
        viewer = await login(c, "viewer")
        assert (await call_api(c, viewer["access_token"])).status_code == 200


async def test_demo_api_refuses_tokens_of_killed_sessions(client: httpx.AsyncClient, idp: DevIdP) -> None:
    body = await login(client)
    idp.kill_sessions("demo")
    assert (await call_api(client, body["access_token"])).status_code == 401


# -- stats ----------------------------------------------------------------------------------------------
async def test_stats_count_token_requests(client: httpx.AsyncClient, idp: DevIdP) -> None:
    body = await login(client)
    await refresh(client, body["refresh_token"])
    await post(client, {"grant_type": "password", "username": "demo", "password": "bad"})
    await post(client, {"grant_type": "client_credentials", "client_id": "dc-public"}, auth=None)
    assert idp.stats.token_requests == {
        ("demo", "dc-cli", "password"): 2,
        ("demo", "dc-cli", "refresh_token"): 1,
        ("demo", "dc-public", "client_credentials"): 1,
    }
    assert idp.stats.total == 4
    idp.stats.reset()
    assert idp.stats.total == 0


# -- faults -------------------------------------------------------------------------------------------
async def test_fault_fail_next_with_retry_after(client: httpx.AsyncClient, idp: DevIdP) -> None:
    idp.faults.fail_next(2, status=503, retry_after=2)
    for _ in range(2):
        resp = await post(client, {"grant_type": "client_credentials"}, auth=("dc-service", "dc-service-secret"))
        assert (resp.status_code, resp.headers["retry-after"]) == (503, "2")
    resp = await post(client, {"grant_type": "client_credentials"}, auth=("dc-service", "dc-service-secret"))
    assert resp.status_code == 200 and idp.stats.total == 3
    assert (await client.get(f"{OIDC}/certs")).status_code == 200  # token endpoint only by default


@pytest.mark.parametrize(
    ("kind", "status", "check"),
    [
        ("html", 200, lambda r: r.text.startswith("<html>") and "text/html" in r.headers["content-type"]),
        ("html", 502, lambda r: "Bad Gateway" in r.text),
        ("truncated", 200, lambda r: r.text.startswith('{"access_token"') and not r.text.endswith("}")),
        ("no_access_token", 200, lambda r: "access_token" not in r.json() and r.json()["token_type"] == "Bearer"),
        ("empty", 200, lambda r: r.content == b""),
    ],
)
async def test_fault_malformed_bodies(
    client: httpx.AsyncClient, idp: DevIdP, kind: Any, status: int, check: Callable[[httpx.Response], bool]
) -> None:
    idp.faults.malformed(kind, count=1, status=status)
    resp = await post(client, {"grant_type": "password", "username": "demo", "password": "demo"})
    assert resp.status_code == status and check(resp)
    if kind == "truncated":
        with pytest.raises(json.JSONDecodeError):
            resp.json()
    assert "access_token" in (await login(client))  # one-shot


async def test_fault_malformed_rejects_unknown_kind(idp: DevIdP) -> None:
    with pytest.raises(ValueError, match="unknown malformed kind"):
        idp.faults.malformed("xml")  # type: ignore[arg-type]


async def test_fault_latency_uses_trio_time(client: httpx.AsyncClient, idp: DevIdP, autojump_clock: Any) -> None:
    idp.faults.latency = 2.0
    start = trio.current_time()
    await login(client)
    assert trio.current_time() - start == pytest.approx(2.0)
    await client.get(f"{OIDC}/certs")
    assert trio.current_time() - start == pytest.approx(2.0)  # other endpoints unaffected...
    idp.faults.all_endpoints = True
    await client.get(f"{OIDC}/certs")
    assert trio.current_time() - start == pytest.approx(4.0)  # ...unless asked


async def test_fault_hang_until_cleared(client: httpx.AsyncClient, idp: DevIdP, autojump_clock: Any) -> None:
    idp.faults.hang = True
    results: list[int] = []

    async def attempt() -> None:
        results.append(
            (
                await post(client, {"grant_type": "client_credentials"}, auth=("dc-service", "dc-service-secret"))
            ).status_code
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(attempt)
        await trio.sleep(3600)
        assert results == [] and idp.stats.total == 1  # arrived, counted, never answered
        idp.faults.clear()
    assert results == [200] and not idp.faults.hang
    idp.faults.hang = True
    with trio.move_on_after(30) as scope:
        await attempt()
    assert scope.cancelled_caught


async def test_fault_on_all_endpoints(client: httpx.AsyncClient, idp: DevIdP) -> None:
    idp.faults.all_endpoints = True
    idp.faults.fail_next(1, status=500)
    assert (await client.get(API)).status_code == 500
    assert idp.faults.pending == 0


# -- real HTTP and a real process ---------------------------------------------------------------------
async def test_serve_over_real_http_then_refuses_after_cancel() -> None:
    idp = DevIdP(
        [demo_realm(), DevRealm("other", users=[DevUser("u", "p", ["dc-api"])], clients=[DevClient("c", "s")])]
    )
    async with running() as nursery:
        base_url = await nursery.start(serve, idp)
        assert base_url.startswith("http://127.0.0.1:")
        async with httpx.AsyncClient(base_url=base_url) as http:
            doc = (await http.get("/realms/other/.well-known/openid-configuration")).json()
            assert doc["issuer"] == f"{base_url}/realms/other"
            resp = await http.post(
                "/realms/other/protocol/openid-connect/token",
                data={"grant_type": "password", "username": "u", "password": "p"},
                headers=basic("c", "s"),
            )
            assert resp.status_code == 200 and resp.headers["cache-control"] == "no-store"
            api = await http.get(API, headers={"Authorization": f"Bearer {resp.json()['access_token']}"})
            assert api.status_code == 200
    async with httpx.AsyncClient(base_url=base_url) as http:
        with pytest.raises(httpx.ConnectError):
            await http.get("/realms/demo/.well-known/openid-configuration")


async def test_command_line_prints_url_first_and_exits_0_on_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dc_broker.devserver", "--access-lifespan", "60", "--rotate", "--device-interval", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        base_url = await trio.to_thread.run_sync(proc.stdout.readline)
        base_url = base_url.strip()
        assert base_url.startswith("http://127.0.0.1:")
        async with httpx.AsyncClient(base_url=base_url) as http:
            resp = await http.post(
                "/auth/realms/demo/protocol/openid-connect/token",
                data={"grant_type": "password", "username": "demo", "password": "demo"},
                headers=basic(*CLI),
            )
            assert resp.json()["expires_in"] == 60
            device = await http.post(f"{OIDC}/auth/device", data={"client_id": "dc-public"})
            assert device.json()["interval"] == 2
        proc.send_signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(proc.wait, 10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
