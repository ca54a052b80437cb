"""OIDC token-endpoint messages: build the request, parse the response, map errors. Pure.

``build_*`` turn a grant into an ``HttpRequest``; ``parse_*`` turn an ``HttpResponse`` into a
``TokenSet`` (``dc_broker.tokens``), a ``DeviceAuthorization`` or ``Endpoints``, or raise an
``UpstreamFault`` (``OAuthError`` / ``UpstreamTransient`` / ``UpstreamGarbage``). Tested with plain
values; the network is ``dc_broker.idp.transport``'s job.

Must never: import httpx or trio, do I/O, read a clock (``now`` is a parameter).

**Client authentication** (``client_of``, ``_client_auth``): client_secret_basic, client_secret_post,
none, and the methods that present a *client assertion* (RFC 7523: ``private_key_jwt``,
``client_secret_jwt``; and a federated one another issuer wrote, ``client_assertion_file``) or a
certificate (RFC 8705 ``tls_client_auth``: nothing in the request, the transport presents it). An
assertion needs a clock, randomness and a key, so it is not made here: the request carries
``client_assertion_type`` and an ``AssertionNeeded`` marker, and the edge that sends it
(``Session._request`` through ``dc_broker.idp.assertions.complete``) signs or reads one just before
the send. Its value is then one of the request's ``secrets()``: never echoed back by ``clean_text``.

Secrets enter as ``Secret`` and leave only inside the request body or Authorization header. Text
the IdP writes (``error``, ``error_description``) is bounded, stripped of control characters and has
every secret the request carried redacted (``clean_text``) before it can reach a log line or a reply.

Odd answers have one rule each, applied here where the response is parsed:

* a 400/401/403 without an OAuth error body (empty, HTML, a proxy's page) is a refusal of that grant,
  ``OAuthError("refused", ..., status)``, not an outage;
* **lifetimes** (``expiry``): ``expires_in`` is used when it is a number in [``MIN_LIFETIME`` (1 s),
  ``MAX_LIFETIME`` (one year)]. When it is absent, not a number, zero, negative or absurd, the access
  token's own lifetime is used if it is a JWT (``exp - iat``, else ``exp`` against the wall clock
  when the request was sent), else ``DEFAULT_LIFETIME`` (300 s); each such oddity comes back as a
  note (``TokenSet.notes``) the session logs once per profile. When the token is a JWT, its ``exp``
  also caps the expiry: counted from the send time, ``exp - iat`` (less 1 s when ``iat`` is whole
  seconds: Keycloak floors it, so its ``exp`` can come up to 1 s before send time + ``expires_in``),
  so the broker never serves a token past its ``exp`` whatever the two clocks say;
* ``refresh_expires_in``: a positive number (capped at one year) is the refresh token's deadline, 0
  none (offline tokens). **RFC 6749 section 6**: an answer to a refresh that brings no
  ``refresh_token`` keeps the presented one (``Presented``) and its deadline; one that brings the
  same token back without ``refresh_expires_in`` keeps its deadline too.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final
from urllib.parse import quote, quote_plus, unquote, urlencode

from dc_broker.config import Profile, check_url
from dc_broker.errors import ConfigError, OAuthError, UpstreamGarbage, UpstreamTransient
from dc_broker.idp import refusals
from dc_broker.secret import Secret
from dc_broker.tokens import Credentials, TokenSet
from dc_token.errors import LoginRequired

DEVICE_GRANT: Final = "urn:ietf:params:oauth:grant-type:device_code"
#: RFC 7523 section 2.2: a JWT that authenticates the client
JWT_BEARER: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: Keycloak 26.6's SPIFFE client authenticator: a JWT-SVID as the client assertion
JWT_SPIFFE: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe"
#: a profile's ``assertion_type`` -> the ``client_assertion_type`` it sends
ASSERTION_TYPES: Final = {"jwt-bearer": JWT_BEARER, "jwt-spiffe": JWT_SPIFFE}
#: the methods whose requests carry a client assertion made at the edge (``AssertionNeeded``)
ASSERTION_METHODS: Final = ("private_key_jwt", "client_secret_jwt", "client_assertion_file")
#: an ``expires_in`` that is absent or not a number counts as this many seconds
DEFAULT_LIFETIME: Final = 300.0
#: token lifetimes are clamped into [MIN_LIFETIME, MAX_LIFETIME]
MIN_LIFETIME: Final = 1.0
MAX_LIFETIME: Final = 365 * 86400.0
#: a JWT's exp (without iat) that lies this much before expires_in's deadline hints at clock skew
CLOCK_TOLERANCE: Final = 5.0
#: the longest IdP text (error, error_description) that reaches a log line or a reply
MAX_IDP_TEXT: Final = 300
#: form fields that carry a secret; their values never come back in IdP text
_SECRET_FIELDS: Final = (
    "password",
    "client_secret",
    "refresh_token",
    "device_code",
    "token",
    "code",
    "code_verifier",
    "client_assertion",
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")


@dataclass(frozen=True, slots=True)
class AssertionNeeded:
    """The client assertion a request still needs, made by the edge just before the send
    (``dc_broker.idp.assertions.complete``): signed with the profile's active key
    (``private_key_jwt``) or its client secret (``client_secret_jwt``), or read from the file
    another issuer keeps current (``client_assertion_file``)."""

    method: str
    client_id: str
    #: the assertion's ``aud``: the token endpoint's URL or the issuer's (a file's JWT has its own)
    audience: str
    #: the key set (private_key_jwt) or the client secret (client_secret_jwt)
    key: Secret | None = field(default=None, repr=False)
    #: client_assertion_file: the file
    path: str | None = None
    #: private_key_jwt: sign with the key set's *next* key (a rotation's check before it is used)
    use_next: bool = False


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    url: str
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    form: Mapping[str, str] = field(default_factory=dict, repr=False)
    #: the single-use credential this request presents (a refresh token, a device or authorization
    #: code): once sent, the IdP may act on it, and its answer carries the only copy of what replaces
    #: it. The transport reads such an answer patiently and reports it lost (``AnswerLost``).
    spends: Secret | None = field(default=None, repr=False)
    #: a client assertion to make before the send (None: the request is complete)
    assertion: AssertionNeeded | None = field(default=None, repr=False)

    @property
    def precious(self) -> bool:
        """It spends a single-use credential: a lost answer puts that credential in doubt."""
        return self.spends is not None

    @property
    def patient(self) -> bool:
        """A grant at the token endpoint: the IdP acts on it once it has it, so its answer is waited for."""
        return self.spends is not None or "grant_type" in self.form

    def body(self) -> bytes:
        return urlencode(dict(self.form)).encode("ascii")

    def secrets(self) -> list[str]:
        """The secret values this request carries (form fields, the Basic client secret)."""
        found = [self.form[k] for k in _SECRET_FIELDS if self.form.get(k)]
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            try:
                _, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
            except ValueError:
                secret = ""
            if secret:
                found.append(unquote(secret))  # _client_auth form-quotes id and secret
                found.append(auth[6:])
        return found


def clean_text(text: str, secrets: Iterable[str] = (), limit: int = MAX_IDP_TEXT) -> str:
    """IdP text made fit for a log line or a reply: every secret value (raw and form-encoded)
    replaced by ``[redacted]``, control characters turned into one space, at most ``limit`` chars."""
    for secret in sorted({s for s in secrets if len(s) >= 3}, key=len, reverse=True):
        for form in {secret, quote_plus(secret), quote(secret, safe="")}:
            text = text.replace(form, "[redacted]")
    text = _CONTROL.sub(" ", text).strip()
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    headers: Mapping[str, str]
    body: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class ClientCredentials:
    """How the broker authenticates as the OAuth client."""

    client_id: str
    #: basic | post | none | private_key_jwt | client_secret_jwt | tls_client_auth | client_assertion_file
    method: str = "basic"
    secret: Secret | None = None
    #: private_key_jwt: the key set (``dc_broker.idp.clientkeys``)
    keys: Secret | None = field(default=None, repr=False)
    #: private_key_jwt / client_secret_jwt: the assertion's ``aud``
    audience: str | None = None
    #: client_assertion_file: the file, and the ``client_assertion_type`` to send with it
    assertion_file: str | None = None
    assertion_type: str = JWT_BEARER

    def assertion(self) -> AssertionNeeded | None:
        """What the edge must add before a request of this client is sent."""
        if self.method == "client_assertion_file":
            return AssertionNeeded(self.method, self.client_id, "", None, self.assertion_file)
        if self.method in ("private_key_jwt", "client_secret_jwt"):
            key = self.keys if self.method == "private_key_jwt" else self.secret
            return AssertionNeeded(self.method, self.client_id, self.audience or "", key)
        return None


@dataclass(frozen=True, slots=True)
class Endpoints:
    token: str
    device: str | None = None
    revocation: str | None = None
    issuer: str | None = None
    authorization: str | None = None
    #: RP-initiated logout with the refresh token (Keycloak's ``.../logout``): ends the IdP session
    end_session: str | None = None


@dataclass(frozen=True, slots=True)
class DeviceAuthorization:
    device_code: Secret
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_at: float
    interval: float


# ---------------------------------------------------------------- building requests (pure)


def _client_auth(client: ClientCredentials, form: dict[str, str]) -> dict[str, str]:
    headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
    if client.method == "basic" and client.secret is not None:
        raw = f"{quote(client.client_id, safe='')}:{quote(client.secret.reveal(), safe='')}"
        headers["Authorization"] = "Basic " + base64.b64encode(raw.encode()).decode("ascii")
    elif client.method == "post" and client.secret is not None:
        form["client_id"] = client.client_id
        form["client_secret"] = client.secret.reveal()
    elif client.method == "client_assertion_file":
        # no client_id: the federated assertion's sub is the *external* identity, and Keycloak
        # refuses a client_id that differs from it; the IdP finds the client by iss and sub
        form["client_assertion_type"] = client.assertion_type
    elif client.method in ("private_key_jwt", "client_secret_jwt"):
        form["client_id"] = client.client_id
        form["client_assertion_type"] = JWT_BEARER
    else:  # none, tls_client_auth (the certificate is the transport's: RFC 8705 2.1 sends client_id)
        form["client_id"] = client.client_id
    return headers


def _token_request(
    url: str, client: ClientCredentials, form: dict[str, str], scope: str | None, spends: Secret | None = None
) -> HttpRequest:
    if scope:
        form["scope"] = scope
    headers = _client_auth(client, form)
    return HttpRequest("POST", url, headers, form, spends, client.assertion())


def build_password(
    url: str, client: ClientCredentials, username: str, password: Secret, scope: str | None = None
) -> HttpRequest:
    form = {"grant_type": "password", "username": username, "password": password.reveal()}
    return _token_request(url, client, form, scope)


def build_client_credentials(url: str, client: ClientCredentials, scope: str | None = None) -> HttpRequest:
    return _token_request(url, client, {"grant_type": "client_credentials"}, scope)


def build_refresh(url: str, client: ClientCredentials, refresh_token: Secret, scope: str | None = None) -> HttpRequest:
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token.reveal()}
    return _token_request(url, client, form, scope, refresh_token)


def build_authorization_code(
    url: str, client: ClientCredentials, code: str, redirect_uri: str, code_verifier: str
) -> HttpRequest:
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
        "code_verifier": code_verifier,
    }
    return _token_request(url, client, form, None, Secret(code))


#: the refresh token a client check presents: no IdP ever issued it
CLIENT_CHECK_TOKEN: Final = "dc-broker-client-check"


def build_client_check(url: str, client: ClientCredentials, *, next_key: bool = False) -> HttpRequest:
    """A request only the client's authentication can fail: a refresh grant with a refresh token no
    IdP issued. The token endpoint authenticates the client first (Keycloak, RFC 6749 section 3.2.1),
    so ``invalid_grant`` means the client was accepted and ``invalid_client`` that it was not.
    ``next_key``: signed with the key set's next key. Spends nothing, so it is not precious."""
    form = {"grant_type": "refresh_token", "refresh_token": CLIENT_CHECK_TOKEN}
    req = _token_request(url, client, form, None)
    if next_key and req.assertion is not None:
        req = replace(req, assertion=replace(req.assertion, use_next=True))
    return req


