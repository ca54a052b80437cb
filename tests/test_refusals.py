"""Every row of the refusal table (idp/refusals.py) with Keycloak's exact status, error and
error_description (../shared/keycloak.md), other OPs' equivalents, and what each then costs in the
flows: only an answer that says the refresh token is dead may drop it."""

from __future__ import annotations

import json

import pytest

from dc_broker.config import Profile
from dc_broker.errors import IdpMisconfigured, MaybeLocked, OAuthError
from dc_broker.idp import oidc, refusals
from dc_broker.idp.oidc import Endpoints, HttpResponse
from dc_broker.idp.refusals import Meaning
from dc_broker.secret import Secret
from dc_broker.sessions import flows
from dc_broker.sessions.flows import Answer, Login, LoginLost
from dc_broker.tokens import Credentials
from dc_token.errors import CredentialsRejected, UpstreamError

DEVICE_OFF = (
    "Client is not allowed to initiate OAuth 2.0 Device Authorization Grant. The flow is disabled for the client."
)
R, P, C, D, A = refusals.REFRESH, refusals.PASSWORD, refusals.CLIENT_CREDENTIALS, refusals.DEVICE, refusals.CODE
#: (status, error, error_description, grant) -> what it means
KEYCLOAK = [
    # a dead refresh token, in each of Keycloak's words
    (400, "invalid_grant", "Token is not active", R, Meaning.TOKEN_DEAD),
    (400, "invalid_grant", "Session not active", R, Meaning.TOKEN_DEAD),
    (400, "invalid_grant", "Offline session not active", R, Meaning.TOKEN_DEAD),
    (400, "invalid_grant", "Invalid refresh token", R, Meaning.TOKEN_DEAD),
    (
        400,
        "invalid_grant",
        "Invalid refresh token. Token client and authorized client don't match",
        R,
        Meaning.TOKEN_DEAD,
    ),
    (400, "invalid_grant", "Stale token", R, Meaning.TOKEN_DEAD),
    (400, "invalid_grant", "Maximum allowed refresh token reuse exceeded", R, Meaning.TOKEN_DEAD),
    (400, "invalid_grant", "Session doesn't have required client", R, Meaning.TOKEN_DEAD),
    (400, "invalid_grant", "User disabled", R, Meaning.TOKEN_DEAD),
    # other OPs say it with other codes, or with no body at all (glewlwyd)
    (400, "invalid_request", "Invalid refresh token", R, Meaning.TOKEN_DEAD),
    (401, "refused", "an empty body", R, Meaning.TOKEN_DEAD),
    # configuration, not credentials: never costs a token
    (403, "invalid_request", "HTTPS required", R, Meaning.MISCONFIGURED),
    (403, "invalid_request", "HTTPS required", P, Meaning.MISCONFIGURED),
    (403, "access_denied", "Realm not enabled", R, Meaning.MISCONFIGURED),
    (403, "access_denied", "Realm not enabled", P, Meaning.MISCONFIGURED),
    (400, "not_allowed", "Offline tokens not allowed for the user or client", R, Meaning.MISCONFIGURED),
    (400, "not_allowed", "Offline tokens not allowed for the user or client", P, Meaning.MISCONFIGURED),
    (400, "invalid_dpop_proof", "DPoP proof is missing", R, Meaning.MISCONFIGURED),
    (400, "invalid_dpop_proof", "DPoP proof is missing", P, Meaning.MISCONFIGURED),
    (200, "dpop_bound", "the identity provider granted a DPoP-bound token (token_type DPoP)", P, Meaning.MISCONFIGURED),
    (
        400,
        "unauthorized_client",
        "Client is not allowed to initiate OAuth 2.0 Device Authorization Grant. The flow is disabled for the client.",
        D,
        Meaning.MISCONFIGURED,
    ),
    (400, "invalid_grant", "Client not allowed for OAuth 2.0 Device Authorization Grant", D, Meaning.MISCONFIGURED),
    (400, "unauthorized_client", "Client not allowed for direct access grants", P, Meaning.MISCONFIGURED),
    (401, "unauthorized_client", "Client not enabled to retrieve service account", C, Meaning.MISCONFIGURED),
    (401, "invalid_request", "User 'service-account-svc' disabled", C, Meaning.MISCONFIGURED),
    (400, "unsupported_grant_type", "Unsupported grant_type", P, Meaning.MISCONFIGURED),
    (403, "refused", "a text/html body, not an OAuth error", R, Meaning.MISCONFIGURED),
    (400, "temporarily_unavailable", "Something else entirely", R, Meaning.MISCONFIGURED),
    # the user and the client
    (401, "invalid_grant", "Invalid user credentials", P, Meaning.MAYBE_LOCKED),
    (400, "invalid_grant", "Invalid user credentials", P, Meaning.MAYBE_LOCKED),
    (400, "invalid_grant", "Account disabled", P, Meaning.CREDENTIAL_WRONG),
    (400, "invalid_grant", "Account is not fully set up", P, Meaning.CREDENTIAL_WRONG),
    # a wrong client secret (Keycloak 20+), or an unknown client, on every grant: never a dead token
    (401, "unauthorized_client", "Invalid client or Invalid client credentials", C, Meaning.CREDENTIAL_WRONG),
    (401, "unauthorized_client", "Invalid client or Invalid client credentials", P, Meaning.CREDENTIAL_WRONG),
    (401, "unauthorized_client", "Invalid client or Invalid client credentials", R, Meaning.CREDENTIAL_WRONG),
    (401, "invalid_client", "Invalid client or Invalid client credentials", P, Meaning.CREDENTIAL_WRONG),
    (401, "invalid_client", "Invalid client or Invalid client credentials", R, Meaning.CREDENTIAL_WRONG),
    # a device code Keycloak already dropped: that login is over, a person starts another
    (400, "invalid_grant", "Device code not valid", D, Meaning.CREDENTIAL_WRONG),
    (400, "invalid_scope", "Invalid scopes: openid bogus", R, Meaning.SCOPE),
    (400, "invalid_grant", "Code not valid", A, Meaning.CREDENTIAL_WRONG),
    (400, "invalid_grant", "PKCE verification failed: Code mismatch", A, Meaning.CREDENTIAL_WRONG),
]


