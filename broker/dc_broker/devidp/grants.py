"""The token endpoint's logic, Keycloak-exact: client auth, grants, errors, token responses.

Pure apart from reading ``state.clock`` and changing ``state`` (sessions, device codes, counters).
Every failure is an ``OAuthProblem`` carrying the HTTP status and the ``{"error",
"error_description"}`` body Keycloak sends (table in /work/shared/keycloak.md); the HTTP layer turns
it into a response in one place.

Grants are a table ``GRANTS[grant_type] -> handler``; each handler gets the authenticated client and
returns the JSON body of a successful response. The device authorization, logout, revocation and
introspection endpoints live here too, because they share client auth and token checks.

Secrets (passwords, client secrets, tokens) are compared in constant time and never appear in an
error description, a repr or a log line.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote, unquote_plus

from dc_broker.devidp import authcode, clientauth, device
from dc_broker.devidp.device import DeviceState
from dc_broker.devidp.realm import DevClient, DevRealm, DevUser
from dc_broker.devidp.sessions import RefreshToken, UserSession
from dc_broker.devidp.state import IdPState

DEVICE_GRANT: Final = "urn:ietf:params:oauth:grant-type:device_code"
DEFAULT_SCOPES: Final = ("profile", "email")
OPTIONAL_SCOPES: Final = frozenset(
    {"openid", "offline_access", "address", "phone", "roles", "web-origins", "microprofile-jwt", "acr"}
)
BAD_CLIENT: Final = "Invalid client or Invalid client credentials"
BAD_USER: Final = "Invalid user credentials"
#: another client's refresh token, at the token and the logout endpoints (revocation says "Unmatching clients")
OTHER_CLIENTS_TOKEN: Final = "Invalid refresh token. Token client and authorized client don't match"


class OAuthProblem(Exception):
    """An error response: HTTP status plus Keycloak's JSON error body."""

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(f"{status} {error}: {description}")
        self.status = status
        self.error = error
        self.description = description

    def body(self) -> dict[str, str]:
        return {"error": self.error, "error_description": self.description}


def _invalid_grant(description: str, status: int = 400) -> OAuthProblem:
    return OAuthProblem(status, "invalid_grant", description)


def _missing(name: str) -> OAuthProblem:
    return OAuthProblem(400, "invalid_request", f"Missing parameter: {name}")