def client_accepted(resp: HttpResponse, secrets: Iterable[str] = ()) -> bool:
    """What a client check's answer says: True if the IdP accepted the client (it refused only the
    made-up refresh token); raises the ``OAuthError`` of a refused client, ``UpstreamFault`` else."""
    try:
        check_error(resp, secrets)
    except OAuthError as exc:
        if refusals.classify(exc, refusals.REFRESH).meaning is refusals.Meaning.TOKEN_DEAD:
            return True  # it authenticated the client, then refused only the made-up token
        raise
    raise UpstreamGarbage("identity provider granted a token for a refresh token it never issued")


def build_device_start(url: str, client: ClientCredentials, scope: str | None = None) -> HttpRequest:
    return _token_request(url, client, {}, scope)


def build_device_poll(url: str, client: ClientCredentials, device_code: Secret) -> HttpRequest:
    form = {"grant_type": DEVICE_GRANT, "device_code": device_code.reveal()}
    return _token_request(url, client, form, None, device_code)


def build_revoke(url: str, client: ClientCredentials, token: Secret, hint: str = "refresh_token") -> HttpRequest:
    form = {"token": token.reveal(), "token_type_hint": hint}
    return _token_request(url, client, form, None)


def build_end_session(url: str, client: ClientCredentials, refresh_token: Secret) -> HttpRequest:
    """Keycloak's logout endpoint: client authentication and the refresh token; 204 ends exactly the
    IdP session that refresh token belongs to (and its browser SSO)."""
    return _token_request(url, client, {"refresh_token": refresh_token.reveal()}, None)


