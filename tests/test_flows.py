"""The grant flows stepped by hand: no IdP, no sockets, no trio, no clock. Each test plays the IdP
with plain ``HttpResponse`` values and checks what the flow sends next and how it ends."""

from __future__ import annotations

import json
from collections.abc import Generator
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qsl

import pytest

from dc_broker.config import Profile
from dc_broker.errors import ScopeWidened, UpstreamGarbage, UpstreamTransient
from dc_broker.idp.oidc import Endpoints, HttpRequest, HttpResponse
from dc_broker.secret import Secret
from dc_broker.sessions import flows
from dc_broker.sessions.flows import Answer, Login, LoginLost, ShowCode, Sleep
from dc_broker.tokens import Credentials, TokenSet
from dc_token.errors import CredentialsRejected, LoginRequired

EP = Endpoints(
    token="https://sso.example.com/t", device="https://sso.example.com/d", revocation="https://sso.example.com/r"
)
PASSWORD = Profile(name="acme", server="https://sso.example.com", tenant="a", client_id="cli", username="alice")
SERVICE = Profile(name="svc", server="https://sso.example.com", tenant="a", client_id="svc", grant="client_credentials")
DEVICE = Profile(
    name="dev", server="https://sso.example.com", tenant="a", client_id="pub", grant="device", auth_method="none"
)
CREDS = Credentials(password=Secret("pw"), client_secret=Secret("cs"))


def js(body: Any, status: int = 200) -> HttpResponse:
    return HttpResponse(status, {"content-type": "application/json"}, json.dumps(body).encode())


def raw(status: int, body: bytes = b"", ctype: str = "text/html") -> HttpResponse:
    return HttpResponse(status, {"content-type": ctype}, body)


GRANTED = js({"access_token": "AT", "expires_in": 300, "refresh_token": "RT2", "refresh_expires_in": 1800})


class Stepper:
    """Drive a flow by hand: ``send`` answers the step it is waiting on, ``step`` is the next one."""

    def __init__(self, flow: Generator[Any, object, Any]) -> None:
        self.flow = flow
        self.result: Any = None
        self.done = False
        self.step: Any = next(flow)

    def send(self, answer: object) -> Any:
        try:
            self.step = self.flow.send(answer)
        except StopIteration as stop:
            self.done, self.result, self.step = True, stop.value, None
        return self.step

    def answer(self, response: HttpResponse, now: float = 100.0) -> Any:
        assert isinstance(self.step, HttpRequest), self.step
        return self.send(Answer(response, now))


def form(step: Any) -> dict[str, str]:
    assert isinstance(step, HttpRequest)
    return dict(parse_qsl(step.body().decode()))


# -- the credential order ---------------------------------------------------------------------------


def test_the_refresh_token_goes_first_and_its_success_ends_the_flow() -> None:
    s = Stepper(flows.obtain(Login(PASSWORD, CREDS, EP, refresh_token=Secret("RT"))))
    assert form(s.step)["grant_type"] == "refresh_token" and form(s.step)["refresh_token"] == "RT"
    s.answer(GRANTED)
    assert s.done and isinstance(s.result, TokenSet) and s.result.expires_at == 400.0


def test_a_refresh_answer_without_a_refresh_token_keeps_the_presented_one_and_its_deadline() -> None:
    """RFC 6749 section 6, as LemonLDAP::NG, Google and Okta without rotation answer."""
    login = Login(PASSWORD, CREDS, EP, refresh_token=Secret("RT"), refresh_expires_at=5000.0)
    s = Stepper(flows.obtain(login))
    s.answer(js({"access_token": "AT2", "expires_in": 300}))
    assert s.done and s.result.refresh_token == Secret("RT") and s.result.refresh_expires_at == 5000.0


def test_a_refresh_token_in_doubt_is_presented_only_after_the_idp_answers_a_probe() -> None:
    login = Login(PASSWORD, CREDS, EP, refresh_token=Secret("RT"), refresh_in_doubt=True)
    s = Stepper(flows.obtain(login))
    assert s.step.method == "GET" and not s.step.form  # the probe: nothing spent
    refresh = s.answer(raw(405, b"Method Not Allowed", "text/plain"))  # an answer is an answer
    assert form(refresh)["refresh_token"] == "RT" and refresh.spends == Secret("RT")
    s.answer(GRANTED)
    assert s.done and s.result.refresh_token == Secret("RT2")


def test_a_probe_a_proxy_answers_with_5xx_keeps_the_refresh_token_back() -> None:
    s = Stepper(flows.obtain(Login(PASSWORD, CREDS, EP, refresh_token=Secret("RT"), refresh_in_doubt=True)))
    with pytest.raises(UpstreamTransient, match="presented again once it answers"):
        s.answer(raw(502))