def _same_secret(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


@dataclass(frozen=True)
class TokenRequest:
    """One form-encoded request to a realm endpoint. ``issuer`` is derived from the URL used;
    ``client_cert``: the DER certificate the TLS client presented (None: none)."""

    realm: DevRealm
    issuer: str
    form: Mapping[str, str]
    authorization: str | None
    client_cert: bytes | None = None
    #: the request's DPoP proof header, if any (its content is not checked: only its presence)
    dpop: str | None = None

    def param(self, name: str) -> str | None:
        value = self.form.get(name)
        return value if value else None


# -- client authentication ---------------------------------------------------------------------------
def _basic_credentials(authorization: str | None) -> tuple[str, str] | None:
    if not authorization:
        return None
    scheme, _, encoded = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise OAuthProblem(401, "invalid_client", BAD_CLIENT) from None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise OAuthProblem(401, "invalid_client", BAD_CLIENT)
    return unquote_plus(client_id), unquote_plus(secret)


def claimed_client_id(form: Mapping[str, str], authorization: str | None) -> str:
    """The client_id a request names (for counters), without authenticating it. "" if none."""
    try:
        basic = _basic_credentials(authorization)
    except OAuthProblem:
        basic = None
    if basic:
        return basic[0]
    if form.get("client_id"):
        return form["client_id"]
    return clientauth.assertion_subject(form.get("client_assertion", "")) or ""


def authenticate_client(request: TokenRequest, state: IdPState | None = None) -> DevClient:
    """The client's own authenticator decides (``DevClient.auth``, Keycloak's): client_secret_basic,
    client_secret_post or a public client by client_id alone here; a signed JWT, a certificate or a
    federated assertion in ``dc_broker.devidp.clientauth``."""
    try:
        if state is not None and (federated := clientauth.federated_client(state, request)) is not None:
            state.assertions.keep(request.form["client_assertion"])
            return federated
        basic = _basic_credentials(request.authorization)
        client_id, secret = basic if basic else (request.param("client_id"), request.param("client_secret"))
        if not basic and request.param("client_assertion"):  # the assertion's sub names the client
            sub = clientauth.assertion_subject(request.form["client_assertion"])
            client_id = sub if sub is not None else client_id
        if not client_id:
            raise OAuthProblem(400, "invalid_client", "Missing client_id parameter")
        client = request.realm.client(client_id)
        if client is None:
            raise OAuthProblem(401, "invalid_client", BAD_CLIENT)
        if client.auth != "client-secret":
            if state is None:
                raise OAuthProblem(401, "invalid_client", BAD_CLIENT)
            clientauth.authenticate(state, request, client)
            return client
    except clientauth.ClientProblem as problem:
        raise OAuthProblem(problem.status, problem.error, problem.description) from None
    if client.secret is None:
        return client
    if secret is None or not _same_secret(secret, client.secret):
        raise OAuthProblem(401, "unauthorized_client", BAD_CLIENT)
    return client


# -- scopes ----------------------------------------------------------------------------------------
def resolve_scope(requested: str | None, client: DevClient) -> str:
    """Keycloak's granted scope string: "openid" first if asked, then other optional scopes, then the
    client's default scopes (``DevClient.default_scopes``)."""
    words = requested.split() if requested else []
    unknown = [w for w in words if w not in OPTIONAL_SCOPES and w not in DEFAULT_SCOPES]
    if unknown:
        raise OAuthProblem(400, "invalid_scope", f"Invalid scopes: {requested}")
    defaults = client.default_scopes.split()
    ordered = [w for w in ("openid",) if w in words]
    ordered += [w for w in words if w not in ordered and w not in defaults]
    ordered += defaults
    return " ".join(dict.fromkeys(ordered))


def _narrow_scope(original: str, requested: str | None, client: DevClient) -> str:
    """Keycloak 23+ on a refresh: words that are not client scopes are refused (openid exempt); a
    client scope the original grant did not have is dropped *silently*; default scopes stay."""
    if not requested:
        return original
    granted = resolve_scope(requested, client).split()  # refuses what is no client scope at all
    had, defaults = set(original.split()), set(client.default_scopes.split())
    return " ".join(w for w in granted if w in had or w in defaults)


def _offline_allowed(client: DevClient, scope: str) -> str:
    if "offline_access" in scope.split() and not client.offline_allowed:
        raise OAuthProblem(400, "not_allowed", "Offline tokens not allowed for the user or client")
    return scope


# -- token minting ---------------------------------------------------------------------------------
def _subject(realm: str, username: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"dc-broker-dev:{realm}:{username.lower()}"))


def realm_roles(realm: DevRealm, extra: list[str]) -> list[str]:
    """Keycloak's default composite roles plus the user's own realm roles."""
    defaults = [f"default-roles-{realm.name}", "offline_access", "uma_authorization"]
    return list(dict.fromkeys(defaults + extra))


def _roles_for(realm: DevRealm, session: UserSession) -> list[str]:
    user = realm.user(session.username)
    if user is not None:
        return realm_roles(realm, user.roles)
    client = realm.client(session.client_id)
    return realm_roles(realm, client.service_account_roles if client else [])


def issue_tokens(
    state: IdPState,
    request: TokenRequest,
    session: UserSession,
    *,
    scope: str,
    refresh_scope: str | None = None,
    with_refresh: bool = True,
    presented: RefreshToken | None = None,
) -> dict[str, Any]:
    """The success body: an RS256 access token, optionally a refresh token and an ID token.
    ``presented``: the refresh token a refresh grant used; the realm's ``refresh_token_answer``
    says whether a new one, the same one or none comes back."""
    realm, now = request.realm, state.now()
    iat = int(now)
    exp = int(now + session.access_lifetime(realm, now))
    common = {
        "exp": exp,
        "iat": iat,
        "iss": request.issuer,
        "sub": _subject(realm.name, session.username),
        "azp": session.client_id,
        "sid": session.sid,
        "session_state": session.sid,
        "preferred_username": session.username.lower(),
    }
    access = common | {
        "jti": str(uuid.uuid4()),
        "typ": "Bearer",
        "scope": scope,
        "realm_access": {"roles": _roles_for(realm, session)},
    }
    body: dict[str, Any] = {
        "access_token": state.key.sign(access),
        "expires_in": exp - iat,
        "refresh_expires_in": 0,
    }
    if presented is not None and realm.refresh_token_answer != "new":
        lifetime = session.refresh_lifetime(realm, now)
        if realm.refresh_token_answer == "same" or not realm.send_refresh_expires_in:
            # lives as long as its session; an OP that said when it dies (and cannot say it again
            # without a refresh token in its answer) keeps its word
            presented.expires_at = None if lifetime is None else now + lifetime
        if realm.refresh_token_answer == "same":
            body["refresh_token"] = presented.value
            body["refresh_expires_in"] = 0 if lifetime is None else int(lifetime)
    elif with_refresh:
        record, lifetime = state.sessions.mint_refresh(
            session, realm, issuer=request.issuer, scope=refresh_scope or scope, now=now
        )
        body["refresh_token"] = record.value
        body["refresh_expires_in"] = 0 if lifetime is None else int(lifetime)
    if not realm.send_refresh_expires_in or (presented is not None and "refresh_token" not in body):
        del body["refresh_expires_in"]
    if not realm.send_expires_in:
        del body["expires_in"]
    body["token_type"] = "Bearer"
    if "openid" in scope.split():
        id_claims = common | {"jti": str(uuid.uuid4()), "typ": "ID", "aud": session.client_id}
        body["id_token"] = state.key.sign(id_claims)
    body["not-before-policy"] = 0
    body["session_state"] = session.sid
    body["scope"] = scope
    return body


