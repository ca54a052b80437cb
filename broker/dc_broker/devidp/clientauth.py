"""The dev IdP's client authenticators, Keycloak's: one per ``DevClient.auth`` (Keycloak's
"Client Authenticator", ``clientAuthenticatorType``), chosen by the *client's* setting, as Keycloak
chooses them (``ClientAuthenticationFlow``: the authenticator configured for the client decides).

    client-secret      client_secret_basic / client_secret_post (a public client: client_id alone)
    client-jwt         "Signed JWT": private_key_jwt, checked against the client's registered JWKS
    client-secret-jwt  "Signed JWT with Client Secret": client_secret_jwt (HS256 over the secret)
    client-x509        "X509 Certificate": the TLS client certificate's subject DN (RFC 8705 tls_client_auth)
    federated-jwt      "Signed JWT - Federated" (26.6, preview): an assertion another issuer signed
                       (a trusted issuer of the realm), its ``iss`` and ``sub`` mapped to the client

Answers are Keycloak's (the current code; docs/keycloak.md has the rows): a signed JWT
that fails a check is ``400 invalid_client`` with the check's description ("Token reuse
detected", "Invalid token audience", "Unable to load public key", "Client authentication with
signed JWT failed: Signature on JWT token failed validation"...); a certificate or federated
assertion that does not match is ``401 invalid_client`` "Invalid client or Invalid client credentials".

An assertion's ``jti`` is single-use (kept until its ``exp``); every accepted assertion is also kept
(the last ``KEPT_ASSERTIONS``) so in-process tests can replay one. The TLS client certificate comes
from the connection (``PEER_CERTIFICATE``, set by ``dc_broker.devserver`` during the handshake).

Nothing here logs or echoes an assertion, a key or a secret.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Final, Protocol

import jwt
from cryptography import x509

from dc_broker.devidp.realm import DevClient, DevRealm

if TYPE_CHECKING:
    from dc_broker.devidp.state import IdPState


class TokenRequest(Protocol):
    """What an authenticator reads of a request (``dc_broker.devidp.grants.TokenRequest``)."""

    @property
    def realm(self) -> DevRealm: ...

    @property
    def issuer(self) -> str: ...

    @property
    def form(self) -> Mapping[str, str]: ...

    @property
    def client_cert(self) -> bytes | None: ...

    def param(self, name: str) -> str | None: ...


JWT_BEARER: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
JWT_SPIFFE: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe"
BAD_CLIENT: Final = "Invalid client or Invalid client credentials"
#: Keycloak's allowed clock skew for client assertions, seconds
CLOCK_SKEW: Final = 15
#: the client attribute token.endpoint.auth.signing.max.exp: an assertion's longest life, seconds
MAX_EXP: Final = 60
#: a federated assertion's longest life (Keycloak's Kubernetes provider: an hour, plus the skew)
FEDERATED_MAX_EXP: Final = 3600 + CLOCK_SKEW
_ASYMMETRIC: Final = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")

#: the DER certificate the TLS client presented on this connection (None: none, or plain http)
PEER_CERTIFICATE: ContextVar[bytes | None] = ContextVar("dc_broker_devidp_peer_certificate", default=None)


class ClientProblem(Exception):
    """A refused client authentication: HTTP status, error and description (grants turns it into
    its ``OAuthProblem``)."""

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(f"{status} {error}: {description}")
        self.status, self.error, self.description = status, error, description


def _invalid(description: str) -> ClientProblem:
    return ClientProblem(400, "invalid_client", description)


def _not_this_client() -> ClientProblem:
    return ClientProblem(401, "invalid_client", BAD_CLIENT)


def unverified(assertion: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(header, claims) of a compact JWS, unverified; None if it is not one."""
    try:
        header = jwt.get_unverified_header(assertion)
        claims = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    return (header, claims) if isinstance(claims, dict) else None


def assertion_subject(assertion: str) -> str | None:
    """The ``sub`` of a client assertion, unverified (the client it names); None if it has none."""
    parts = unverified(assertion)
    sub = parts[1].get("sub") if parts else None
    return sub if isinstance(sub, str) else None


def _expected_audiences(request: TokenRequest) -> list[str]:
    """Keycloak's: the realm issuer, and its token, introspection, PAR and CIBA endpoints' URLs."""
    oc = f"{request.issuer}/protocol/openid-connect"
    return [request.issuer, f"{oc}/token", f"{oc}/token/introspect", f"{oc}/ext/par/request", f"{oc}/ext/ciba/auth"]


