"""The grant flows as pure steps: what to send to the IdP, in which order, and what each answer means.

Written the way httpx's ``Auth.auth_flow`` and dc-token's ``BrokerAuth.steps`` are: each flow is a
generator that *yields* a step and is *sent* the step's answer, and finally returns its result
(``StopIteration.value``) or raises the ``BrokerError`` / ``UpstreamFault`` the outcome stands for.

    step                    the driver does                           and sends back
    ``HttpRequest``         sends it to the IdP (one overall deadline) ``Answer(response, sent_at, wall)``
    ``LoginLost``           forgets the login's dead refresh token     ``None``
    ``Rotated``             makes a new refresh token the login's      ``None``
    ``ShowCode``            shows the device code to the person        ``None``
    ``Sleep(seconds)``      waits                                      the time after waiting (float)
    ``OpenBrowser(url)``    shows the URL (opens a browser)            ``None``
    ``AwaitRedirect``       takes the browser's one loopback redirect  its query parameters (a dict)

The flows (all pure: no I/O, no trio, no clock of their own; ``now`` arrives inside answers):

* ``obtain``    the credential order: the login's refresh token -> on refusal (``invalid_grant``, or
                any body-less 400/401/403) the stored password or client secret -> with neither,
                ``LoginRequired``. A refused primary credential is ``CredentialsRejected`` naming the
                HTTP status. An answer without a new refresh token keeps the presented one (RFC 6749
                section 6). A refresh token whose last use got no answer (``refresh_in_doubt``) is
                presented again only after the IdP answered a harmless request (``oidc.build_probe``):
                while the IdP stalls, one queued use of it is all there ever is.
* ``narrow``    a token for a narrower scope from the same login (refresh grant with ``scope``),
                never wider than asked (``wider``; a password profile asks directly when the IdP
                ignores scope on a refresh; else ``ScopeWidened``).
* ``end_login`` end this login at the IdP: the end-session endpoint, else ``revoke`` (RFC 7009).

What a refusal means is read from ``idp.refusals``' table (``refused``): only a refusal that says the
refresh token is dead costs it; a client or realm setting keeps every token.
* ``discover``  the issuer's discovery document -> ``Endpoints``; a 404 (or any refusal) and an
                unusable document are config problems (``CredentialsRejected``), not outages.
* ``device_login`` RFC 8628: start, show the code, poll (``authorization_pending``, ``slow_down``
                +5 s, ``access_denied``, ``expired_token``, the code's own deadline).
* ``browser_login`` RFC 6749 4.1 + PKCE S256 (RFC 7636) with a loopback redirect (RFC 8252): the URL
                to open, the one redirect back (``state`` checked in constant time), the code
                exchange. The driver owns the listener; ``state`` and the verifier come in as values.

``dc_broker.sessions.session`` is the one driver. Tests step every flow by hand (tests/test_flows.py).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Generator, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Final, TypeVar
from urllib.parse import urlencode

from dc_broker.config import Profile
from dc_broker.errors import (
    ConfigError,
    IdpMisconfigured,
    MaybeLocked,
    OAuthError,
    ScopeWidened,
    UpstreamGarbage,
    UpstreamTransient,
)
from dc_broker.idp import oidc, refusals
from dc_broker.idp.oidc import DeviceAuthorization, Endpoints, HttpRequest, HttpResponse
from dc_broker.idp.refusals import Meaning
from dc_broker.secret import Secret
from dc_broker.tokens import Credentials, TokenSet
from dc_token.errors import BrokerError, CredentialsRejected, LoginRequired

#: the scope a person's own login (device, browser) asks for when the profile sets none:
#: standard servers refuse a login without ``openid`` (Keycloak adds it anyway)
USER_LOGIN_SCOPE: Final = "openid"
#: RFC 8628 3.5: each ``slow_down`` adds this to the polling interval
SLOW_DOWN_STEP: Final = 5.0
#: a client or realm setting refuses: the broker asks again this often (an administrator may fix it)
MISCONFIGURED_RETRY: Final = 300.0


@dataclass(frozen=True, slots=True)
class Answer:
    """The answer to an ``HttpRequest`` step: the response, and the driver's clock (and the wall
    clock, when known) when it was *sent*.

    The IdP issued what it answers somewhere between the send and the arrival, so a lifetime
    (``expires_in``) counted from the send never outlasts the real one, however slowly the answer
    dripped in; counted from the arrival it would, by the whole round trip. The wall clock lets a
    JWT's ``exp`` be read on the same scale (``oidc.expiry``).

    ``secrets``: the secret values the driver put into the request as it sent it (a client
    assertion is made at the edge, ``assertions.complete``): redacted from the answer's text like
    the request's own ``secrets()``, for an IdP that echoes what it was sent."""

    response: HttpResponse
    now: float
    wall: float | None = None
    secrets: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class LoginLost:
    """Step: the IdP refused this login's refresh token; the driver forgets it (answer: None)."""

    why: str