# -- grants ----------------------------------------------------------------------------------------
def _check_user_password(state: IdPState, realm: DevRealm, username: str, password: str) -> DevUser:
    """Keycloak's direct-grant checks, in Keycloak's order; brute-force detection first: a locked
    user gets "Invalid user credentials" whatever the password (400, as Keycloak 24+)."""
    now = state.now()
    user = realm.user(username)
    if user is None:
        raise _invalid_grant(BAD_USER)
    if state.brute_force.locked(realm, user.username, now):
        raise _invalid_grant(BAD_USER)
    if not user.enabled:
        raise _invalid_grant("Account disabled")
    if not _same_secret(password, user.password):
        state.brute_force.failed(realm, user.username, now)
        raise _invalid_grant(BAD_USER, status=401)
    state.brute_force.succeeded(realm, user.username)
    if user.required_actions:
        raise _invalid_grant("Account is not fully set up")
    return user


def password_grant(state: IdPState, request: TokenRequest, client: DevClient) -> dict[str, Any]:
    if not client.direct_grants:
        raise OAuthProblem(400, "unauthorized_client", "Client not allowed for direct access grants")
    username, password = request.param("username"), request.form.get("password")
    if username is None:
        raise _missing("username")
    if password is None:
        raise _missing("password")
    user = _check_user_password(state, request.realm, username, password)
    scope = _offline_allowed(client, resolve_scope(request.param("scope"), client))
    session = state.sessions.start(
        request.realm.name,
        user.username,
        client.client_id,
        now=state.now(),
        offline="offline_access" in scope.split(),
    )
    return issue_tokens(state, request, session, scope=scope)


def client_credentials_grant(state: IdPState, request: TokenRequest, client: DevClient) -> dict[str, Any]:
    if client.public:
        raise OAuthProblem(401, "unauthorized_client", "Public client not allowed to retrieve service account")
    if not client.has_service_account:
        raise OAuthProblem(401, "unauthorized_client", "Client not enabled to retrieve service account")
    if not client.service_account_enabled:
        raise OAuthProblem(401, "invalid_request", f"User 'service-account-{client.client_id}' disabled")
    scope = " ".join(w for w in resolve_scope(request.param("scope"), client).split() if w != "offline_access")
    session = state.sessions.start(
        request.realm.name,
        f"service-account-{client.client_id}",
        client.client_id,
        now=state.now(),
        offline=False,
    )
    return issue_tokens(state, request, session, scope=scope, with_refresh=False)