def said_invalid_token(resp: HttpResponse) -> bool:
    """A revocation answered 200 with Keycloak's ``{"error": "invalid_token"}``: the IdP did not know
    the token (unknown, or already dead), so there was nothing to revoke."""
    data = _json_object(resp, "revocation")
    return data is not None and data.get("error") == "invalid_token"


def build_discovery(issuer: str) -> HttpRequest:
    return HttpRequest("GET", issuer.rstrip("/") + "/.well-known/openid-configuration", {"Accept": "application/json"})


def build_probe(endpoints: Endpoints) -> HttpRequest:
    """A request that costs the IdP nothing and changes nothing, to learn whether it answers at all:
    its discovery document where it has an issuer, else a GET of the token endpoint (405 or 400 is
    an answer as good as any)."""
    if endpoints.issuer:
        return build_discovery(endpoints.issuer)
    return HttpRequest("GET", endpoints.token, {"Accept": "application/json"})


# ---------------------------------------------------------------- parsing responses (pure)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value.strip()))
    except ValueError:
        return None  # an HTTP date; treat as unknown and let backoff decide


def _json_object(resp: HttpResponse, what: str) -> dict[str, Any] | None:
    try:
        data = json.loads(resp.body)
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _describe_garbage(resp: HttpResponse) -> str:
    ctype = resp.headers.get("content-type", "no content type").split(";")[0]
    if not resp.body:
        return f"an empty HTTP {resp.status} body"
    return f"HTTP {resp.status} with {ctype} that is not a JSON object ({len(resp.body)} bytes)"