@dataclass(frozen=True, slots=True)
class Rotated:
    """Step: a narrowing refresh brought the login a new refresh token: the driver makes it the login's
    (stored first), whatever the flow does next (answer: None)."""

    refresh_token: Secret
    refresh_expires_at: float | None


@dataclass(frozen=True, slots=True)
class ShowCode:
    """Step: show the person the device code (answer: None)."""

    authorization: DeviceAuthorization


@dataclass(frozen=True, slots=True)
class Sleep:
    """Step: wait ``seconds`` (answer: the driver's clock afterwards, a float)."""

    seconds: float


@dataclass(frozen=True, slots=True)
class OpenBrowser:
    """Step: the person opens ``url`` in a browser (answer: None)."""

    url: str


@dataclass(frozen=True, slots=True)
class AwaitRedirect:
    """Step: wait for the browser's redirect to the loopback listener (answer: its query, a dict)."""


Step = HttpRequest | LoginLost | Rotated | ShowCode | Sleep | OpenBrowser | AwaitRedirect
T = TypeVar("T")
Flow = Generator[Step, object, T]


@dataclass(frozen=True, slots=True)
class Login:
    """What ``obtain`` knows about one profile's login: plain values the session reads for it."""

    profile: Profile
    credentials: Credentials
    endpoints: Endpoints
    #: the current login's refresh token, if still usable, and its deadline
    refresh_token: Secret | None = None
    refresh_expires_at: float | None = None
    #: the IdP session is at its SSO Session Max: a fresh login beats refreshing it
    prefer_primary: bool = False
    #: the last use of ``refresh_token`` got no answer: the IdP must answer something first
    refresh_in_doubt: bool = False
    #: the scope the IdP granted this login (None: not said)
    granted_scope: str | None = None

    def presented(self) -> oidc.Presented | None:
        """What a refresh grant of this login presents (and keeps, if the answer brings no new one)."""
        if self.refresh_token is None:
            return None
        return oidc.Presented(self.refresh_token, self.refresh_expires_at)


# ---------------------------------------------------------------- building blocks


def exchange(req: HttpRequest) -> Flow[Answer]:
    """Send one request; the answer."""
    answer = yield req
    if not isinstance(answer, Answer):
        raise TypeError(f"an HttpRequest step is answered with an Answer, not {type(answer).__name__}")
    return answer


def sent_secrets(req: HttpRequest, answer: Answer) -> list[str]:
    """Every secret value ``req`` went out with: its own, and those the driver added (``Answer.secrets``)."""
    return [*req.secrets(), *answer.secrets]


def grant(req: HttpRequest, presented: oidc.Presented | None = None) -> Flow[TokenSet]:
    """One token request -> its TokenSet (or the fault the answer stands for). ``presented``: the
    refresh token a refresh grant sends, kept when the answer brings no new one."""
    answer = yield from exchange(req)
    return oidc.parse_token_response(
        answer.response, answer.now, sent_secrets(req, answer), wall=answer.wall, presented=presented
    )


def refresh(login: Login, scope: str | None = None) -> Flow[TokenSet]:
    """One refresh grant with this login's refresh token, after a probe if its last use got no answer."""
    assert login.refresh_token is not None
    if login.refresh_in_doubt:
        probe = yield from exchange(oidc.build_probe(login.endpoints))
        if probe.response.status >= 500:
            raise UpstreamTransient(
                f"identity provider answers HTTP {probe.response.status}; the refresh token whose last use "
                "got no answer is presented again once it answers"
            )
    req = oidc.build_refresh(
        login.endpoints.token, client_of(login.profile, login.credentials, login.endpoints), login.refresh_token, scope
    )
    return (yield from grant(req, login.presented()))