def refresh_token_grant(state: IdPState, request: TokenRequest, client: DevClient) -> dict[str, Any]:
    value = request.param("refresh_token")
    if value is None:
        raise OAuthProblem(400, "invalid_request", "No refresh token")
    realm, now = request.realm, state.now()

    def dead(description: str) -> OAuthProblem:  # Keycloak's invalid_grant, or another OP's code
        return OAuthProblem(400, realm.dead_refresh_error, description)

    record = state.sessions.refresh_token(value)
    if record is None or record.realm != realm.name or record.issuer != request.issuer:
        raise dead("Invalid refresh token")
    if record.expired(now):  # Keycloak checks the token's expiry before whose it is
        raise dead("Token is not active")
    if record.client_id != client.client_id:
        raise dead(OTHER_CLIENTS_TOKEN)
    session = state.sessions.session(record.sid)
    if session is None or not session.active(realm, now):
        raise dead("Offline session not active" if session and session.offline else "Session not active")
    user = realm.user(session.username)
    if user is None:
        raise dead("Unknown user")
    if not user.enabled:
        raise dead("User disabled")
    # the scope is checked before the token is spent: a refused scope leaves the token unused
    asked = request.param("scope")
    scope = record.scope if realm.refresh_scope == "ignore" else _narrow_scope(record.scope, asked, client)
    if client.client_id not in session.clients:
        raise dead("Session doesn't have required client")
    if realm.rotate_refresh_tokens:
        _check_reuse(state, realm, session, record, client.client_id, now, dead)
    session.last_refresh = now
    return issue_tokens(state, request, session, scope=scope, refresh_scope=record.scope, presented=record)


def _check_reuse(
    state: IdPState,
    realm: DevRealm,
    session: UserSession,
    record: RefreshToken,
    client_id: str,
    now: float,
    dead: Callable[[str], OAuthProblem],
) -> None:
    """Keycloak's refresh-token reuse check (Revoke Refresh Token on); either refusal detaches the
    client from the session, whose SSO lives on."""
    current = session.current_refresh.get(client_id)
    if current is not None and current != record.value:
        if record.issued_at < session.refreshed_at.get(client_id, -1.0):
            state.stats.refresh_reuse += 1
            state.sessions.detach(session.sid, client_id)
            raise dead("Stale token")
        current = None
    if current is None:  # a token the client presents for the first time becomes its current one
        session.current_refresh[client_id] = record.value
        session.refresh_uses[client_id] = 0
    uses = session.refresh_uses.get(client_id, 0)
    if uses > 0:
        state.stats.refresh_reuse += 1
    if uses > realm.refresh_token_max_reuse:
        state.sessions.detach(session.sid, client_id)
        raise dead("Maximum allowed refresh token reuse exceeded")
    session.refresh_uses[client_id] = uses + 1
    session.refreshed_at[client_id] = now
    record.uses += 1


def _device_pending(auth: device.DeviceAuthorization) -> OAuthProblem:
    return OAuthProblem(400, "authorization_pending", "The authorization request is still pending")


def _device_denied(auth: device.DeviceAuthorization) -> OAuthProblem:
    return OAuthProblem(400, "access_denied", "The end user denied the authorization request")


_DEVICE_NOT_YET: Final[dict[DeviceState, Callable[[device.DeviceAuthorization], OAuthProblem]]] = {
    DeviceState.PENDING: _device_pending,
    DeviceState.DENIED: _device_denied,
}
DEVICE_FLOW_DISABLED: Final = (
    "Client is not allowed to initiate OAuth 2.0 Device Authorization Grant. The flow is disabled for the client."
)


def device_code_grant(state: IdPState, request: TokenRequest, client: DevClient) -> dict[str, Any]:
    code = request.param("device_code")
    if code is None:
        raise _missing("device_code")
    if not client.device_grant:
        raise _invalid_grant("Client not allowed for OAuth 2.0 Device Authorization Grant")
    auth, now = state.devices.get(code), state.now()
    if auth is None or auth.realm != request.realm.name or auth.client_id != client.client_id:
        raise _invalid_grant("Device code not valid")
    if auth.expired(now):
        raise OAuthProblem(400, "expired_token", "Device code is expired")
    if auth.last_poll is not None and now - auth.last_poll < auth.interval:
        raise OAuthProblem(400, "slow_down", "Slow down")  # counted from the last accepted poll, not this one
    auth.last_poll = now
    not_yet = _DEVICE_NOT_YET.get(auth.state)
    if not_yet is not None:
        raise not_yet(auth)
    assert auth.username is not None  # APPROVED always records who approved
    state.devices.consume(code)
    scope = _offline_allowed(client, resolve_scope(auth.scope, client))
    session = state.sessions.start(
        request.realm.name, auth.username, client.client_id, now=now, offline="offline_access" in scope.split()
    )
    return issue_tokens(state, request, session, scope=scope)