def test_revoke_ends_the_refresh_token_else_the_access_token() -> None:
    tokens = TokenSet(Secret("AT"), 0.0, 300.0, refresh_token=Secret("RT"))
    s = Stepper(flows.revoke(Login(PASSWORD, CREDS, EP), tokens))
    assert form(s.step) == {"token": "RT", "token_type_hint": "refresh_token"}
    s.answer(raw(200))
    assert s.done and s.result is flows.Ended.REVOKED
    s = Stepper(flows.revoke(Login(SERVICE, CREDS, EP), replace(tokens, refresh_token=None)))
    assert form(s.step) == {"token": "AT", "token_type_hint": "access_token"}
    s.answer(raw(400))  # refused (unsupported_token_type, ...): it did not confirm
    assert s.done and s.result is flows.Ended.UNCONFIRMED
    for unavailable in (503, 429):  # not there to act: nothing ended, which the logout must know
        s = Stepper(flows.revoke(Login(SERVICE, CREDS, EP), replace(tokens, refresh_token=None)))
        with pytest.raises(UpstreamTransient, match=f"HTTP {unavailable}"):
            s.answer(raw(unavailable))
    s = Stepper(flows.revoke(Login(PASSWORD, CREDS, EP), tokens))
    s.answer(js({"error": "invalid_token", "error_description": "Invalid token"}))  # Keycloak: 200 all the same
    assert s.done and s.result is flows.Ended.NOTHING
    no_endpoint = flows.revoke(Login(PASSWORD, CREDS, replace(EP, revocation=None)), tokens)
    with pytest.raises(StopIteration) as stop:
        next(no_endpoint)
    assert stop.value.value is flows.Ended.UNCONFIRMED


def test_logout_ends_the_idp_session_first_and_revokes_only_where_it_cannot() -> None:
    tokens = TokenSet(Secret("AT"), 0.0, 300.0, refresh_token=Secret("RT"))
    ep = replace(EP, end_session="https://sso.example.com/logout")
    s = Stepper(flows.end_login(Login(PASSWORD, CREDS, ep), tokens))
    assert s.step.url == "https://sso.example.com/logout" and form(s.step) == {"refresh_token": "RT"}
    s.answer(raw(204))
    assert s.done and s.result is flows.Ended.SESSION
    s = Stepper(flows.end_login(Login(PASSWORD, CREDS, ep), tokens))
    revoke = s.answer(raw(404, b"Not Found"))  # an IdP without Keycloak's logout endpoint
    assert revoke.url == EP.revocation
    s.answer(raw(200))
    assert s.done and s.result is flows.Ended.REVOKED


@pytest.mark.parametrize(
    "refusal",
    [
        js({"error": "invalid_grant", "error_description": "Session not active"}, 400),
        raw(400),
        raw(401, b"<html>401</html>"),
        js({"error": "invalid_request", "error_description": "Invalid refresh token"}, 400),
    ],
)
def test_a_refused_refresh_token_falls_back_to_the_password(refusal: HttpResponse) -> None:
    s = Stepper(flows.obtain(Login(PASSWORD, CREDS, EP, refresh_token=Secret("RT"))))
    lost = s.answer(refusal)
    assert isinstance(lost, LoginLost) and f"HTTP {refusal.status}" in lost.why
    password = s.send(None)
    assert form(password) == {"grant_type": "password", "username": "alice", "password": "pw"}
    s.answer(GRANTED)
    assert s.done and s.result.access_token == Secret("AT")


def test_a_refused_refresh_token_without_a_primary_credential_means_login_required() -> None:
    s = Stepper(flows.obtain(Login(DEVICE, Credentials(), EP, refresh_token=Secret("RT"))))
    assert isinstance(s.answer(raw(400)), LoginLost)
    with pytest.raises(LoginRequired, match="run `dc-broker login dev`"):
        s.send(None)


@pytest.mark.parametrize("status", [400, 401, 403])
@pytest.mark.parametrize("body", [b"", b"<html>no</html>", b'{"error": "invalid_grant"}'])
def test_a_refused_password_is_rejected_naming_the_status(status: int, body: bytes) -> None:
    s = Stepper(flows.obtain(Login(PASSWORD, CREDS, EP)))
    assert form(s.step)["grant_type"] == "password"
    with pytest.raises(CredentialsRejected, match=f"password of user 'alice' \\(HTTP {status}") as info:
        s.answer(raw(status, body))
    assert "PROFILE" not in info.value.message and "`dc-broker login acme`" in info.value.message


