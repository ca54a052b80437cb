"""Building token requests and parsing whatever an IdP answers: pure, no network."""

from __future__ import annotations

import base64
import json
from urllib.parse import parse_qsl

import pytest

from dc_broker import oidc
from dc_broker.config import Profile
from dc_broker.oidc import ClientCredentials, HttpResponse
from dc_broker.secret import Secret
from dc_token.errors import OAuthError, UpstreamGarbage, UpstreamTransient

URL = "https://sso.example.com/auth/realms/acme/protocol/openid-connect/token"


def ok(body: dict, status: int = 200) -> HttpResponse:
    return HttpResponse(status, {"content-type": "application/json"}, json.dumps(body).encode())


def test_password_grant_with_basic_auth_urlencodes_id_and_secret() -> None:
    client = ClientCredentials("my client", "basic", Secret("s:e/c r"))
    req = oidc.build_password(URL, client, "alice", Secret("pa ss"), scope="openid")
    assert dict(parse_qsl(req.body().decode())) == {
        "grant_type": "password",
        "username": "alice",
        "password": "pa ss",
        "scope": "openid",
    }
    auth = base64.b64decode(req.headers["Authorization"].removeprefix("Basic ")).decode()
    assert auth == "my%20client:s%3Ae%2Fc%20r"
    assert "pa ss" not in repr(req) and "s:e/c r" not in repr(req)


def test_client_secret_post_and_public_clients() -> None:
    post = oidc.build_client_credentials(URL, ClientCredentials("svc", "post", Secret("x")))
    assert dict(post.form) == {"grant_type": "client_credentials", "client_id": "svc", "client_secret": "x"}
    assert "Authorization" not in post.headers
    public = oidc.build_refresh(URL, ClientCredentials("cli", "none"), Secret("rt"))
    assert dict(public.form) == {"grant_type": "refresh_token", "refresh_token": "rt", "client_id": "cli"}


def test_keycloak_success_response() -> None:
    tok = oidc.parse_token_response(
        ok(
            {
                "access_token": "AT",
                "expires_in": 1800,
                "refresh_expires_in": 1800,
                "refresh_token": "RT",
                "token_type": "Bearer",
                "not-before-policy": 0,
                "session_state": "s",
                "scope": "profile email",
            }
        ),
        now=100.0,
    )
    assert tok.access_token.reveal() == "AT" and tok.refresh_token == Secret("RT")
    assert tok.expires_at == 1900 and tok.refresh_expires_at == 1900 and tok.scope == "profile email"
    assert "AT" not in repr(tok) and "RT" not in repr(tok)


def test_refresh_expires_in_zero_means_no_deadline_and_cc_has_no_refresh_token() -> None:
    tok = oidc.parse_token_response(ok({"access_token": "A", "expires_in": 60, "refresh_expires_in": 0}), 0)
    assert tok.refresh_token is None and tok.refresh_expires_at is None
    offline = oidc.parse_token_response(
        ok({"access_token": "A", "expires_in": 60, "refresh_token": "R", "refresh_expires_in": 0}), 0
    )
    assert offline.refresh_token is not None and offline.refresh_expires_at is None


@pytest.mark.parametrize(
    ("status", "body", "error", "description"),
    [
        (
            401,
            {"error": "invalid_grant", "error_description": "Invalid user credentials"},
            "invalid_grant",
            "Invalid user credentials",
        ),
        (
            400,
            {"error": "invalid_grant", "error_description": "Token is not active"},
            "invalid_grant",
            "Token is not active",
        ),
        (
            401,
            {"error": "unauthorized_client", "error_description": "Invalid client or Invalid client credentials"},
            "unauthorized_client",
            "Invalid client or Invalid client credentials",
        ),
        (
            400,
            {"error": "unauthorized_client", "error_description": "Client not allowed for direct access grants"},
            "unauthorized_client",
            "Client not allowed for direct access grants",
        ),
        (400, {"error": "invalid_request"}, "invalid_request", ""),
    ],
)
def test_oauth_errors_are_typed(status: int, body: dict, error: str, description: str) -> None:
    with pytest.raises(OAuthError) as info:
        oidc.parse_token_response(ok(body, status), 0)
    assert (info.value.error, info.value.description, info.value.status) == (error, description, status)


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429, 408])
def test_server_trouble_is_transient_with_retry_after(status: int) -> None:
    resp = HttpResponse(status, {"retry-after": "7", "content-type": "text/html"}, b"<html>busy</html>")
    with pytest.raises(UpstreamTransient) as info:
        oidc.parse_token_response(resp, 0)
    assert info.value.retry_after == 7.0