def authorization_code_grant(state: IdPState, request: TokenRequest, client: DevClient) -> dict[str, Any]:
    code, redirect_uri, verifier = (request.param(k) for k in ("code", "redirect_uri", "code_verifier"))
    if code is None:
        raise _missing("code")
    record = state.codes.redeem(code, state.now())
    if record is None or record.realm != request.realm.name:
        raise _invalid_grant("Code not valid")
    if record.client_id != client.client_id:
        raise _invalid_grant("Auth error")
    if redirect_uri != record.redirect_uri:
        raise _invalid_grant("Incorrect redirect_uri")
    if verifier is None:  # Keycloak's words (its OAuthProofKeyForCodeExchangeTest, case A-1-12)
        raise _invalid_grant("PKCE code verifier not specified")
    if not authcode.verifier_matches(verifier, record.code_challenge):
        raise _invalid_grant("PKCE verification failed: Code mismatch")
    scope = _offline_allowed(client, resolve_scope(record.scope, client))
    offline = "offline_access" in scope.split()
    sso = state.sessions.session(record.sid) if record.sid else None
    if sso is not None and sso.alive and not offline and sso.active(request.realm, state.now()):
        sso.clients.add(client.client_id)  # the client attaches to the browser's SSO session
        return issue_tokens(state, request, sso, scope=scope)
    session = state.sessions.start(
        request.realm.name, record.username, client.client_id, now=state.now(), offline=offline
    )
    return issue_tokens(state, request, session, scope=scope)


GrantHandler = Callable[[IdPState, TokenRequest, DevClient], dict[str, Any]]
GRANTS: Final[dict[str, GrantHandler]] = {
    "password": password_grant,
    "client_credentials": client_credentials_grant,
    "refresh_token": refresh_token_grant,
    DEVICE_GRANT: device_code_grant,
    "authorization_code": authorization_code_grant,
}


def token(state: IdPState, request: TokenRequest) -> dict[str, Any]:
    """POST .../protocol/openid-connect/token: the success body, or raises OAuthProblem."""
    grant_type = request.param("grant_type")
    if grant_type is None:
        raise OAuthProblem(400, "invalid_request", "Missing form parameter: grant_type")
    handler = GRANTS.get(grant_type)
    if handler is None:
        raise OAuthProblem(400, "unsupported_grant_type", "Unsupported grant_type")
    client = authenticate_client(request, state)
    if client.dpop == "required" and not request.dpop:
        raise OAuthProblem(400, "invalid_dpop_proof", "DPoP proof is missing")
    body = handler(state, request, client)
    if client.dpop != "off":
        body["token_type"] = "DPoP"
    return body


# -- the other client-authenticated endpoints --------------------------------------------------------
def start_device_authorization(state: IdPState, request: TokenRequest) -> dict[str, Any]:
    """POST .../protocol/openid-connect/auth/device."""
    client = authenticate_client(request, state)
    if not client.device_grant:
        raise OAuthProblem(400, "unauthorized_client", DEVICE_FLOW_DISABLED)
    scope = request.param("scope")
    resolve_scope(scope, client)  # validate now, as Keycloak does
    realm = request.realm
    auth = state.devices.create(realm.name, client.client_id, scope, interval=realm.device_interval, now=state.now())
    verification_uri = f"{request.issuer}/device"
    return {
        "device_code": auth.device_code,
        "user_code": auth.user_code,
        "verification_uri": verification_uri,
        "verification_uri_complete": f"{verification_uri}?user_code={quote(auth.user_code)}",
        "expires_in": device.EXPIRES_IN,
        "interval": auth.interval,
    }


def approve_device(state: IdPState, user_code: str, username: str) -> None:
    """Mark a pending device authorization approved by ``username`` (who must exist and be enabled)."""
    auth = _pending_device(state, user_code)
    user = state.realms[auth.realm].user(username)
    if user is None:
        raise KeyError(f"no user {username!r} in realm {auth.realm!r}")
    if not user.enabled:
        raise ValueError(f"user {username!r} is disabled")
    auth.state, auth.username = DeviceState.APPROVED, user.username


def deny_device(state: IdPState, user_code: str) -> None:
    _pending_device(state, user_code).state = DeviceState.DENIED


def _pending_device(state: IdPState, user_code: str) -> device.DeviceAuthorization:
    auth = state.devices.by_user_code(user_code)
    if auth is None or auth.expired(state.now()):
        raise KeyError(f"no pending device authorization with user code {user_code!r}")
    return auth


