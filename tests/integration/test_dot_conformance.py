"""What Django OAuth Toolkit really answers at the token endpoint, recorded with plain httpx.

These pin DOT's behaviour where it differs from Keycloak (see /work/shared/keycloak.md), so the
broker's assumptions are checked against a real server rather than against our own dev IdP:

* wrong password: DOT 400 invalid_grant "Invalid credentials given." (Keycloak 401 invalid_grant)
* wrong / missing client secret: DOT 401 invalid_client, no description, ``WWW-Authenticate: Bearer``
  (Keycloak 20+: 401 unauthorized_client)
* no ``refresh_expires_in`` ever; client_credentials grants no refresh token
* rotation: the used refresh token is refused with a bare 400 invalid_grant (no description), and
  DOT *deletes the previous access token* on refresh: it is refused at once, before its expiry
  (Keycloak keeps it valid until ``exp``)
* scope ``openid`` without OIDC enabled: 400 invalid_scope
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.integration.conftest import DotServer
from tests.integration.dot_idp import (
    ACCESS_LIFETIME,
    PASSWORD,
    PASSWORD_CLIENT_ID,
    PASSWORD_CLIENT_SECRET,
    SERVICE_CLIENT_ID,
    SERVICE_CLIENT_SECRET,
    USERNAME,
)
from tests.integration.helpers import basic, bearer

pytestmark = pytest.mark.integration

CLI = basic(PASSWORD_CLIENT_ID, PASSWORD_CLIENT_SECRET)
SVC = basic(SERVICE_CLIENT_ID, SERVICE_CLIENT_SECRET)
LOGIN = {"grant_type": "password", "username": USERNAME, "password": PASSWORD}
INVALID_CLIENT = (401, {"error": "invalid_client"})


def post(server: DotServer, form: dict[str, str], headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(server.token_url, data=form, headers=headers or {}, timeout=10)


def outcome(resp: httpx.Response) -> tuple[int, Any]:
    return resp.status_code, resp.json()


def hello(server: DotServer, token: str | None) -> httpx.Response:
    return httpx.get(server.hello_url, headers=bearer(token) if token else {}, timeout=10)


def assert_token_response(resp: httpx.Response, *, refresh: bool) -> dict[str, Any]:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/json"
    assert resp.headers["cache-control"] == "no-store"
    body: dict[str, Any] = resp.json()
    expected = {"access_token", "expires_in", "token_type", "scope"} | ({"refresh_token"} if refresh else set())
    assert set(body) == expected  # notably no refresh_expires_in, id_token, session_state, not-before-policy
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == ACCESS_LIFETIME
    assert body["scope"] == "read write"
    return body


@pytest.mark.parametrize("auth", ["basic", "post"])
def test_password_grant(dot_server: DotServer, auth: str) -> None:
    if auth == "basic":
        resp = post(dot_server, LOGIN, CLI)
    else:
        resp = post(dot_server, {**LOGIN, "client_id": PASSWORD_CLIENT_ID, "client_secret": PASSWORD_CLIENT_SECRET})
    body = assert_token_response(resp, refresh=True)
    ok = hello(dot_server, body["access_token"])
    assert (ok.status_code, ok.json()) == (200, {"hello": USERNAME})


def test_protected_view_without_or_with_a_bad_token(dot_server: DotServer) -> None:
    missing = hello(dot_server, None)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer ")
    bad = hello(dot_server, "not-a-token")
    assert bad.status_code == 401
    assert 'error="invalid_token"' in bad.headers["www-authenticate"]


@pytest.mark.parametrize("auth", ["basic", "post"])
def test_client_credentials_grant_has_no_refresh_token(dot_server: DotServer, auth: str) -> None:
    if auth == "basic":
        resp = post(dot_server, {"grant_type": "client_credentials"}, SVC)
    else:
        form = {
            "grant_type": "client_credentials",
            "client_id": SERVICE_CLIENT_ID,
            "client_secret": SERVICE_CLIENT_SECRET,
        }
        resp = post(dot_server, form)
    body = assert_token_response(resp, refresh=False)
    assert hello(dot_server, body["access_token"]).status_code == 200


def test_refresh_rotates_and_the_used_refresh_token_is_refused(dot_server: DotServer) -> None:
    first = assert_token_response(post(dot_server, LOGIN, CLI), refresh=True)
    second = assert_token_response(
        post(dot_server, {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}, CLI), refresh=True
    )
    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    # reuse of the rotated refresh token: a bare invalid_grant (Keycloak: "Maximum allowed refresh token reuse exceeded")
    reuse = post(dot_server, {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}, CLI)
    assert outcome(reuse) == (400, {"error": "invalid_grant"})
    # unlike Keycloak, DOT revokes the previous access token on refresh, long before its expiry
    old = hello(dot_server, first["access_token"])
    assert old.status_code == 401
    assert 'error_description="The access token is invalid."' in old.headers["www-authenticate"]
    assert hello(dot_server, second["access_token"]).status_code == 200
    # the reuse above did not poison the family (REFRESH_TOKEN_REUSE_PROTECTION is off): the new one works once
    third = post(dot_server, {"grant_type": "refresh_token", "refresh_token": second["refresh_token"]}, CLI)
    assert_token_response(third, refresh=True)
    rows = dot_server.query(
        "SELECT token, revoked IS NOT NULL, token_family FROM oauth2_provider_refreshtoken WHERE token IN (?, ?, ?)",
        first["refresh_token"],
        second["refresh_token"],
        third.json()["refresh_token"],
    )
    by_token = {token: (revoked, family) for token, revoked, family in rows}
    assert [by_token[t["refresh_token"]][0] for t in (first, second, third.json())] == [1, 1, 0]
    assert len({family for _, family in by_token.values()}) == 1


@pytest.mark.parametrize(
    ("case", "form", "headers", "expected"),
    [
        pytest.param(
            "wrong password",
            {**LOGIN, "password": "wrong"},
            CLI,
            (400, {"error": "invalid_grant", "error_description": "Invalid credentials given."}),
            id="wrong-password",
        ),
        pytest.param(
            "unknown user",
            {**LOGIN, "username": "mallory"},
            CLI,
            (400, {"error": "invalid_grant", "error_description": "Invalid credentials given."}),
            id="unknown-user",
        ),
        pytest.param(
            "wrong secret (basic)", LOGIN, basic(PASSWORD_CLIENT_ID, "wrong"), INVALID_CLIENT, id="wrong-secret-basic"
        ),
        pytest.param(
            "wrong secret (post)",
            {**LOGIN, "client_id": PASSWORD_CLIENT_ID, "client_secret": "wrong"},
            {},
            INVALID_CLIENT,
            id="wrong-secret-post",
        ),
        pytest.param(
            "wrong secret (client_credentials)",
            {"grant_type": "client_credentials"},
            basic(SERVICE_CLIENT_ID, "wrong"),
            INVALID_CLIENT,
            id="wrong-secret-cc",
        ),
        pytest.param("unknown client", LOGIN, basic("nobody", "x"), INVALID_CLIENT, id="unknown-client"),
        pytest.param("no client auth", LOGIN, {}, INVALID_CLIENT, id="no-client-auth"),
        pytest.param(
            "client_id only (public-client style) for a confidential client",
            {**LOGIN, "client_id": PASSWORD_CLIENT_ID},
            {},
            INVALID_CLIENT,
            id="client-id-only",
        ),
        pytest.param(
            "grant not allowed for this application",
            {"grant_type": "client_credentials"},
            CLI,
            (400, {"error": "unauthorized_client"}),
            id="grant-not-allowed",
        ),
        pytest.param(
            "scope openid (OIDC not enabled)",
            {**LOGIN, "scope": "openid"},
            CLI,
            (400, {"error": "invalid_scope"}),
            id="scope-openid",
        ),
        pytest.param(
            "garbage refresh token",
            {"grant_type": "refresh_token", "refresh_token": "garbage"},
            CLI,
            (400, {"error": "invalid_grant"}),
            id="garbage-refresh",
        ),
        pytest.param(
            "unsupported grant",
            {"grant_type": "frobnicate"},
            CLI,
            (400, {"error": "unsupported_grant_type"}),
            id="grant-type",
        ),
    ],
)
def test_error_answers(
    dot_server: DotServer, case: str, form: dict[str, str], headers: dict[str, str], expected: tuple[int, Any]
) -> None:
    resp = post(dot_server, form, headers)
    assert outcome(resp) == expected, case
    assert resp.headers["content-type"] == "application/json"
    if resp.status_code == 401:
        # DOT challenges with the Bearer scheme even for client authentication failures
        assert resp.headers["www-authenticate"] == 'Bearer error="invalid_client"'


def test_basic_auth_must_be_form_urlencoded(dot_server: DotServer) -> None:
    """DOT form-decodes id and secret from Basic auth: a raw secret with '+', '%' or ' ' does not match."""
    raw = httpx.post(dot_server.token_url, data=LOGIN, auth=(PASSWORD_CLIENT_ID, PASSWORD_CLIENT_SECRET), timeout=10)
    assert outcome(raw) == INVALID_CLIENT
    assert post(dot_server, LOGIN, CLI).status_code == 200


def test_revoke_refresh_token(dot_server: DotServer) -> None:
    tokens = assert_token_response(post(dot_server, LOGIN, CLI), refresh=True)
    revoke = httpx.post(
        dot_server.revoke_url,
        data={"token": tokens["refresh_token"], "token_type_hint": "refresh_token"},
        headers=CLI,
        timeout=10,
    )
    assert (revoke.status_code, revoke.content) == (200, b"")
    refused = post(dot_server, {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}, CLI)
    assert outcome(refused) == (400, {"error": "invalid_grant"})
    assert hello(dot_server, tokens["access_token"]).status_code == 401  # the access token went with it


def test_unknown_tenant_is_a_plain_404(dot_server: DotServer) -> None:
    resp = httpx.post(
        dot_server.base + "/auth/realms/other/protocol/openid-connect/token", data=LOGIN, headers=CLI, timeout=10
    )
    assert resp.status_code == 404
    assert resp.headers["content-type"].startswith("text/html")