def client_of(profile: Profile, credentials: Credentials, endpoints: Endpoints) -> oidc.ClientCredentials:
    return oidc.client_of(profile, credentials, endpoints)


def has_client_credential(profile: Profile, credentials: Credentials) -> bool:
    """Whether the client can authenticate by itself (what a client_credentials grant needs): a stored
    secret or key, or the certificate or assertion file its settings name."""
    method = profile.auth_method
    if method == "private_key_jwt":
        return credentials.client_keys is not None
    if method in ("tls_client_auth", "client_assertion_file"):
        return True
    return credentials.client_secret is not None


def primary_request(login: Login) -> HttpRequest | None:
    """The grant with the stored long-lived credential (password, client secret), if there is one."""
    p, creds = login.profile, login.credentials
    if p.grant == "password" and creds.password is not None and p.username:
        client = client_of(p, creds, login.endpoints)
        return oidc.build_password(login.endpoints.token, client, p.username, creds.password, p.scope)
    if p.grant == "client_credentials" and has_client_credential(p, creds):
        return oidc.build_client_credentials(login.endpoints.token, client_of(p, creds, login.endpoints), p.scope)
    return None


def login_scope(profile: Profile) -> str:
    """The scope a person's interactive login asks for."""
    return profile.scope or USER_LOGIN_SCOPE


# ---------------------------------------------------------------- the flows


def obtain(login: Login) -> Flow[TokenSet]:
    """The credential order for one refresh (see the module docstring)."""
    p = login.profile
    primary = primary_request(login)
    refresh_token = login.refresh_token
    if login.prefer_primary and primary is not None:
        refresh_token = None
    if refresh_token is not None:
        try:
            return (yield from refresh(login))
        except OAuthError as exc:
            if classify(p, exc, refusals.REFRESH).meaning is not Meaning.TOKEN_DEAD:
                raise refused(p, exc, refusals.REFRESH) from None  # the token stays: nothing said it is dead
            yield LoginLost(said(exc))
    if primary is None:
        raise LoginRequired(login_message(p))
    try:
        return (yield from grant(primary))
    except OAuthError as exc:
        raise refused(p, exc, p.grant) from None


def password_login(login: Login, password: Secret) -> Flow[TokenSet]:
    """`dc-broker login` with a password: one password grant, whatever the current login is."""
    p = login.profile
    if p.grant != "password" or not p.username:
        raise ConfigError(f"profile {p.name!r} does not use a password (grant {p.grant})")
    client = client_of(p, login.credentials, login.endpoints)
    req = oidc.build_password(login.endpoints.token, client, p.username, password, p.scope)
    try:
        return (yield from grant(req))
    except OAuthError as exc:
        raise refused(p, exc, refusals.PASSWORD) from None


def wider(asked: str, granted: str | None) -> list[str]:
    """The scopes an answer granted beyond those asked (none when it did not say: RFC 6749 section 5.1,
    then the scope is as asked)."""
    return [] if granted is None else sorted(set(granted.split()) - set(asked.split()))