def check_user_login(state: IdPState, realm: DevRealm, username: str, password: str) -> str | None:
    """For the login pages: None if the login is good, else Keycloak's message for why not."""
    try:
        _check_user_password(state, realm, username, password)
    except OAuthProblem as problem:
        return problem.description
    return None


def logout(state: IdPState, request: TokenRequest) -> None:
    """POST .../protocol/openid-connect/logout with client auth + refresh_token: ends the session."""
    client = authenticate_client(request, state)
    value = request.param("refresh_token")
    if value is None:
        raise OAuthProblem(400, "invalid_request", "No refresh token")
    record = state.sessions.refresh_token(value)
    if record is None or record.realm != request.realm.name:
        raise _invalid_grant("Invalid refresh token")
    if record.client_id != client.client_id:
        raise _invalid_grant(OTHER_CLIENTS_TOKEN)
    state.sessions.kill(record.sid)


def revoke(state: IdPState, request: TokenRequest) -> dict[str, str] | None:
    """POST .../protocol/openid-connect/revoke: 200 always (RFC 7009), with Keycloak's
    ``{"error": "invalid_token"}`` body for a token it does not know or that is dead. A refresh token
    detaches its client from the session (``revoke_scope`` "client", Keycloak 23+; the user session
    and its browser SSO live on), or from every session of that user and their offline tokens
    ("user", Keycloak up to about 22). An access token goes on the revoked list."""
    client = authenticate_client(request, state)
    value = request.param("token")
    if value is None:
        raise OAuthProblem(400, "invalid_request", "Token not provided")
    realm, now = request.realm, state.now()
    invalid = {"error": "invalid_token", "error_description": "Invalid token"}
    record = state.sessions.refresh_token(value)
    if record is not None and record.realm == realm.name:
        if record.client_id != client.client_id:
            raise OAuthProblem(400, "unauthorized_client", "Unmatching clients")
        session = state.sessions.session(record.sid)
        if record.expired(now) or session is None or not session.active(realm, now):
            return invalid
        if client.client_id not in session.clients:
            return invalid
        if realm.revoke_scope == "user":
            for other in state.sessions.sessions.values():
                if other.realm == realm.name and other.username.lower() == session.username.lower():
                    state.sessions.detach(other.sid, client.client_id)
                    if other.offline:
                        state.sessions.kill(other.sid)
        else:
            state.sessions.detach(session.sid, client.client_id)
        return None
    claims = state.key.verify(value)
    if claims is not None and claims.get("azp") == client.client_id and isinstance(claims.get("jti"), str):
        state.sessions.revoked_access.add(claims["jti"])
        return None
    return invalid


def access_token_claims(state: IdPState, token: str) -> dict[str, Any] | None:
    """Claims of a live access token (good signature, typ Bearer, not expired by ``state.clock``,
    not revoked, session still alive), else None."""
    claims = state.key.verify(token)
    if claims is None or claims.get("typ") != "Bearer":
        return None
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or state.now() > exp:
        return None
    if claims.get("jti") in state.sessions.revoked_access:
        return None
    session = state.sessions.session(str(claims.get("sid")))
    if session is None or not session.alive:
        return None
    return claims


def introspect(state: IdPState, request: TokenRequest) -> dict[str, Any]:
    """POST .../protocol/openid-connect/token/introspect (confidential clients only)."""
    client = authenticate_client(request, state)
    if client.public:
        raise OAuthProblem(403, "invalid_request", "Client not allowed.")
    value = request.param("token")
    if value is None:
        raise OAuthProblem(400, "invalid_request", "Token not provided.")
    claims = access_token_claims(state, value)
    if claims is not None:
        return {
            **claims,
            "active": True,
            "client_id": claims.get("azp"),
            "username": claims.get("preferred_username"),
            "token_type": "Bearer",
        }
    record, now = state.sessions.refresh_token(value), state.now()
    if record is None or record.realm != request.realm.name or record.expired(now):
        return {"active": False}
    session = state.sessions.session(record.sid)
    if session is None or not session.active(request.realm, now):
        return {"active": False}
    body: dict[str, Any] = {
        "active": True,
        "typ": "Offline" if session.offline else "Refresh",
        "iat": int(record.issued_at),
        "iss": record.issuer,
        "azp": record.client_id,
        "client_id": record.client_id,
        "sid": session.sid,
        "scope": record.scope,
        "username": session.username.lower(),
    }
    if record.expires_at is not None:
        body["exp"] = int(record.expires_at)
    return body