def test_a_client_refusal_on_refresh_is_rejected_not_a_fallback() -> None:
    s = Stepper(flows.obtain(Login(PASSWORD, CREDS, EP, refresh_token=Secret("RT"))))
    with pytest.raises(CredentialsRejected) as info:
        s.answer(js({"error": "invalid_client", "error_description": "Invalid client credentials"}, 401))
    said = info.value.message
    assert "refuses client 'cli'" in said and "check the client id and secret" in said
    assert "`dc-broker set acme client_id=ID`" in said and "`dc-broker rotate acme --client-secret`" in said


def test_a_public_client_is_never_told_about_a_secret() -> None:
    s = Stepper(flows.obtain(Login(DEVICE, Credentials(), EP, refresh_token=Secret("RT"))))
    with pytest.raises(CredentialsRejected) as info:
        s.answer(js({"error": "unauthorized_client", "error_description": "no"}, 401))
    assert "a public client, no secret" in info.value.message and "rotate" not in info.value.message


def test_no_credentials_at_all_is_login_required_without_a_request() -> None:
    with pytest.raises(LoginRequired, match="no password stored"):
        Stepper(flows.obtain(Login(PASSWORD, Credentials(client_secret=Secret("cs")), EP)))


def test_client_credentials_without_a_secret_says_how_to_store_one() -> None:
    with pytest.raises(LoginRequired, match=r"no client secret stored.*`dc-broker rotate svc --client-secret`"):
        Stepper(flows.obtain(Login(SERVICE, Credentials(), EP)))


def test_at_session_max_the_primary_credential_beats_the_refresh_token() -> None:
    s = Stepper(flows.obtain(Login(PASSWORD, CREDS, EP, refresh_token=Secret("RT"), prefer_primary=True)))
    assert form(s.step)["grant_type"] == "password"


def test_outages_pass_through_as_transient_faults() -> None:
    s = Stepper(flows.obtain(Login(SERVICE, CREDS, EP)))
    with pytest.raises(UpstreamTransient):
        s.answer(raw(503))


def test_an_answer_of_the_wrong_kind_is_a_type_error() -> None:
    s = Stepper(flows.obtain(Login(SERVICE, CREDS, EP)))
    with pytest.raises(TypeError, match="Answer"):
        s.send("not an answer")


# -- narrowing ------------------------------------------------------------------------------------------


def test_narrowing_refreshes_with_the_scope_and_hands_a_rotated_token_to_the_login() -> None:
    s = Stepper(flows.narrow(Login(PASSWORD, CREDS, EP, refresh_token=Secret("RT")), "read"))
    assert form(s.step)["scope"] == "read" and form(s.step)["grant_type"] == "refresh_token"
    rotated = s.answer(GRANTED)
    assert isinstance(rotated, flows.Rotated) and rotated.refresh_token == Secret("RT2")
    s.send(None)
    assert s.done and s.result.refresh_token is None  # the narrowed token never carries the login's chain


def narrowed(scope: str, rotated: bool = False) -> HttpResponse:
    body = {"access_token": "AT-n", "expires_in": 300, "scope": scope}
    return js({**body, "refresh_token": "RT2"} if rotated else body)


def test_a_narrowing_granted_less_than_asked_is_served_with_what_was_granted() -> None:
    """Keycloak 23+ drops a scope the login never had, silently: the caller sees the granted scope
    (dc-token --scope then fails naming what is missing)."""
    s = Stepper(flows.narrow(Login(PASSWORD, CREDS, EP, refresh_token=Secret("RT")), "openid phone"))
    s.answer(narrowed("openid"))
    assert s.done and s.result.scope == "openid"


def test_an_idp_that_ignores_scope_on_refresh_makes_a_password_profile_ask_directly() -> None:
    """RH-SSO 7.6 answers a refresh with the login's whole scope: never served; a password profile asks
    the token endpoint for exactly the scope with its password instead."""
    login = Login(PASSWORD, CREDS, EP, refresh_token=Secret("RT"), granted_scope="openid profile email phone")
    s = Stepper(flows.narrow(login, "openid"))
    direct = s.answer(narrowed("openid profile email phone"))
    assert form(direct) == {"grant_type": "password", "username": "alice", "password": "pw", "scope": "openid"}
    s.answer(narrowed("openid", rotated=True))
    assert s.done and s.result.scope == "openid" and s.result.refresh_token is None


def test_a_device_login_cannot_be_narrowed_by_an_idp_that_ignores_scope() -> None:
    login = Login(DEVICE, Credentials(), EP, refresh_token=Secret("RT"), granted_scope="openid profile email")
    s = Stepper(flows.narrow(login, "openid"))
    with pytest.raises(ScopeWidened, match=r"ignores scope on a refresh \(Keycloak up to 22 and RH-SSO 7.6"):
        s.answer(narrowed("openid profile email"))