def narrow(login: Login, scope: str) -> Flow[TokenSet]:
    """A token for ``scope`` from this login, never wider than ``scope``: a refresh grant with that
    scope (client credentials: a grant with it). A refresh token the IdP rotates on the way is the
    login's (``Rotated``), whatever follows. When the IdP grants more than asked (it ignores scope on
    a refresh, as Keycloak up to 22 / RH-SSO 7.6 do), a password profile asks the token endpoint with
    the scope directly; otherwise the scope is refused (``ScopeWidened``) naming what the IdP did. A
    refused refresh token yields ``LoginLost`` and is renewed by the login's own refresh, so this
    raises ``UpstreamGarbage`` (a retryable fault) for the caller. The token returned carries no
    refresh token: the login's chain stays single."""
    p = login.profile
    if p.grant == "client_credentials":
        if not has_client_credential(p, login.credentials):
            raise LoginRequired(login_message(p))
        client = client_of(p, login.credentials, login.endpoints)
        try:
            direct = yield from grant(oidc.build_client_credentials(login.endpoints.token, client, scope))
        except OAuthError as exc:
            raise refused(p, exc, refusals.CLIENT_CREDENTIALS, narrowing_to=scope) from None
        return _not_wider(p, scope, direct, "adds")
    if login.refresh_token is None:
        raise LoginRequired(login_message(p))
    try:
        new = yield from refresh(login, scope)
    except OAuthError as exc:
        if classify(p, exc, refusals.REFRESH).meaning is Meaning.TOKEN_DEAD:
            yield LoginLost(said(exc))
            raise UpstreamGarbage(f"the login behind scope {scope!r} must be renewed first") from None
        raise refused(p, exc, refusals.REFRESH, narrowing_to=scope) from None
    if new.refresh_token is not None and new.refresh_token != login.refresh_token:
        yield Rotated(new.refresh_token, new.refresh_expires_at)
    if not wider(scope, new.scope):
        return _without_refresh(new)
    # the IdP ignored the scope: it granted the login's whole scope, which is more than was asked
    # (asking for all of it, the answer cannot tell; then it is as asked and served above)
    whole = set(login.granted_scope.split()) if login.granted_scope is not None else None
    ignored = whole is not None and set((new.scope or "").split()) >= whole and not set(scope.split()) >= whole
    primary = primary_request(replace(login, profile=replace(p, scope=scope)))
    if ignored and p.grant == "password" and primary is not None:  # (default scopes a grant adds as well)
        try:
            direct = yield from grant(primary)
        except OAuthError as exc:
            raise refused(p, exc, refusals.PASSWORD, narrowing_to=scope) from None
        return _not_wider(p, scope, direct, "adds")
    raise _widened(p, scope, new, "ignores" if ignored else "adds")


def _without_refresh(tokens: TokenSet) -> TokenSet:
    return replace(tokens, refresh_token=None, refresh_expires_at=None)


def _not_wider(p: Profile, scope: str, tokens: TokenSet, how: str) -> TokenSet:
    if wider(scope, tokens.scope):
        raise _widened(p, scope, tokens, how)
    return _without_refresh(tokens)


def _widened(p: Profile, scope: str, tokens: TokenSet, how: str) -> ScopeWidened:
    extra = " ".join(wider(scope, tokens.scope))
    if how == "ignores":
        why = (
            "it ignores scope on a refresh (Keycloak up to 22 and RH-SSO 7.6 do), and a "
            f"{p.grant} login cannot be narrowed another way: ask without --scope, or use a password or "
            "client-credentials profile with this scope"
        )
    else:
        why = f'it adds them to every token (default client scopes a request cannot remove): --scope "{scope} {extra}"'
    return ScopeWidened(
        f"profile {p.name!r}: the identity provider grants {tokens.scope!r} for scope {scope!r}, more than asked "
        f"({extra}); a token wider than asked is never served: {why}"
    )


class Ended(StrEnum):
    """How a logout ended the login at the IdP."""

    SESSION = "session"  # the end-session endpoint ended the IdP session (and its browser SSO)
    REVOKED = "revoked"  # the revocation endpoint revoked the token
    NOTHING = "nothing"  # the IdP knew nothing to revoke (the login had already ended)
    UNCONFIRMED = "unconfirmed"  # no endpoint, or the IdP did not confirm


def end_login(login: Login, tokens: TokenSet) -> Flow[Ended]:
    """End this login at the IdP: its session through the end-session endpoint with the refresh token
    (Keycloak's ``.../logout``: exactly this login's IdP session, its browser SSO included), else by
    revoking it (RFC 7009: the refresh token, or the access token where there is none). Revoking a
    refresh token in Keycloak ends only this client's part of the session (up to Keycloak 22: of
    every session of the user), so the end-session endpoint comes first."""
    client = client_of(login.profile, login.credentials, login.endpoints)
    url = login.endpoints.end_session
    if url is not None and tokens.refresh_token is not None:
        answer = yield from exchange(oidc.build_end_session(url, client, tokens.refresh_token))
        if 200 <= answer.response.status < 300:
            return Ended.SESSION
        # no such endpoint here, or it refused: the revocation endpoint is the next best
    return (yield from revoke(login, tokens))


