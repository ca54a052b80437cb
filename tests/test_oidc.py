"""Building token requests and parsing whatever an IdP answers: pure, no network."""

from __future__ import annotations

import base64
import json
from urllib.parse import parse_qsl

import pytest

from dc_broker.config import Profile
from dc_broker.errors import ConfigError, OAuthError, UpstreamGarbage, UpstreamTransient
from dc_broker.idp import oidc
from dc_broker.idp.oidc import ClientCredentials, HttpResponse
from dc_broker.secret import Secret

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
        (ok({"access_token": "A", "expires_in": 60, "token_type": "mac"}), "not a Bearer"),
        (ok(["not", "an", "object"]), "not a JSON object"),
        (HttpResponse(302, {"content-type": "text/plain"}, b"Found"), "HTTP 302"),
        (HttpResponse(418, {"content-type": "text/html"}, b"<p>teapot</p>"), "HTTP 418"),
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


@pytest.mark.parametrize("status", [400, 401, 403])
@pytest.mark.parametrize(
    ("ctype", "body", "said"),
    [
        ("application/json", b"", "an empty body"),
        ("text/html", b"<html><body><h1>401 Authorization Required</h1></body></html>", "text/html"),
        ("text/plain", b"Bad Request", "text/plain"),
        ("application/json", b'{"message": "no"}', "application/json"),
    ],
)
def test_a_refusal_without_an_oauth_body_is_still_a_refusal(status: int, ctype: str, body: bytes, said: str) -> None:
    resp = HttpResponse(status, {"content-type": ctype}, body)
    with pytest.raises(OAuthError) as info:
        oidc.parse_token_response(resp, 0)
    assert info.value.error == "refused" and info.value.status == status and said in info.value.description


@pytest.mark.parametrize(
    ("raw", "lifetime"),
    [
        ("300", 300.0),
        ("1", 1.0),
        ("31536000", oidc.MAX_LIFETIME),
        ("NaN", oidc.DEFAULT_LIFETIME),
        ("Infinity", oidc.DEFAULT_LIFETIME),
        ("1e999", oidc.DEFAULT_LIFETIME),
        ("1e18", oidc.DEFAULT_LIFETIME),
        ("-Infinity", oidc.DEFAULT_LIFETIME),
        ("0", oidc.DEFAULT_LIFETIME),
        ("-5", oidc.DEFAULT_LIFETIME),
        ("0.2", oidc.DEFAULT_LIFETIME),
        ('"soon"', oidc.DEFAULT_LIFETIME),
        ('"300"', oidc.DEFAULT_LIFETIME),
        ("null", oidc.DEFAULT_LIFETIME),
        ("true", oidc.DEFAULT_LIFETIME),
        (None, oidc.DEFAULT_LIFETIME),
    ],
)
def test_expires_in_rule_for_an_opaque_token(raw: str | None, lifetime: float) -> None:
    """A sane expires_in is used as it is; anything else (absent, zero, negative, absurd, not a number)
    means the documented default for a token that carries no exp of its own, and a note says so."""
    field = "" if raw is None else f', "expires_in": {raw}, "refresh_token": "R", "refresh_expires_in": {raw}'
    body = ('{"access_token": "A"' + field + "}").encode()
    tok = oidc.parse_token_response(HttpResponse(200, {"content-type": "application/json"}, body), now=1000.0)
    assert tok.lifetime == lifetime and tok.expires_at == 1000.0 + lifetime
    assert tok.refresh_expires_at is None or tok.refresh_expires_at - 1000.0 <= oidc.MAX_LIFETIME
    assert bool(tok.notes) is (raw != "300" and lifetime == oidc.DEFAULT_LIFETIME)