@pytest.mark.parametrize(("status", "error", "said", "grant", "meaning"), KEYCLOAK)
def test_each_answer_means_what_the_table_says(
    status: int, error: str, said: str, grant: str, meaning: Meaning
) -> None:
    refusal = refusals.classify(OAuthError(error, said, status), grant, client="dc-cli", profile="acme", user="alice")
    assert refusal.meaning is meaning
    if meaning is Meaning.MISCONFIGURED:
        assert refusal.fix and "{" not in refusal.fix  # every setting named, every placeholder filled


PASSWORD = Profile(name="acme", server="https://sso.example.com", tenant="a", client_id="cli", username="alice")
CREDS = Credentials(password=Secret("pw"), client_secret=Secret("cs"))
EP = Endpoints(token="https://sso.example.com/t", revocation="https://sso.example.com/r")


def answer(status: int, body: dict[str, str]) -> Answer:
    return Answer(HttpResponse(status, {"content-type": "application/json"}, json.dumps(body).encode()), 0.0)


@pytest.mark.parametrize(("status", "error", "said"), [(s, e, d) for s, e, d, g, m in KEYCLOAK if g == R])
def test_a_refresh_refusal_drops_the_refresh_token_only_when_it_says_it_is_dead(
    status: int, error: str, said: str
) -> None:
    flow = flows.obtain(Login(PASSWORD, CREDS, EP, refresh_token=Secret("RT")))
    next(flow)
    dead = refusals.classify(OAuthError(error, said, status), R).meaning is Meaning.TOKEN_DEAD
    if dead:
        assert isinstance(flow.send(answer(status, {"error": error, "error_description": said})), LoginLost)
    else:
        with pytest.raises((IdpMisconfigured, CredentialsRejected)):
            flow.send(answer(status, {"error": error, "error_description": said}))


def test_a_misconfiguration_is_an_upstream_error_naming_the_fix_and_retried_slowly() -> None:
    flow = flows.obtain(Login(PASSWORD, CREDS, EP, refresh_token=Secret("RT")))
    next(flow)
    with pytest.raises(IdpMisconfigured) as info:
        flow.send(answer(403, {"error": "invalid_request", "error_description": "HTTPS required"}))
    assert isinstance(info.value, UpstreamError) and info.value.retry_after == flows.MISCONFIGURED_RETRY
    assert "HTTP 403" in info.value.message and "Require SSL" in info.value.message
    assert "`dc-broker set acme server=https://...`" in info.value.message


def test_a_refused_password_that_reads_like_a_lock_is_maybe_locked() -> None:
    flow = flows.obtain(Login(PASSWORD, CREDS, EP))
    next(flow)
    with pytest.raises(MaybeLocked) as info:
        flow.send(answer(400, {"error": "invalid_grant", "error_description": "Invalid user credentials"}))
    assert isinstance(info.value, CredentialsRejected) and "'alice'" in info.value.message
    # a person reading it must not "fix" a password that may be right: the lock is named too
    assert info.value.message.endswith(
        "store the right one with `dc-broker login acme` (if the password is right, the account may be locked for "
        "a while by the identity provider's brute-force detection after failed logins: the lock lifts by itself)"
    )


def test_a_dpop_bound_answer_is_a_setting_to_fix_not_garbage() -> None:
    body = {"access_token": "AT", "expires_in": 300, "token_type": "DPoP"}
    with pytest.raises(OAuthError) as info:
        oidc.parse_token_response(HttpResponse(200, {}, json.dumps(body).encode()), 0.0)
    assert refusals.classify(info.value, P).meaning is Meaning.MISCONFIGURED