def revoke(login: Login, tokens: TokenSet) -> Flow[Ended]:
    """Revoke this login's refresh token, or its access token where there is none (RFC 7009). A 200
    with Keycloak's ``invalid_token`` body means there was nothing to revoke; an IdP that is not there
    to act (5xx, 429: ``oidc.unavailable``) raises ``UpstreamTransient``: nothing was ended, and the
    logout may keep the login to end it later."""
    url = login.endpoints.revocation
    if url is None:
        return Ended.UNCONFIRMED
    target, hint = (
        (tokens.refresh_token, "refresh_token")
        if tokens.refresh_token is not None
        else (tokens.access_token, "access_token")
    )
    client = client_of(login.profile, login.credentials, login.endpoints)
    answer = yield from exchange(oidc.build_revoke(url, client, target, hint))
    if oidc.unavailable(answer.response.status):
        oidc.check_error(answer.response)
    if not 200 <= answer.response.status < 300:
        return Ended.UNCONFIRMED
    return Ended.NOTHING if oidc.said_invalid_token(answer.response) else Ended.REVOKED


def check_client(login: Login, *, next_key: bool = False) -> Flow[bool]:
    """Does the IdP accept this client as it authenticates now (``next_key``: with the key set's next
    key)? One request that spends nothing (``oidc.build_client_check``); a refused client is
    ``CredentialsRejected`` with the fix for its method."""
    client = client_of(login.profile, login.credentials, login.endpoints)
    req = oidc.build_client_check(login.endpoints.token, client, next_key=next_key)
    answer = yield from exchange(req)
    try:
        return oidc.client_accepted(answer.response, sent_secrets(req, answer))
    except OAuthError as exc:
        raise rejected(login.profile, exc) from None


def discover(profile: Profile, issuer: str) -> Flow[Endpoints]:
    """The issuer's discovery document -> the endpoints."""
    answer = yield from exchange(oidc.build_discovery(issuer))
    name = profile.name
    try:
        return oidc.parse_discovery(answer.response, issuer)
    except OAuthError as exc:
        raise CredentialsRejected(
            f"profile {name!r}: issuer {issuer} answers HTTP {exc.status} to discovery ({exc.description}); "
            "check the issuer URL (Keycloak: https://HOST/realms/REALM, with /auth before /realms up to "
            "Keycloak 16)"
        ) from None
    except ConfigError as exc:
        raise CredentialsRejected(f"profile {name!r}: the discovery document of {issuer} is unusable: {exc}") from None
    except UpstreamGarbage as exc:
        raise UpstreamGarbage(f"discovery at {issuer} failed: {exc}") from None


def device_login(profile: Profile, credentials: Credentials, endpoints: Endpoints) -> Flow[TokenSet]:
    """RFC 8628 device authorization grant, start to finish."""
    name = profile.name
    if endpoints.device is None:
        raise CredentialsRejected(
            f"profile {name!r} has no device authorization endpoint; configure it with server + tenant or issuer"
        )
    client = client_of(profile, credentials, endpoints)
    start = oidc.build_device_start(endpoints.device, client, login_scope(profile))
    answer = yield from exchange(start)
    try:
        auth = oidc.parse_device_start(answer.response, answer.now, sent_secrets(start, answer))
    except OAuthError as exc:
        raise refused(profile, exc, refusals.DEVICE) from None
    yield ShowCode(auth)
    expired = f"profile {name!r}: the login code expired; run `dc-broker login {name}` again"
    interval = auth.interval
    while True:
        now = yield Sleep(interval)
        if not isinstance(now, float | int) or now >= auth.expires_at:
            raise LoginRequired(expired)
        try:
            return (yield from grant(oidc.build_device_poll(endpoints.token, client, auth.device_code)))
        except OAuthError as exc:
            if exc.error == "authorization_pending":
                continue
            if exc.error == "slow_down":
                interval += SLOW_DOWN_STEP
                continue
            if exc.error == "expired_token":
                raise LoginRequired(expired) from None
            if exc.error == "access_denied":
                raise CredentialsRejected(f"profile {name!r}: the login was denied at the identity provider") from None
            raise refused(profile, exc, refusals.DEVICE) from None