def jwt(**claims: object) -> str:
    """An unsigned JWT with these claims (the broker never checks an access token's signature)."""

    def part(data: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    return f"{part({'alg': 'none'})}.{part(claims)}.sig"


@pytest.mark.parametrize("raw", ["0", "-5", "null", "1e18", '"600"'])
def test_an_odd_expires_in_gives_way_to_the_jwts_own_lifetime(raw: str) -> None:
    body = json.dumps({"access_token": jwt(iat=5000.5, exp=5600.5)})[:-1] + f', "expires_in": {raw}}}'
    tok = oidc.parse_token_response(HttpResponse(200, {}, body.encode()), now=1000.0, wall=5000.0)
    assert tok.lifetime == 600.0  # exp - iat, whatever the clocks say
    assert tok.notes and "exp gives 600 s" in tok.notes[0]


def test_without_iat_the_jwts_exp_is_read_against_the_wall_clock_at_the_send() -> None:
    body = json.dumps({"access_token": jwt(exp=5900)}).encode()
    tok = oidc.parse_token_response(HttpResponse(200, {}, body), now=1000.0, wall=5000.0)
    assert tok.expires_at == 1900.0 and tok.notes


def test_keycloaks_whole_second_iat_makes_the_expiry_up_to_a_second_earlier() -> None:
    """Keycloak: iat = floor(now), exp = iat + lifespan, expires_in = exp - iat. Sent at wall 5000.9,
    the token is issued at 5000 and dies at 5060: counted as send + expires_in (5060.9) it would be
    served 0.9 s past its exp. The broker counts exp - iat from the send, less the second iat lost."""
    body = json.dumps({"access_token": jwt(iat=5000, exp=5060), "expires_in": 60}).encode()
    tok = oidc.parse_token_response(HttpResponse(200, {}, body), now=1000.0, wall=5000.9)
    assert tok.expires_at == 1059.0 and not tok.notes
    # the JWT only ever shortens: an exp beyond expires_in changes nothing
    body = json.dumps({"access_token": jwt(iat=5000, exp=9000), "expires_in": 60}).encode()
    assert oidc.parse_token_response(HttpResponse(200, {}, body), now=1000.0, wall=5000.9).expires_at == 1060.0


@pytest.mark.parametrize("skew", [-3600.0, -30.0, 0.0, 30.0, 3600.0])
def test_a_skewed_idp_clock_never_makes_a_keycloak_token_look_expired(skew: float) -> None:
    """With iat in the token, its exp is read relative to iat: an IdP an hour behind or ahead of the
    broker still gives a 300 s token 299 s."""
    iat = 5000 + skew
    body = json.dumps({"access_token": jwt(iat=iat, exp=iat + 300), "expires_in": 300}).encode()
    tok = oidc.parse_token_response(HttpResponse(200, {}, body), now=1000.0, wall=5000.0)
    assert tok.expires_at == 1299.0


def test_an_exp_without_iat_far_before_expires_in_caps_it_and_says_the_clocks_differ() -> None:
    body = json.dumps({"access_token": jwt(exp=5100), "expires_in": 3600}).encode()
    tok = oidc.parse_token_response(HttpResponse(200, {}, body), now=1000.0, wall=5000.0)
    assert tok.expires_at == 1100.0 and "clocks differ" in tok.notes[0]


@pytest.mark.parametrize(("body", "deadline"), [({}, 4000.0), ({"refresh_expires_in": 900}, 1900.0)])
def test_a_refresh_answer_without_a_refresh_token_keeps_the_presented_one(body: dict, deadline: float) -> None:
    """RFC 6749 section 6: the server MAY issue a new refresh token; without one, the client keeps
    the one it has, and its deadline unless the answer says a new one (an OP whose idle timeout
    slides with each use: the session model found a password sent while the kept token lived on)."""
    presented = oidc.Presented(Secret("RT-old"), 4000.0)
    tok = oidc.parse_token_response(ok({"access_token": "A", "expires_in": 300, **body}), 1000.0, presented=presented)
    assert tok.refresh_token == Secret("RT-old") and tok.refresh_expires_at == deadline


def test_the_same_refresh_token_back_keeps_its_deadline_unless_a_new_one_is_said() -> None:
    presented = oidc.Presented(Secret("RT"), 4000.0)
    same = oidc.parse_token_response(ok({"access_token": "A", "refresh_token": "RT"}), 1000.0, presented=presented)
    assert same.refresh_expires_at == 4000.0
    said = {"access_token": "A", "refresh_token": "RT", "refresh_expires_in": 600}
    assert oidc.parse_token_response(ok(said), 1000.0, presented=presented).refresh_expires_at == 1600.0
    rotated = {"access_token": "A", "refresh_token": "RT2"}
    tok = oidc.parse_token_response(ok(rotated), 1000.0, presented=presented)
    assert tok.refresh_token == Secret("RT2") and tok.refresh_expires_at is None


def test_a_refresh_spends_its_token_and_a_password_grant_spends_nothing() -> None:
    client = ClientCredentials("cli", "none")
    assert oidc.build_refresh(URL, client, Secret("RT")).spends == Secret("RT")
    assert oidc.build_password(URL, client, "alice", Secret("pw")).spends is None
    assert oidc.build_device_poll(URL, client, Secret("DC")).precious
    assert "RT" not in repr(oidc.build_refresh(URL, client, Secret("RT")))


def test_the_probe_costs_the_idp_nothing() -> None:
    with_issuer = oidc.Endpoints(token=URL, issuer="https://sso.example.com/realms/acme")
    assert oidc.build_probe(with_issuer).url.endswith("/.well-known/openid-configuration")
    probe = oidc.build_probe(oidc.Endpoints(token=URL))
    assert (probe.method, probe.url, dict(probe.form)) == ("GET", URL, {})


def test_idp_text_is_bounded_stripped_and_redacted() -> None:
    client = ClientCredentials("cli", "basic", Secret("cl!ent-secret"))
    req = oidc.build_password(URL, client, "alice", Secret("p@ss word&1"))
    echo = "you sent " + req.body().decode() + " with \x00\x1b[31m NUL and colour " + "x" * 70000
    body = json.dumps({"error": "invalid_grant\n\x00", "error_description": echo}).encode()
    with pytest.raises(OAuthError) as info:
        oidc.parse_token_response(HttpResponse(401, {"content-type": "application/json"}, body), 0, req.secrets())
    text = str(info.value)
    assert info.value.error == "invalid_grant"
    assert len(info.value.description) <= oidc.MAX_IDP_TEXT
    assert "p@ss word&1" not in text and "p%40ss+word%261" not in text and "[redacted]" in text
    assert not any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in text)


def test_redaction_covers_the_basic_client_secret_and_refresh_token() -> None:
    client = ClientCredentials("cli", "basic", Secret("cl!ent-secret"))
    req = oidc.build_refresh(URL, client, Secret("RT-123456"))
    text = oidc.clean_text(f"client cl!ent-secret token RT-123456 header {req.headers['Authorization']}", req.secrets())
    assert "cl!ent-secret" not in text and "RT-123456" not in text
    assert req.headers["Authorization"].removeprefix("Basic ") not in text


@pytest.mark.parametrize("key", ["token_endpoint", "device_authorization_endpoint", "revocation_endpoint"])
def test_discovery_with_a_plain_http_endpoint_is_a_config_error(key: str) -> None:
    doc = {"issuer": "https://sso.example.com/realms/a", "token_endpoint": URL, key: "http://sso.example.com/x"}
    with pytest.raises(ConfigError, match=key):
        oidc.parse_discovery(ok(doc), "https://sso.example.com/realms/a")