def _check_claims(
    state: IdPState, request: TokenRequest, claims: dict[str, Any], *, audiences: list[str], max_exp: int, reuse: bool
) -> None:
    """Keycloak's AbstractBaseJWTValidator: audience, then activity, then single use."""
    now = state.now()
    aud = claims.get("aud")
    auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if not any(a in audiences for a in auds):
        raise _invalid("Invalid token audience")
    if len(auds) > 1:
        raise _invalid("Multiple audiences not allowed")
    exp, iat, nbf = claims.get("exp"), claims.get("iat"), claims.get("nbf")
    if not isinstance(exp, int | float):
        raise _invalid("Token exp claim is required")
    if now > exp + CLOCK_SKEW or (isinstance(nbf, int | float) and nbf > now + CLOCK_SKEW):
        raise _invalid("Token is not active")
    lifespan = exp - now
    if not isinstance(iat, int | float):
        if lifespan > max_exp:
            raise _invalid("Token expiration is too far in the future and iat claim not present in token")
    else:
        if iat - CLOCK_SKEW > now:
            raise _invalid("Token was issued in the future")
        lifespan = min(lifespan, max_exp)
        if lifespan <= 0:
            raise _invalid("Token is not active")
        if now > iat + max_exp:
            raise _invalid("Token was issued too far in the past to be used now")
    if not reuse:
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise _invalid("Token jti claim is required")
        if not state.assertions.spend(f"{claims.get('iss')}:{jti}", now + max(lifespan, 10), now):
            raise _invalid("Token reuse detected")


def _assertion_params(request: TokenRequest, expected_type: str = JWT_BEARER) -> str:
    kind, assertion = request.param("client_assertion_type"), request.param("client_assertion")
    if kind is None:
        raise _invalid("Parameter client_assertion_type is missing")
    if kind != expected_type:
        raise _invalid(f"Parameter client_assertion_type has value '{kind}' but expected is '{expected_type}'")
    if assertion is None:
        raise _invalid("client_assertion parameter missing")
    return assertion


def _names_this_client(request: TokenRequest, claims: dict[str, Any]) -> None:
    """Keycloak's AbstractJWTClientValidator.validateClient: the assertion's ``sub`` is the client,
    a ``client_id`` sent beside it must be the same, and its ``iss`` must be too (an assertion
    another issuer signed is not this authenticator's: Keycloak leaves it, and no client is
    authenticated)."""
    sub = claims.get("sub")
    if sub is None:
        raise _invalid("Token sub claim is required")
    client_id = request.param("client_id")
    if client_id is not None and client_id != sub:
        raise _invalid("client_id parameter does not match sub claim")
    if claims.get("iss") != sub:
        raise _not_this_client()


def _signed_jwt(state: IdPState, request: TokenRequest, client: DevClient) -> None:
    """client-jwt ("Signed JWT"): private_key_jwt against the client's registered JWKS."""
    assertion = _assertion_params(request)
    parts = unverified(assertion)
    if parts is None:
        raise _invalid("Client authentication with signed JWT failed: Unable to parse the JWT")
    header, claims = parts
    _names_this_client(request, claims)
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in _ASYMMETRIC:
        raise _invalid("Invalid signature algorithm")
    keys = [k for k in (client.jwks or {}).get("keys", []) if k.get("kid") == header.get("kid")]
    if not keys:
        raise _invalid("Unable to load public key")
    try:
        jwt.decode(
            assertion,
            jwt.PyJWK(keys[0]).key,
            algorithms=[alg],
            options={"verify_exp": False, "verify_iat": False, "verify_nbf": False, "verify_aud": False},
        )
    except jwt.PyJWTError:
        raise _invalid(
            "Client authentication with signed JWT failed: Signature on JWT token failed validation"
        ) from None
    _check_claims(state, request, claims, audiences=_expected_audiences(request), max_exp=MAX_EXP, reuse=False)