def pkce_challenge(verifier: str) -> str:
    """RFC 7636 S256: BASE64URL(SHA256(verifier)) without padding."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def browser_login(
    profile: Profile, credentials: Credentials, endpoints: Endpoints, *, redirect_uri: str, state: str, verifier: str
) -> Flow[TokenSet]:
    """Authorization code + PKCE with a loopback redirect, start to finish."""
    name = profile.name
    again = f"run `dc-broker login {name}` again"
    if endpoints.authorization is None:
        raise CredentialsRejected(
            f"profile {name!r} has no authorization endpoint; configure it with server + tenant or issuer"
        )
    query = {
        "response_type": "code",
        "client_id": profile.client_id,
        "redirect_uri": redirect_uri,
        "scope": login_scope(profile),
        "state": state,
        "code_challenge": pkce_challenge(verifier),
        "code_challenge_method": "S256",
    }
    sep = "&" if "?" in endpoints.authorization else "?"
    yield OpenBrowser(f"{endpoints.authorization}{sep}{urlencode(query)}")
    params = yield AwaitRedirect()
    if not isinstance(params, Mapping):
        raise TypeError(f"an AwaitRedirect step is answered with the query parameters, not {type(params).__name__}")
    came_back = params.get("state")
    if not isinstance(came_back, str) or not hmac.compare_digest(came_back.encode(), state.encode()):
        raise LoginRequired(f"profile {name!r}: the browser came back with a wrong state (not this login); {again}")
    error = params.get("error")
    if isinstance(error, str):
        said_text = oidc.clean_text(f"{error}: {params.get('error_description', '')}")
        if error == "access_denied":
            raise CredentialsRejected(f"profile {name!r}: the login was denied at the identity provider ({said_text})")
        raise CredentialsRejected(f"profile {name!r}: the identity provider refused the login ({said_text}); {again}")
    code = params.get("code")
    if not isinstance(code, str) or not code:
        raise LoginRequired(f"profile {name!r}: the browser came back without a code; {again}")
    client = client_of(profile, credentials, endpoints)
    req = oidc.build_authorization_code(endpoints.token, client, code, redirect_uri, verifier)
    try:
        return (yield from grant(req))
    except OAuthError as exc:
        raise refused(profile, exc, refusals.CODE) from None


# ---------------------------------------------------------------- what to tell the person


def said(exc: OAuthError) -> str:
    """What the IdP said, with its HTTP status: ``HTTP 401: invalid_grant: Invalid user credentials``."""
    if exc.error == "refused":
        return f"HTTP {exc.status} with {exc.description}"
    return f"HTTP {exc.status}: {exc}"


def login_message(p: Profile) -> str:
    name = p.name
    if p.grant in ("device", "browser"):
        return f"profile {name!r}: no valid login; run `dc-broker login {name}`"
    if p.grant == "password":
        return (
            f"profile {name!r}: no password stored and no valid login; run `dc-broker login {name}` "
            f"(or store it with `dc-broker rotate {name} --password`)"
        )
    if p.auth_method == "private_key_jwt":
        return (
            f"profile {name!r}: no client key stored; make one with `dc-broker rotate {name} --key` and register "
            "its public JWKS at the identity provider"
        )
    return f"profile {name!r}: no client secret stored; store it with `dc-broker rotate {name} --client-secret`"


def logged_out_message(p: Profile) -> str:
    """Why a profile that was logged out has no login: ``login_message``, except for client credentials
    whose client authenticates with no secret (``Profile.signs_in_with``): that stays, and `dc-broker
    login` signs the profile in again with it."""
    with_what = p.signs_in_with()
    if with_what is None:
        return login_message(p)
    return f"profile {p.name!r}: logged out; `dc-broker login {p.name}` signs in again with {with_what}"


def classify(p: Profile, exc: OAuthError, grant: str) -> refusals.Refusal:
    return refusals.classify(exc, grant, client=p.client_id, profile=p.name, user=p.username or "")


def refused(p: Profile, exc: OAuthError, grant: str, *, narrowing_to: str | None = None) -> BrokerError:
    """The error a refusal of ``grant`` stands for, by what it means (``idp.refusals``): a client or
    realm setting (``IdpMisconfigured``: tokens kept, asked again every few minutes), a password that
    may be locked (``MaybeLocked``), or a credential to fix (``CredentialsRejected``)."""
    refusal = classify(p, exc, grant)
    if refusal.meaning is Meaning.MISCONFIGURED:
        return IdpMisconfigured(
            f"profile {p.name!r}: the identity provider refuses ({said(exc)}): {refusal.fix}",
            retry_after=MISCONFIGURED_RETRY,
        )
    if refusal.fix:
        return CredentialsRejected(f"profile {p.name!r}: the identity provider refuses ({said(exc)}): {refusal.fix}")
    base = rejected(p, exc, narrowing_to=narrowing_to)
    if refusal.meaning is Meaning.MAYBE_LOCKED:  # Keycloak answers a locked account's right password so too
        return MaybeLocked(
            f"{base.message} (if the password is right, the account may be locked for a while by the identity "
            "provider's brute-force detection after failed logins: the lock lifts by itself)"
        )
    return base


def client_fix(p: Profile) -> str:
    """What to check when the IdP refuses this profile's client, by how the client authenticates."""
    name = p.name
    wrong_id = f"a wrong client id is fixed with `dc-broker set {name} client_id=ID`"
    if p.auth_method == "private_key_jwt":
        return (
            f"check that the identity provider has this profile's public key (`dc-broker keys {name} --jwks` "
            "prints it; in Keycloak: the client's Keys tab), the assertion's audience and the client id "
            f"(`dc-broker set {name} client_id=ID`); then `dc-broker keys {name} --check`"
        )
    if p.auth_method == "tls_client_auth":
        return (
            f"check that the identity provider accepts the certificate {p.client_cert} (its subject DN in the "
            f"client's Credentials tab, its CA in the server's truststore); {wrong_id}"
        )
    if p.auth_method == "client_assertion_file":
        return (
            f"check that the identity provider trusts the issuer of {p.assertion_file} and maps its subject to "
            f"client {p.client_id!r} (Keycloak 26.6: the client's Credentials tab, Signed JWT - Federated)"
        )
    if p.auth_method == "none":
        return f"check the client id (a public client, no secret): {wrong_id}"
    return f"check the client id and secret: {wrong_id}, a wrong secret with `dc-broker rotate {name} --client-secret`"


