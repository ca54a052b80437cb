"""What a development realm is: users, clients and session lifetimes. Plain mutable config, no logic.

These objects are read on every request, so tests may change them at runtime (a new password, a
client secret rotated away, a user disabled) through ``DevIdP.realm(name)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any


@dataclass
class DevUser:
    """A realm user. ``required_actions`` models "Account is not fully set up" (e.g. UPDATE_PASSWORD)."""

    username: str
    password: str = field(repr=False)
    roles: list[str] = field(default_factory=list)
    enabled: bool = True
    required_actions: bool = False


#: Keycloak's client authenticators (``dc_broker.devidp.clientauth``), by their provider ids
CLIENT_AUTHENTICATORS = ("client-secret", "client-jwt", "client-secret-jwt", "client-x509", "federated-jwt")


@dataclass
class DevClient:
    """An OIDC client. ``secret=None`` is a public client (client_id only).

    ``service_account``: ``None`` (default) means "enabled iff ``service_account_roles`` is non-empty";
    set it to force the service account on or off. ``device_grant``, ``direct_grants``,
    ``service_account_enabled``, ``offline_allowed`` and ``dpop`` produce Keycloak's answers for a
    client whose settings forbid what is asked (../shared/keycloak.md).

    ``auth``: its Client Authenticator (Keycloak's Credentials tab): ``client-secret`` (the default),
    ``client-jwt`` (Signed JWT: ``jwks``, the public keys it registered), ``client-secret-jwt``
    (Signed JWT with Client Secret: ``secret``), ``client-x509`` (X509 Certificate: ``subject_dn``)
    or ``federated-jwt`` (Signed JWT - Federated: ``federated_issuer`` and ``federated_subject``).
    """

    client_id: str
    secret: str | None = field(default=None, repr=False)
    direct_grants: bool = True
    service_account_roles: list[str] = field(default_factory=list)
    device_grant: bool = True
    service_account: bool | None = None
    #: the service account's user is enabled (Keycloak: Users -> service-account-CLIENT -> Enabled)
    service_account_enabled: bool = True
    #: offline tokens (scope offline_access) allowed for this client (its Offline Access client scope)
    offline_allowed: bool = True
    #: DPoP: "off", "bound" (answers carry token_type DPoP) or "required" (no proof: an error)
    dpop: str = "off"
    #: its default client scopes (Keycloak's Client scopes tab, type Default): in every token it
    #: gets, whatever a request asks; space-separated, "" for none
    default_scopes: str = "profile email"
    auth: str = "client-secret"
    jwks: dict[str, Any] | None = None
    subject_dn: str | None = None
    federated_issuer: str | None = None
    federated_subject: str | None = None

    def __post_init__(self) -> None:
        if self.auth not in CLIENT_AUTHENTICATORS:
            raise ValueError(f"auth must be one of {', '.join(CLIENT_AUTHENTICATORS)}, not {self.auth!r}")

    @property
    def public(self) -> bool:
        return self.secret is None and self.auth == "client-secret"

    @property
    def has_service_account(self) -> bool:
        if self.public:
            return False
        if self.service_account is None:
            return bool(self.service_account_roles)
        return self.service_account


@dataclass
class DevRealm:
    """A realm. Lifetimes are seconds, as in the Keycloak admin console (Realm settings -> Sessions/Tokens).

    ``device_interval`` is Realm settings -> Tokens -> "OAuth 2.0 Device Polling Interval": the
    ``interval`` a device authorization tells its client, and the least time from one of its accepted
    polls to the next before the answer is ``slow_down`` (a poll answered ``slow_down`` moves nothing).

    **Other OPs' personalities** (the defaults are Keycloak's own answers):

    * ``refresh_token_answer``: what an answer to a refresh carries as ``refresh_token``: ``"new"``
      (Keycloak: a new one every time), ``"same"`` (the presented one again) or ``"none"`` (none at
      all: LemonLDAP::NG, Google, Okta without rotation; RFC 6749 section 6 lets a server do so, and
      the client keeps the one it has). With ``same`` and ``none`` the refresh token lives as long as
      its session: each use pushes its deadline, as those OPs' long-lived refresh tokens do.
    * ``dead_refresh_error``: the ``error`` a dead refresh token gets: ``"invalid_grant"`` (Keycloak,
      RFC 6749) or ``"invalid_request"`` (some OPs).
    * ``send_refresh_expires_in`` / ``send_expires_in``: whether answers carry them (Keycloak sends
      both; most OPs omit the first, and ``expires_in`` is only RECOMMENDED: the JWT's ``exp`` tells).
    * ``refresh_scope``: a ``scope`` on a refresh: ``"narrow"`` (current Keycloak: a word not in the
      original grant is dropped silently, a default scope stays) or ``"ignore"`` (Keycloak up to about
      22 / RH-SSO 7.6: the full original scope comes back).
    """

    name: str
    users: list[DevUser]
    clients: list[DevClient]
    access_lifespan: float = 1800
    sso_idle: float = 1800
    sso_max: float = 36000
    offline_idle: float = 30 * 86400
    rotate_refresh_tokens: bool = False
    refresh_token_max_reuse: int = 0
    device_interval: int = 5
    refresh_token_answer: str = "new"
    dead_refresh_error: str = "invalid_grant"
    send_refresh_expires_in: bool = True
    send_expires_in: bool = True
    refresh_scope: str = "narrow"
    #: brute-force detection (Realm settings -> Security defenses): after ``failure_factor`` wrong
    #: passwords the user is locked ``wait_increment`` s (more each time, up to ``max_failure_wait``),
    #: and even the right password gets "Invalid user credentials" until the lock lifts
    brute_force: bool = False
    failure_factor: int = 30
    wait_increment: float = 60.0
    max_failure_wait: float = 900.0
    #: "Require SSL": "external" (Keycloak's default: plain http from loopback is fine), "all"
    ssl_required: str = "external"
    #: a disabled realm answers every token request 403 "Realm not enabled"
    enabled: bool = True
    #: what revoking a refresh token ends: "client" (Keycloak 23+: this client's part of the
    #: session; the user session and its browser SSO live on) or "user" (up to about 22: the
    #: client's part of every session of the user, and their offline tokens for the client)
    revoke_scope: str = "client"
    #: issuers whose assertions may authenticate a federated-jwt client: issuer -> its JWKS (Keycloak
    #: 26.6: an identity provider of the realm, e.g. a Kubernetes cluster or a SPIFFE trust domain)
    trusted_issuers: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        choices = {
            "refresh_token_answer": ("new", "same", "none"),
            "dead_refresh_error": ("invalid_grant", "invalid_request"),
            "refresh_scope": ("narrow", "ignore"),
            "ssl_required": ("external", "all"),
            "revoke_scope": ("client", "user"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        if self.rotate_refresh_tokens and self.refresh_token_answer != "new":
            raise ValueError("an OP that rotates refresh tokens answers each refresh with a new one")

    def user(self, username: str) -> DevUser | None:
        # Keycloak usernames are case-insensitive.
        wanted = username.lower()
        return next((u for u in self.users if u.username.lower() == wanted), None)

    def client(self, client_id: str) -> DevClient | None:
        return next((c for c in self.clients if c.client_id == client_id), None)


def demo_realm(**overrides: Any) -> DevRealm:
    """The realm `dc-broker dev`, `make demo` and the tests use; ``overrides`` set DevRealm fields."""
    known = {f.name for f in fields(DevRealm)}
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"demo_realm() got unknown DevRealm fields: {sorted(unknown)}")
    realm = DevRealm(
        name="demo",
        users=[
            DevUser("demo", "demo", roles=["dc-api"]),
            DevUser("viewer", "viewer"),
            DevUser("disabled", "disabled", enabled=False),
        ],
        clients=[
            DevClient("dc-cli", "dc-cli-secret"),
            DevClient("dc-public", None),
            DevClient("dc-service", "dc-service-secret", service_account_roles=["dc-api"]),
            DevClient("no-direct", "no-direct-secret", direct_grants=False),
        ],
    )
    return replace(realm, **overrides)