def _secret_jwt(state: IdPState, request: TokenRequest, client: DevClient) -> None:
    """client-secret-jwt ("Signed JWT with Client Secret"): HS256 over the client secret."""
    assertion = _assertion_params(request)
    parts = unverified(assertion)
    if parts is None or client.secret is None:
        raise _invalid("Client authentication with client secret signed JWT failed: Unable to parse the JWT")
    header, claims = parts
    _names_this_client(request, claims)
    if header.get("alg") not in ("HS256", "HS384", "HS512"):
        raise _invalid("Invalid signature algorithm")
    try:
        jwt.decode(
            assertion,
            client.secret.encode("utf-8"),
            algorithms=[header["alg"]],
            options={"verify_exp": False, "verify_iat": False, "verify_nbf": False, "verify_aud": False},
        )
    except jwt.PyJWTError:
        raise _invalid(
            "Client authentication with client secret signed JWT failed: Signature on JWT token by client secret "
            "failed validation"
        ) from None
    _check_claims(state, request, claims, audiences=_expected_audiences(request), max_exp=MAX_EXP, reuse=False)


def _x509(state: IdPState, request: TokenRequest, client: DevClient) -> None:
    """client-x509 ("X509 Certificate"): the connection's client certificate has the subject DN the
    client registered (RFC 4514 form, compared as written). No certificate, or another subject: 401."""
    der = request.client_cert
    if der is None or client.subject_dn is None:
        raise _not_this_client()
    subject = x509.load_der_x509_certificate(der).subject.rfc4514_string()
    if not hmac.compare_digest(_dn(subject).encode(), _dn(client.subject_dn).encode()):
        raise _not_this_client()


def _dn(text: str) -> str:
    return ",".join(part.strip() for part in text.split(","))


def _federated(state: IdPState, request: TokenRequest, client: DevClient) -> None:
    """federated-jwt: only reached through ``federated_client`` (the client is found by iss + sub)."""
    raise _not_this_client()


AUTHENTICATORS: Final[dict[str, Callable[[IdPState, TokenRequest, DevClient], None]]] = {
    "client-jwt": _signed_jwt,
    "client-secret-jwt": _secret_jwt,
    "client-x509": _x509,
    "federated-jwt": _federated,
}


def federated_client(state: IdPState, request: TokenRequest) -> DevClient | None:
    """The client a federated assertion authenticates, or None when the request carries none (its
    ``iss`` is no trusted issuer of the realm). Keycloak 26.6's FederatedJWTClientAuthenticator:
    the client whose issuer and subject match; signature by the issuer's JWKS; ``aud`` the realm's
    issuer alone; reuse allowed (a Kubernetes token is presented until the kubelet renews it);
    anything wrong is 401 "Invalid client or Invalid client credentials"."""
    kind, assertion = request.param("client_assertion_type"), request.param("client_assertion")
    if kind not in (JWT_BEARER, JWT_SPIFFE) or assertion is None:
        return None
    parts = unverified(assertion)
    if parts is None or parts[1].get("iss") not in request.realm.trusted_issuers:
        return None
    header, claims = parts
    issuer, subject = claims["iss"], claims.get("sub")
    client = next(
        (
            c
            for c in request.realm.clients
            if c.auth == "federated-jwt" and c.federated_issuer == issuer and c.federated_subject == subject
        ),
        None,
    )
    if client is None or request.param("client_id") not in (None, subject):
        raise _not_this_client()
    keys = request.realm.trusted_issuers[issuer].get("keys", [])
    chosen = [k for k in keys if k.get("kid") == header.get("kid")] or keys[:1]
    try:
        if not chosen or header.get("alg") not in _ASYMMETRIC:
            raise jwt.InvalidSignatureError("no key")
        jwt.decode(
            assertion,
            jwt.PyJWK(chosen[0]).key,
            algorithms=[header["alg"]],
            options={"verify_exp": False, "verify_iat": False, "verify_nbf": False, "verify_aud": False},
        )
        _check_claims(state, request, claims, audiences=[request.issuer], max_exp=FEDERATED_MAX_EXP, reuse=True)
    except (jwt.PyJWTError, ClientProblem):
        raise _not_this_client() from None
    return client


def authenticate(state: IdPState, request: TokenRequest, client: DevClient) -> None:
    """Run the authenticator the client is configured with (not client-secret: grants does that)."""
    AUTHENTICATORS[client.auth](state, request, client)
    assertion = request.param("client_assertion")
    if assertion is not None:
        state.assertions.keep(assertion)


def jwks_json(value: object) -> dict[str, Any]:
    """A JWKS from the dev admin API (a JSON object with ``keys``), or ValueError."""
    doc = json.loads(value) if isinstance(value, str) else value
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError("a JWKS is a JSON object with a 'keys' list")
    return doc