#: statuses with which a token endpoint refuses the grant it was sent, whatever the body says
REFUSALS: Final = frozenset({400, 401, 403})


def unavailable(status: int) -> bool:
    """An answer that says the IdP is not there to act now (5xx, 408, 425, 429): try again later."""
    return status >= 500 or status in (408, 425, 429)


def check_error(resp: HttpResponse, secrets: Iterable[str] = ()) -> None:
    """Raise the fault a non-2xx response stands for. Returns only for 2xx. ``secrets`` (the
    request's, ``HttpRequest.secrets``) are redacted from whatever text the IdP sends back."""
    status = resp.status
    if 200 <= status < 300:
        return
    if unavailable(status):
        raise UpstreamTransient(f"identity provider answered HTTP {status}", retry_after=_retry_after(resp.headers))
    data = _json_object(resp, "error")
    if status == 404:  # a wrong URL, whatever the body says (Keycloak: {"error": "Realm does not exist"})
        said = data.get("error") if data is not None else None
        raise OAuthError("not_found", clean_text(said, secrets) if isinstance(said, str) else "no such endpoint", 404)
    if data is not None and isinstance(data.get("error"), str) and data["error"].strip():
        description = data.get("error_description")
        raise OAuthError(
            clean_text(data["error"], secrets, 64),
            clean_text(description, secrets) if isinstance(description, str) else "",
            status,
        )
    if status in REFUSALS:  # glewlwyd, or a proxy that replaced the error page: still a refusal
        ctype = resp.headers.get("content-type", "no content type").split(";")[0]
        raise OAuthError("refused", "an empty body" if not resp.body else f"a {ctype} body, not an OAuth error", status)
    raise UpstreamGarbage(f"identity provider answered {_describe_garbage(resp)}")