def rejected(p: Profile, exc: OAuthError, *, narrowing_to: str | None = None) -> CredentialsRejected:
    """The one message for an IdP refusal: what it refused, its words and status, what to fix."""
    name = p.name
    if exc.error == "invalid_scope":
        scope, why = (
            (narrowing_to, "a per-request scope can only narrow the profile's own scope")
            if narrowing_to is not None
            else (p.scope, "fix the profile's scope")
        )
        return CredentialsRejected(
            f"profile {name!r}: the identity provider refuses scope {scope!r} ({said(exc)}); {why}"
        )
    if exc.error == "not_found":
        return CredentialsRejected(
            f"profile {name!r}: {p.describe()} answers HTTP 404 Not Found ({exc.description}); "
            "check server, tenant, legacy_paths (Keycloak 17+ has no /auth) or issuer"
        )
    rotate = f"`dc-broker rotate {name} --client-secret`"
    if exc.error in ("invalid_client", "unauthorized_client"):
        return CredentialsRejected(
            f"profile {name!r}: the identity provider refuses client {p.client_id!r} ({said(exc)}); {client_fix(p)}"
        )
    if p.grant == "password":
        return CredentialsRejected(
            f"profile {name!r}: the identity provider refused the password of user {p.username!r} ({said(exc)}); "
            f"store the right one with `dc-broker login {name}`"
        )
    if p.grant == "client_credentials" and p.auth_method in ("basic", "post", "client_secret_jwt"):
        return CredentialsRejected(
            f"profile {name!r}: the identity provider refused the client secret ({said(exc)}); store the right one "
            f"with {rotate}"
        )
    if p.grant == "client_credentials":
        return CredentialsRejected(
            f"profile {name!r}: the identity provider refused the client ({said(exc)}); {client_fix(p)}"
        )
    return CredentialsRejected(
        f"profile {name!r}: the identity provider refused the login ({said(exc)}); run `dc-broker login {name}`"
    )