def test_default_scopes_a_request_cannot_remove_are_named_for_the_caller() -> None:
    login = Login(DEVICE, Credentials(), EP, refresh_token=Secret("RT"), granted_scope="openid profile email phone")
    s = Stepper(flows.narrow(login, "openid"))
    with pytest.raises(ScopeWidened, match=r'default client scopes .*--scope "openid email profile"'):
        s.answer(narrowed("openid profile email"))


def test_a_client_credentials_narrowing_wider_than_asked_is_refused() -> None:
    s = Stepper(flows.narrow(Login(SERVICE, CREDS, EP), "openid"))
    with pytest.raises(ScopeWidened, match="more than asked"):
        s.answer(narrowed("openid profile email"))


def test_narrowing_a_dead_login_asks_for_its_renewal() -> None:
    s = Stepper(flows.narrow(Login(PASSWORD, CREDS, EP, refresh_token=Secret("RT")), "read"))
    assert isinstance(s.answer(raw(400)), LoginLost)
    with pytest.raises(UpstreamGarbage, match="renewed first"):
        s.send(None)


def test_narrowing_to_a_refused_scope_says_it_can_only_narrow() -> None:
    s = Stepper(flows.narrow(Login(PASSWORD, CREDS, EP, refresh_token=Secret("RT")), "admin"))
    with pytest.raises(CredentialsRejected, match=r"scope 'admin'.*can only narrow"):
        s.answer(js({"error": "invalid_scope", "error_description": "Invalid scopes: admin"}, 400))


def test_narrowing_client_credentials_is_a_grant_with_that_scope() -> None:
    s = Stepper(flows.narrow(Login(SERVICE, CREDS, EP), "read"))
    assert form(s.step) == {"grant_type": "client_credentials", "scope": "read"}


# -- discovery --------------------------------------------------------------------------------------------

ISSUER = "https://sso.example.com/realms/a"


def test_discovery_finds_the_endpoints() -> None:
    s = Stepper(flows.discover(PASSWORD, ISSUER))
    assert isinstance(s.step, HttpRequest) and s.step.url == ISSUER + "/.well-known/openid-configuration"
    s.answer(js({"issuer": ISSUER, "token_endpoint": ISSUER + "/t", "device_authorization_endpoint": ISSUER + "/d"}))
    assert s.result == Endpoints(token=ISSUER + "/t", device=ISSUER + "/d", issuer=ISSUER)


@pytest.mark.parametrize("resp", [js({"error": "Realm does not exist"}, 404), raw(404), raw(403), raw(401)])
def test_a_wrong_issuer_is_a_config_error(resp: HttpResponse) -> None:
    s = Stepper(flows.discover(PASSWORD, ISSUER))
    with pytest.raises(CredentialsRejected, match=f"HTTP {resp.status} to discovery.*check the issuer URL"):
        s.answer(resp)


def test_a_plain_http_endpoint_in_discovery_is_a_config_error() -> None:
    s = Stepper(flows.discover(PASSWORD, ISSUER))
    with pytest.raises(CredentialsRejected, match=r"unusable.*plain http"):
        s.answer(js({"token_endpoint": "http://sso.example.com/t"}))


def test_a_discovery_outage_is_transient_and_garbage_is_garbage() -> None:
    with pytest.raises(UpstreamTransient):
        Stepper(flows.discover(PASSWORD, ISSUER)).answer(raw(502))
    with pytest.raises(UpstreamGarbage, match="discovery at"):
        Stepper(flows.discover(PASSWORD, ISSUER)).answer(js({"issuer": ISSUER}))


# -- device login -------------------------------------------------------------------------------------------

DEVICE_START = js(
    {
        "device_code": "DC",
        "user_code": "ABCD-EFGH",
        "verification_uri": "https://sso.example.com/device",
        "expires_in": 600,
        "interval": 5,
    }
)


def start_device(profile: Profile = DEVICE) -> Stepper:
    s = Stepper(flows.device_login(profile, Credentials(), EP))
    assert isinstance(s.step, HttpRequest) and s.step.url == EP.device
    shown = s.answer(DEVICE_START, now=0.0)
    assert isinstance(shown, ShowCode) and shown.authorization.user_code == "ABCD-EFGH"
    return s


def test_device_login_asks_for_openid_unless_the_profile_sets_a_scope() -> None:
    s = Stepper(flows.device_login(DEVICE, Credentials(), EP))
    assert form(s.step)["scope"] == "openid"
    custom = replace(DEVICE, scope="read")
    assert form(Stepper(flows.device_login(custom, Credentials(), EP)).step)["scope"] == "read"