def lifetime(value: object, default: float = DEFAULT_LIFETIME) -> float:
    """A number of seconds as an IdP sent it, clamped into [MIN_LIFETIME, MAX_LIFETIME]; ``default``
    when it is absent or not a number."""
    if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
        return default
    return min(MAX_LIFETIME, max(MIN_LIFETIME, float(value)))


def _sane_lifetime(value: object) -> float | None:
    """``value`` as seconds if it is a usable lifetime, else None."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return None
    return float(value) if MIN_LIFETIME <= value <= MAX_LIFETIME else None


def jwt_claims(token: str) -> dict[str, Any] | None:
    """The claims of a JWT, unverified (only ever used to *shorten* a lifetime), or None when
    ``token`` is not a JWT (opaque tokens are normal)."""
    parts = token.split(".")
    if len(parts) != 3 or not parts[1] or len(parts[1]) > 65536:
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _number(value: object) -> float | None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return None
    return float(value)


def _shown(value: object) -> str:
    """An IdP's value as a note shows it: numbers and short words only, never a token's text."""
    if value is None:
        return "absent"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"a {type(value).__name__}"
    return f"{value:g}"


def expiry(expires_in: object, access_token: str, now: float, wall: float | None) -> tuple[float, tuple[str, ...]]:
    """When an access token expires on the caller's clock (``now`` = when the request was sent;
    ``wall`` = the wall clock then, if known), and notes on anything odd, by the rules in the module
    docstring."""
    claims = jwt_claims(access_token)
    exp = _number(claims.get("exp")) if claims else None
    iat = _number(claims.get("iat")) if claims else None
    notes: list[str] = []
    life = _sane_lifetime(expires_in)
    if life is None:
        own = None
        if exp is not None and iat is not None:
            own = _sane_lifetime(exp - iat)
        elif exp is not None and wall is not None:
            own = _sane_lifetime(exp - wall)
        if own is not None:
            life = own
            notes.append(f"expires_in {_shown(expires_in)}: the access token's own exp gives {own:g} s")
        else:
            life = DEFAULT_LIFETIME
            notes.append(f"expires_in {_shown(expires_in)} and no usable exp: {DEFAULT_LIFETIME:g} s assumed")
    at = now + life
    if exp is not None and iat is not None and exp > iat:
        # counted from the send: the IdP issued the token after it, at iat (floored when whole)
        by_jwt = now + (exp - iat) - (1.0 if iat == int(iat) else 0.0)
        at = min(at, max(now + MIN_LIFETIME, by_jwt))
    elif exp is not None and wall is not None:
        by_jwt = now + (exp - wall)
        if by_jwt < at - CLOCK_TOLERANCE:
            notes.append(f"the access token's exp lies {at - by_jwt:.0f} s before expires_in says: clocks differ?")
        at = min(at, max(now + MIN_LIFETIME, by_jwt))
    return at, tuple(notes)


@dataclass(frozen=True, slots=True)
class Presented:
    """The refresh token a refresh grant presented, and its deadline: what an answer keeps when it
    brings no new one (RFC 6749 section 6), with the deadline the answer says (``refresh_expires_in``:
    the refresh token it leaves the client holds that long now; an OP whose idle timeout slides with
    each use says so), else the one it had."""

    refresh_token: Secret
    refresh_expires_at: float | None


def parse_token_response(
    resp: HttpResponse,
    now: float,
    secrets: Iterable[str] = (),
    *,
    wall: float | None = None,
    presented: Presented | None = None,
) -> TokenSet:
    """A token endpoint response -> TokenSet, or the UpstreamFault it stands for. ``now`` and
    ``wall``: the caller's clock and the wall clock when the request was sent; ``presented``: the
    refresh token a refresh grant sent."""
    check_error(resp, secrets)
    data = _json_object(resp, "token")
    if data is None:
        raise UpstreamGarbage(f"identity provider answered {_describe_garbage(resp)} instead of a token")
    access = data.get("access_token")
    if not isinstance(access, str) or not access:
        raise UpstreamGarbage("identity provider answered 200 without an access_token")
    token_type = data.get("token_type", "Bearer")
    if isinstance(token_type, str) and token_type.lower() == "dpop":  # a client setting, not garbage
        raise OAuthError(
            "dpop_bound", "the identity provider granted a DPoP-bound token (token_type DPoP)", resp.status
        )
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise UpstreamGarbage(
            f"identity provider granted a {clean_text(str(token_type), (), 40)!r} token, not a Bearer token"
        )
    expires_at, notes = expiry(data.get("expires_in"), access, now, wall)
    refresh = data.get("refresh_token")
    refresh_token = Secret(refresh) if isinstance(refresh, str) and refresh else None
    rexp = _number(data.get("refresh_expires_in"))
    said_deadline = rexp is not None
    if refresh_token is None and presented is not None:  # RFC 6749 section 6: the presented one lives on
        refresh_token = presented.refresh_token
    refresh_expires_at: float | None = None
    if refresh_token is not None and rexp is not None and rexp > 0:
        refresh_expires_at = now + lifetime(rexp)
    if presented is not None and refresh_token == presented.refresh_token and not said_deadline:
        refresh_expires_at = presented.refresh_expires_at  # nothing said about it: its deadline holds
    scope = data.get("scope")
    id_token = data.get("id_token")
    return TokenSet(
        access_token=Secret(access),
        obtained_at=now,
        expires_at=expires_at,
        token_type="Bearer",
        refresh_token=refresh_token,
        refresh_expires_at=refresh_expires_at,
        scope=scope if isinstance(scope, str) else None,
        id_token=Secret(id_token) if isinstance(id_token, str) and id_token else None,
        notes=notes,
    )


def parse_device_start(resp: HttpResponse, now: float, secrets: Iterable[str] = ()) -> DeviceAuthorization:
    check_error(resp, secrets)
    data = _json_object(resp, "device")
    if data is None:
        raise UpstreamGarbage(f"device authorization answered {_describe_garbage(resp)}")
    try:
        device_code = str(data["device_code"])
        user_code = str(data["user_code"])
        uri = str(data["verification_uri"])
        expires_in = min(lifetime(data.get("expires_in"), 600.0), 3600.0)
        interval = float(data.get("interval", 5))
        if not math.isfinite(interval):
            raise ValueError(interval)
    except (KeyError, TypeError, ValueError):
        raise UpstreamGarbage("device authorization response lacks device_code/user_code/verification_uri") from None
    complete = data.get("verification_uri_complete")
    return DeviceAuthorization(
        device_code=Secret(device_code),
        user_code=user_code,
        verification_uri=uri,
        verification_uri_complete=complete if isinstance(complete, str) else None,
        expires_at=now + expires_in,
        interval=min(60.0, max(1.0, interval)),
    )


def parse_discovery(resp: HttpResponse, issuer: str) -> Endpoints:
    """A discovery document -> Endpoints. Raises ``OAuthError`` (404 and other refusals: the issuer
    is wrong), ``UpstreamGarbage`` (no token_endpoint) or ``ConfigError`` (an endpoint that is not
    https, or plain http off loopback)."""
    check_error(resp)
    data = _json_object(resp, "discovery")
    if data is None or not isinstance(data.get("token_endpoint"), str):
        raise UpstreamGarbage(f"discovery document at {issuer} has no token_endpoint")
    token = data["token_endpoint"]
    check_url(token, "token_endpoint from discovery")
    found: dict[str, str | None] = {}
    for key in (
        "device_authorization_endpoint",
        "revocation_endpoint",
        "authorization_endpoint",
        "end_session_endpoint",
    ):
        value = data.get(key)
        if isinstance(value, str):
            check_url(value, f"{key} from discovery")
        found[key] = value if isinstance(value, str) else None
    said = data.get("issuer")
    return Endpoints(
        token=token,
        device=found["device_authorization_endpoint"],
        revocation=found["revocation_endpoint"],
        issuer=said if isinstance(said, str) else issuer,
        authorization=found["authorization_endpoint"],
        end_session=found["end_session_endpoint"],
    )


def static_endpoints(profile: Profile) -> Endpoints | None:
    """Endpoints known from the profile alone (Keycloak's fixed layout), or None when discovery is needed."""
    base = profile.endpoint_base()
    if profile.token_url:
        oc = f"{base}/protocol/openid-connect" if base else None
        return Endpoints(
            token=profile.token_url,
            device=f"{oc}/auth/device" if oc else None,
            revocation=f"{oc}/revoke" if oc else None,
            end_session=f"{oc}/logout" if oc else None,
        )
    if base:
        oc = f"{base}/protocol/openid-connect"
        return Endpoints(
            token=f"{oc}/token",
            device=f"{oc}/auth/device",
            revocation=f"{oc}/revoke",
            issuer=base,
            authorization=f"{oc}/auth",
            end_session=f"{oc}/logout",
        )
    return None


def assertion_audience(profile: Profile, endpoints: Endpoints) -> str:
    """The ``aud`` of this profile's signed client assertions: the token endpoint (the default), the
    issuer, or the URL the profile names (``assertion_audience``)."""
    chosen = profile.assertion_audience or "token_endpoint"
    if chosen == "token_endpoint":
        return endpoints.token
    if chosen == "issuer":
        if endpoints.issuer is None:
            raise ConfigError(
                f'profile {profile.name!r}: assertion_audience = "issuer", but its issuer is not known (it has '
                "only token_url): set issuer, or assertion_audience to the issuer's URL"
            )
        return endpoints.issuer
    return chosen


def client_of(profile: Profile, credentials: Credentials, endpoints: Endpoints) -> ClientCredentials:
    """How this profile's client authenticates, with what it has stored. A secret method without a
    stored secret is a public client (the IdP's refusal then says so); private_key_jwt without a
    stored key cannot be anything: ``LoginRequired`` naming the command that makes one."""
    method, secret = profile.auth_method, credentials.client_secret
    if method == "private_key_jwt":
        if credentials.client_keys is None:
            raise LoginRequired(
                f"profile {profile.name!r}: no client key stored (auth_method private_key_jwt); make one with "
                f"`dc-broker rotate {profile.name} --key` and register its public JWKS at the identity provider"
            )
        return ClientCredentials(
            profile.client_id, method, keys=credentials.client_keys, audience=assertion_audience(profile, endpoints)
        )
    if method == "client_secret_jwt" and secret is not None:
        return ClientCredentials(profile.client_id, method, secret, audience=assertion_audience(profile, endpoints))
    if method == "client_assertion_file":
        kind = ASSERTION_TYPES[profile.assertion_type or "jwt-bearer"]
        return ClientCredentials(profile.client_id, method, assertion_file=profile.assertion_file, assertion_type=kind)
    if method == "tls_client_auth":
        return ClientCredentials(profile.client_id, method)
    return ClientCredentials(profile.client_id, method if secret is not None else "none", secret)