@pytest.mark.parametrize(
    ("resp", "match"),
    [
        (HttpResponse(200, {"content-type": "text/html"}, b"<html>login</html>"), "text/html"),
        (HttpResponse(200, {"content-type": "application/json"}, b'{"access_token": "A", "expi'), "not a JSON"),
        (HttpResponse(200, {}, b""), "empty"),
        (ok({"token_type": "Bearer", "expires_in": 5}), "without an access_token"),
        (ok({"access_token": "A"}), "expires_in"),
        (ok({"access_token": "A", "expires_in": "soon"}), "expires_in"),
        (ok({"access_token": "A", "expires_in": 60, "token_type": "mac"}), "not a Bearer"),
        (ok(["not", "an", "object"]), "not a JSON object"),
        (HttpResponse(400, {"content-type": "text/plain"}, b"Bad Request"), "HTTP 400"),
    ],
)
def test_garbage_is_a_clear_error(resp: HttpResponse, match: str) -> None:
    with pytest.raises(UpstreamGarbage, match=match):
        oidc.parse_token_response(resp, 0)


def test_endpoints_from_server_and_tenant_legacy_and_quarkus() -> None:
    legacy = Profile(name="a", server="https://sso.example.com", tenant="acme", client_id="c", username="u")
    assert oidc.static_endpoints(legacy).token == URL  # type: ignore[union-attr]
    quarkus = Profile(
        name="b", server="https://sso.example.com/", tenant="acme", client_id="c", username="u", legacy_paths=False
    )
    assert oidc.static_endpoints(quarkus).token == URL.replace("/auth", "")  # type: ignore[union-attr]
    already = Profile(name="c", server="https://sso.example.com/auth", tenant="acme", client_id="c", username="u")
    assert oidc.static_endpoints(already).token == URL  # type: ignore[union-attr]
    issuer = Profile(name="d", issuer="https://sso.example.com/realms/acme", client_id="c", username="u")
    assert oidc.static_endpoints(issuer) is None


def test_discovery_document() -> None:
    eps = oidc.parse_discovery(
        ok(
            {
                "issuer": "https://sso.example.com/realms/acme",
                "token_endpoint": "https://sso.example.com/realms/acme/protocol/openid-connect/token",
                "device_authorization_endpoint": "https://sso.example.com/realms/acme/protocol/openid-connect/auth/device",
            }
        ),
        "https://sso.example.com/realms/acme",
    )
    assert eps.token.endswith("/token") and eps.device and eps.device.endswith("/auth/device")
    with pytest.raises(UpstreamGarbage, match="no token_endpoint"):
        oidc.parse_discovery(ok({"issuer": "x"}), "https://sso.example.com/realms/acme")


def test_device_authorization_parsing() -> None:
    dev = oidc.parse_device_start(
        ok(
            {
                "device_code": "DC",
                "user_code": "ABCD-EFGH",
                "verification_uri": "https://x/device",
                "expires_in": 600,
                "interval": 5,
            }
        ),
        now=10,
    )
    assert dev.user_code == "ABCD-EFGH" and dev.expires_at == 610 and dev.interval == 5
    assert "DC" not in repr(dev)