def test_device_login_polls_while_pending_and_slows_down_when_told() -> None:
    s = start_device()
    assert s.send(None) == Sleep(5.0)
    poll = s.send(10.0)
    assert form(poll)["grant_type"] == "urn:ietf:params:oauth:grant-type:device_code"
    assert s.answer(js({"error": "authorization_pending"}, 400)) == Sleep(5.0)
    s.send(20.0)
    assert s.answer(js({"error": "slow_down"}, 400)) == Sleep(10.0)
    s.send(30.0)
    s.answer(GRANTED, now=30.0)
    assert s.done and s.result.obtained_at == 30.0


def test_device_login_denied_expired_and_out_of_time() -> None:
    s = start_device()
    s.send(None)
    s.send(10.0)
    with pytest.raises(CredentialsRejected, match="denied"):
        s.answer(js({"error": "access_denied"}, 400))
    s = start_device()
    s.send(None)
    s.send(10.0)
    with pytest.raises(LoginRequired, match="expired"):
        s.answer(js({"error": "expired_token"}, 400))
    s = start_device()
    s.send(None)
    with pytest.raises(LoginRequired, match="expired"):
        s.send(601.0)  # the code's own deadline passed while waiting


def test_device_login_without_a_device_endpoint_says_how_to_configure_one() -> None:
    with pytest.raises(CredentialsRejected, match="no device authorization endpoint"):
        Stepper(flows.device_login(DEVICE, Credentials(), Endpoints(token=EP.token)))


def test_a_password_login_is_one_grant_and_a_refusal_changes_nothing() -> None:
    s = Stepper(flows.password_login(Login(PASSWORD, CREDS, EP, refresh_token=Secret("RT")), Secret("new")))
    assert form(s.step)["password"] == "new"
    with pytest.raises(CredentialsRejected, match="HTTP 401"):
        s.answer(raw(401))


# -- browser login (authorization code + PKCE) ----------------------------------------------------------

BROWSER = replace(DEVICE, name="web", grant="browser")
EP_AUTH = replace(EP, authorization="https://sso.example.com/auth")
REDIRECT = "http://127.0.0.1:5000/callback"


def start_browser() -> tuple[Stepper, dict[str, list[str]]]:
    from urllib.parse import parse_qs, urlsplit

    s = Stepper(
        flows.browser_login(BROWSER, Credentials(), EP_AUTH, redirect_uri=REDIRECT, state="S", verifier="V" * 50)
    )
    assert isinstance(s.step, flows.OpenBrowser)
    query = parse_qs(urlsplit(s.step.url).query)
    assert isinstance(s.send(None), flows.AwaitRedirect)
    return s, query


def test_browser_login_asks_with_pkce_s256_and_exchanges_the_code() -> None:
    s, query = start_browser()
    assert query["code_challenge_method"] == ["S256"] and query["state"] == ["S"] and query["scope"] == ["openid"]
    assert query["code_challenge"] == [flows.pkce_challenge("V" * 50)] and query["redirect_uri"] == [REDIRECT]
    exchange = s.send({"code": "C", "state": "S"})
    assert form(exchange) == {
        "grant_type": "authorization_code",
        "code": "C",
        "redirect_uri": REDIRECT,
        "code_verifier": "V" * 50,
        "client_id": "pub",
    }
    s.answer(GRANTED)
    assert s.done


def test_pkce_challenge_is_rfc7636s_example() -> None:
    assert (
        flows.pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk")
        == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    )


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        ({"code": "C", "state": "other"}, LoginRequired, "wrong state"),
        ({"code": "C"}, LoginRequired, "wrong state"),
        ({"state": "S"}, LoginRequired, "without a code"),
        ({"state": "S", "error": "access_denied"}, CredentialsRejected, "denied"),
        ({"state": "S", "error": "server_error", "error_description": "\x00boom"}, CredentialsRejected, "refused"),
    ],
)
def test_browser_login_refuses_what_did_not_come_from_this_login(
    params: dict[str, str], error: type, match: str
) -> None:
    s, _ = start_browser()
    with pytest.raises(error, match=match) as info:
        s.send(params)
    assert "\x00" not in str(info.value)


def test_a_refused_code_exchange_is_rejected() -> None:
    s, _ = start_browser()
    s.send({"code": "C", "state": "S"})
    with pytest.raises(CredentialsRejected, match="HTTP 400"):
        s.answer(js({"error": "invalid_grant", "error_description": "Code not valid"}, 400))
