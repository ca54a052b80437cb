"""What a profile and the daemon's settings *are*: small frozen values that check themselves when built.

PURE: no file, no environment, no clock; it imports nothing of ours but ``dc_broker.errors`` and the
allow/admin rule parser (``dc_broker.access.rules``), so the pure modules (``sessions.flows``,
``idp.oidc``) may import it (httpx's ``_config.py`` is the model). Reading config.toml is
``dc_broker.config.load``; editing it is ``dc_broker.config.edit``.

The keys a config file may hold are derived from these dataclasses' fields (``PROFILE_KEYS``,
``DAEMON_KEYS``, ``SINK_KEYS``): a new field is a new key, written once. A value is checked where it
is built (``Profile.__post_init__``), so a profile from the file, from ``dc-broker add`` and from a
test obey the same rules; a ``BadValue`` names the key, so the loader can point at its line.

Every text value is one line of printable characters: a newline or another control character in a
URL, a scope or a rule would reach an HTTP request or a log line, so it is refused, naming the key.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

from dc_broker.access.rules import parse_rules
from dc_broker.errors import ConfigError


class BadValue(ConfigError):
    """A profile value that is wrong: ``key`` names it, so the config's error points at its line."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


GRANTS: Final = ("password", "client_credentials", "device", "browser")
AUTH_METHODS: Final = (
    "basic",
    "post",
    "none",
    "private_key_jwt",
    "client_secret_jwt",
    "tls_client_auth",
    "client_assertion_file",
)
#: the methods that send a client secret (basic, post) or sign with it (client_secret_jwt)
SECRET_METHODS: Final = ("basic", "post", "client_secret_jwt")
#: what a client authenticates with where that is no client secret: it is who the client is, not a
#: login, so a logout keeps it and `dc-broker login` signs a client_credentials profile in again with it
SIGNS_IN_WITH: Final = {
    "private_key_jwt": "its client key",
    "tls_client_auth": "its client certificate",
    "client_assertion_file": "its client assertion file",
}
#: what a private_key_jwt or client_secret_jwt assertion's ``aud`` is: the token endpoint's URL
#: (RFC 7523 section 3's example) or the issuer's; Keycloak accepts both, other OPs insist on one
ASSERTION_AUDIENCES: Final = ("token_endpoint", "issuer")
#: client_assertion_file: RFC 7523's jwt-bearer, or Keycloak 26.6's jwt-spiffe (a SPIFFE JWT-SVID)
ASSERTION_TYPES: Final = ("jwt-bearer", "jwt-spiffe")
SINK_FORMATS: Final = ("token", "header", "json", "env")
#: a profile's ``proxy = "direct"``: no proxy for this profile, whatever the environment says
DIRECT: Final = "direct"
_LOOPBACK_HOSTS: Final = frozenset({"localhost", "127.0.0.1", "::1"})
_PROXY_SCHEMES: Final = ("http", "https")
_PROFILE_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_GROUP_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?")


def control_character(text: str) -> str | None:
    """The first control character in ``text`` as people read it (``a newline``, ``U+0007``), or None."""
    for ch in text:
        if ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 or ch in "\u2028\u2029":
            return {"\n": "a newline", "\r": "a carriage return", "\t": "a tab"}.get(ch, f"U+{ord(ch):04X}")
    return None


def is_profile_name(name: str) -> bool:
    """Letters, digits, '.', '_' or '-', starting with a letter or digit, at most 64."""
    return _PROFILE_NAME.fullmatch(name) is not None


def is_group_name(name: str) -> bool:
    """A group name as useradd takes it: a letter or '_' first, then letters, digits, '_', '.', '-'."""
    return _GROUP_NAME.fullmatch(name) is not None


@dataclass(frozen=True, slots=True)
class Sink:
    """A token file the broker keeps current for one profile (written by ``dc_broker.sinks``)."""

    #: absolute: ``~`` expanded; a relative path is under $RUNTIME_DIRECTORY (the system unit), else
    #: under $XDG_STATE_HOME/dc-broker (``dc_broker.config.load.sink_path``)
    path: str
    format: str = "token"
    #: permission bits: owner read/write plus at most group read/write (never other users)
    mode: int = 0o600
    #: the file's group (a shared broker's readers), by name
    group: str | None = None
    #: where it was configured (``config.toml:12``), for the messages of the task that writes it;
    #: not part of what the sink is (two sinks that differ only here are the same sink)
    origin: str | None = field(default=None, compare=False, metadata={"toml": False})

    def __post_init__(self) -> None:
        if self.format not in SINK_FORMATS:
            raise BadValue("format", f"format {self.format!r} is not one of {', '.join(SINK_FORMATS)}")
        if not self.path or (bad := control_character(self.path)):
            raise BadValue("path", "path is empty" if not self.path else f"path contains {bad}")
        if self.mode & ~0o660 or not self.mode & 0o400:
            raise BadValue(
                "mode",
                f"mode {self.mode:04o} is not allowed: a token file is readable by its owner and at most its "
                'group, never by other users and never executable (write e.g. "0600" or "0640")',
            )
        if self.group is not None and not is_group_name(self.group):
            raise BadValue("group", f"group {self.group!r} is not a group name")

    @property
    def where(self) -> str:
        """The path, and where it was configured when known: what a message about it shows."""
        return f"{self.path} ({self.origin})" if self.origin else self.path


@dataclass(frozen=True, slots=True)
class Profile:
    """One named way to get a token: which IdP, which client, which grant. No secrets."""

    name: str
    client_id: str
    grant: str = "password"
    server: str | None = None
    tenant: str | None = None
    issuer: str | None = None
    token_url: str | None = None
    legacy_paths: bool = True
    username: str | None = None
    auth_method: str = "basic"
    #: private_key_jwt / client_secret_jwt: the assertion's ``aud`` (ASSERTION_AUDIENCES, or a URL)
    assertion_audience: str | None = None
    #: tls_client_auth: the client certificate (PEM, chain allowed) and its private key (PEM); without
    #: ``client_key`` the certificate file holds the key too
    client_cert: str | None = None
    client_key: str | None = None
    #: client_assertion_file: the file another issuer keeps a JWT in (a Kubernetes projected service
    #: account token, a SPIFFE JWT-SVID), read for every request
    assertion_file: str | None = None
    #: client_assertion_file: the client_assertion_type it is sent as (ASSERTION_TYPES; default jwt-bearer)
    assertion_type: str | None = None
    scope: str | None = None
    ca_bundle: str | None = None
    #: the HTTP proxy to the IdP: a URL or "direct"; None: the environment's (dc_broker.idp.proxies)
    proxy: str | None = None
    allow: tuple[str, ...] = ()
    #: who besides the broker's own uid and root may change this profile's login (same rule syntax)
    admin: tuple[str, ...] = ()
    sinks: tuple[Sink, ...] = ()

    def __post_init__(self) -> None:
        check_profile(self)

    def endpoint_base(self) -> str | None:
        """``{server}[/auth]/realms/{tenant}`` when configured by server+tenant, else None."""
        if self.server is None or self.tenant is None:
            return None
        base = self.server.rstrip("/")
        if self.legacy_paths and not base.endswith("/auth"):
            base += "/auth"
        return f"{base}/realms/{self.tenant}"

    def static_token_url(self) -> str | None:
        """The token URL if known without discovery (explicit, or server+tenant)."""
        if self.token_url:
            return self.token_url
        base = self.endpoint_base()
        return f"{base}/protocol/openid-connect/token" if base else None

    def signs_in_with(self) -> str | None:
        """What a client_credentials profile's client authenticates with where that is no stored
        secret (``SIGNS_IN_WITH``): it stays through a logout, and `dc-broker login` grants again with
        it. None for any other profile (a secret, a password or a person's login)."""
        return SIGNS_IN_WITH.get(self.auth_method) if self.grant == "client_credentials" else None

    def same_login(self, other: Profile) -> bool:
        """Whether ``other`` differs from this profile at most in who may use it (``allow``), who may
        change it (``admin``) and where its tokens are written (``sinks``): the same login, which a
        reload keeps as it is."""
        return dataclasses.replace(other, allow=self.allow, admin=self.admin, sinks=self.sinks) == self

    def login_fingerprint(self) -> str:
        """Who a stored token is for: the IdP, client, grant, user and scope. Tokens saved under another
        fingerprint (the profile was edited since, e.g. ``set acme username=bob``) are never restored."""
        import hashlib
        import json

        keys = (self.static_token_url() or self.issuer, self.client_id, self.grant, self.username, self.scope)
        return hashlib.sha256(json.dumps(keys).encode("utf-8")).hexdigest()[:16]

    def stale_secrets(self, new: Profile) -> frozenset[str]:
        """The stored secrets (``Credentials`` fields) that belong to these settings and not to
        ``new``: the password when the username changes (it is the old user's), the client secret
        and the client's keys when the client_id changes (they are the old client's). Sent under the
        new settings they would disclose the old user's or client's credential (`dc-broker set demo
        username=bob`); ``Session.reconfigure`` and an offline `dc-broker set` drop them first.

        Nothing else drops a secret: another scope, grant, auth method, proxy, CA bundle, or server,
        tenant or issuer (a move of the same IdP: a new host name, a migration) is still the same
        user of the same client, and whoever may edit the config chose where its login goes;
        dropping the password there would only make every such edit a `rotate`."""
        stale: set[str] = set()
        if self.username != new.username:
            stale.add("password")
        if self.client_id != new.client_id:
            stale |= {"client_secret", "client_keys"}
        return frozenset(stale)

    def describe(self) -> str:
        return self.static_token_url() or f"{self.issuer} (discovery)"


def check_url(url: str, what: str) -> None:
    """https anywhere, plain http only to loopback (tokens must not cross a network in clear)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{what} {url!r} is not an http(s) URL; write it like https://sso.example.com")
    if parts.scheme == "http" and parts.hostname not in _LOOPBACK_HOSTS:
        raise ConfigError(
            f"{what} {url!r} uses plain http to a non-loopback host; use https (plain http is only "
            "allowed to localhost)"
        )


def proxy_url_problem(value: str) -> str | None:
    """What keeps ``value`` from being a proxy URL (scheme http/https, a host, no path), or None."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        return "is not a URL with a valid port"
    if parts.scheme not in _PROXY_SCHEMES:
        if parts.scheme.startswith("socks"):
            return f"is a {parts.scheme} proxy; only http:// and https:// proxies are supported"
        return "is not an http:// or https:// proxy URL"
    if not parts.hostname:
        return "names no host"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return "has a path; a proxy URL is scheme, host and port"
    return None


def proxy_setting_problem(value: str) -> str | None:
    """What is wrong with a profile's ``proxy`` value (None: nothing)."""
    if value == DIRECT:
        return None
    problem = proxy_url_problem(value)
    if problem is not None:
        return f"{problem}; write it like http://proxy.example:3128, or {DIRECT!r} for no proxy"
    if urlsplit(value).username is not None:
        return (
            "carries credentials, and config.toml holds no secrets: leave proxy unset and give the "
            "broker https_proxy=http://USER:PASSWORD@HOST:PORT in its environment instead"
        )
    return None


def redacted(value: str) -> str:
    """``value`` with any ``user:password@`` replaced: a refused value as its error message shows it."""
    scheme, sep, rest = value.partition("://")
    at = rest.rfind("@")
    return f"{scheme}{sep}***@{rest[at + 1 :]}" if sep and at >= 0 else value


def check_profile(p: Profile) -> None:
    if not is_profile_name(p.name):
        raise ConfigError(f"profile name {p.name!r} is not valid: use letters, digits, '.', '_' or '-' (at most 64)")
    for key, value in ((f.name, getattr(p, f.name)) for f in dataclasses.fields(p)):
        texts = [value] if isinstance(value, str) else value if key in ("allow", "admin") else ()
        for text in texts:
            if (bad := control_character(text)) is not None:
                shown = redacted(text) if key == "proxy" else text
                raise BadValue(
                    key, f"profile {p.name!r}: {key} {shown!r} contains {bad}; a setting is one line of text"
                )
    if p.grant not in GRANTS:
        raise BadValue("grant", f"profile {p.name!r}: grant {p.grant!r} is not one of {', '.join(GRANTS)}")
    if p.auth_method not in AUTH_METHODS:
        raise BadValue(
            "auth_method", f"profile {p.name!r}: auth_method {p.auth_method!r} is not one of {', '.join(AUTH_METHODS)}"
        )
    if not p.client_id:
        raise BadValue("client_id", f"profile {p.name!r}: client_id is required")
    if p.token_url is None and p.issuer is None and (p.server is None or p.tenant is None):
        raise ConfigError(f"profile {p.name!r}: say where the IdP is with server + tenant, issuer, or token_url")
    for what in ("server", "issuer", "token_url"):
        url = getattr(p, what)
        if url is not None:
            try:
                check_url(url, f"profile {p.name!r}: {what}")
            except ConfigError as exc:
                raise BadValue(what, str(exc)) from None
    if p.proxy is not None and (problem := proxy_setting_problem(p.proxy)) is not None:
        raise BadValue("proxy", f"profile {p.name!r}: proxy {redacted(p.proxy)!r} {problem}")
    if p.grant == "password" and not p.username:
        raise BadValue("grant", f"profile {p.name!r}: grant 'password' needs a username")
    for key in ("allow", "admin"):
        try:
            parse_rules(getattr(p, key))
        except ConfigError as exc:
            raise BadValue(key, f"profile {p.name!r}: {key}: {exc}") from None
    if p.grant == "client_credentials" and p.auth_method == "none":
        raise BadValue(
            "auth_method",
            f"profile {p.name!r}: client_credentials needs the client to authenticate (auth_method basic, post, "
            "private_key_jwt, client_secret_jwt, tls_client_auth or client_assertion_file)",
        )
    check_client_auth(p)


#: auth_method -> the profile keys it needs, and those that only it may set
_METHOD_KEYS: Final[dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "tls_client_auth": (("client_cert",), ("client_cert", "client_key")),
    "client_assertion_file": (("assertion_file",), ("assertion_file", "assertion_type")),
    "private_key_jwt": ((), ("assertion_audience",)),
    "client_secret_jwt": ((), ("assertion_audience",)),
}


def check_client_auth(p: Profile) -> None:
    """The keys each client authentication method needs are set, and no other method's are."""
    needed, own = _METHOD_KEYS.get(p.auth_method, ((), ()))
    for key in needed:
        if not getattr(p, key):
            flag = "--" + key.replace("_", "-")
            raise BadValue(key, f"profile {p.name!r}: auth_method {p.auth_method} needs {key} (add {flag} PATH)")
    for method, (_, keys) in _METHOD_KEYS.items():
        for key in keys:
            if key not in own and getattr(p, key) is not None:
                raise BadValue(
                    key, f"profile {p.name!r}: {key} is a setting of auth_method {method}, not {p.auth_method}"
                )
    for key in ("client_cert", "client_key", "assertion_file"):
        value = getattr(p, key)
        if value is not None and not value.startswith("/"):
            raise BadValue(key, f"profile {p.name!r}: {key} {value!r} is not an absolute path")
    if p.assertion_type is not None and p.assertion_type not in ASSERTION_TYPES:
        raise BadValue(
            "assertion_type",
            f"profile {p.name!r}: assertion_type {p.assertion_type!r} is not one of {', '.join(ASSERTION_TYPES)}",
        )
    aud = p.assertion_audience
    if aud is not None and aud not in ASSERTION_AUDIENCES:
        try:
            check_url(aud, f"profile {p.name!r}: assertion_audience")
        except ConfigError as exc:
            raise BadValue("assertion_audience", f"{exc} (or write one of {', '.join(ASSERTION_AUDIENCES)})") from None


#: [daemon] key -> the range its value must lie in
DAEMON_RANGES: Final[dict[str, tuple[float, float]]] = {
    "max_connections": (1, 1_000_000),
    "max_in_flight": (1, 100_000),
    "max_frame": (256, 64 * 1024),
    "partial_frame_timeout": (0.1, 3600),
    "audit_interval": (1, 86400),
    "auto_lock_after": (0, 30 * 86400),
    "max_connections_per_uid": (1, 1_000_000),
    "max_in_flight_per_uid": (1, 1_000_000),
    "idle_timeout": (1, 86400),
}


@dataclass(frozen=True, slots=True)
class DaemonSettings:
    """[daemon]: where to listen and the limits that protect the broker from its clients."""

    socket: str | None = None
    #: system mode only: the group that may connect to the 0660 socket
    group: str | None = None
    max_connections: int = 4096
    max_in_flight: int = 256
    max_frame: int = 64 * 1024
    partial_frame_timeout: float = 10.0
    audit_interval: float = 60.0
    #: lock the vault after this many seconds without a token request (0: never)
    auto_lock_after: float = 0.0
    #: system mode: connections and refresh-waiting requests one uid may hold (root and ours exempt)
    max_connections_per_uid: int = 256
    max_in_flight_per_uid: int = 1024
    #: a connection with nothing in flight that sends nothing for this long is closed
    idle_timeout: float = 300.0
    #: serve the Prometheus metrics over HTTP here: "HOST:PORT" (a loopback address unless
    #: ``metrics_allow_remote``) or "unix:PATH"; None: only `dc-broker metrics` (the socket op)
    metrics_listen: str | None = None
    #: let ``metrics_listen`` be a non-loopback address (the metrics then reach the network)
    metrics_allow_remote: bool = False
    #: "text" (plain lines; the journal's own fields under systemd) or "json" (one object per line)
    log_format: str = "text"

    def __post_init__(self) -> None:
        for name, (low, high) in DAEMON_RANGES.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise BadValue(name, f"daemon.{name} = {value} is out of range ({low:g} to {high:g})")
        for name in ("socket", "group", "metrics_listen"):
            value = getattr(self, name)
            if value is not None and (bad := control_character(value)) is not None:
                raise BadValue(name, f"daemon.{name} {value!r} contains {bad}")
        if self.log_format not in LOG_FORMATS:
            raise BadValue(
                "log_format", f"daemon.log_format = {self.log_format!r}: use one of {', '.join(LOG_FORMATS)}"
            )
        if self.metrics_listen is not None:
            metrics_address(self.metrics_listen, allow_remote=self.metrics_allow_remote)


#: the values of ``[daemon] log_format``
LOG_FORMATS: Final = ("text", "json")


@dataclass(frozen=True, slots=True)
class MetricsAddress:
    """Where the metrics endpoint listens: ``path`` (a Unix socket) or ``host`` and ``port``."""

    host: str | None = None
    port: int = 0
    path: str | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if self.host and ":" in self.host else f"{self.host}:{self.port}"


def metrics_address(text: str, *, allow_remote: bool = False) -> MetricsAddress:
    """``[daemon] metrics_listen`` read: "unix:PATH", "HOST:PORT" or "[V6]:PORT" with HOST an IP
    address or ``localhost``. A non-loopback address is refused unless ``allow_remote``: metrics
    name the profiles and say when each login ends, which is the host's business only."""
    where = "daemon.metrics_listen"
    if text.startswith("unix:"):
        path = text[5:]
        if not path.startswith("/"):
            raise BadValue("metrics_listen", f"{where} = {text!r}: give an absolute path after 'unix:'")
        return MetricsAddress(path=path)
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise BadValue("metrics_listen", f'{where} = {text!r}: use "127.0.0.1:9464", "[::1]:9464" or "unix:/run/PATH"')
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host == "localhost":
        host = "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise BadValue(
            "metrics_listen", f"{where} = {text!r}: {host!r} is not an IP address (use 127.0.0.1, ::1 or an address)"
        ) from None
    if not address.is_loopback and not allow_remote:
        raise BadValue(
            "metrics_listen",
            f"{where} = {text!r} is not a loopback address: the metrics would reach the network. Listen on "
            "127.0.0.1 (a local Prometheus or node exporter scrapes it), or set daemon.metrics_allow_remote = true "
            "to serve them beyond this host on purpose",
        )
    return MetricsAddress(host=str(address), port=int(port_text))


@dataclass(frozen=True, slots=True)
class Config:
    """The whole parsed config file."""

    profiles: dict[str, Profile] = field(default_factory=dict)
    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    path: str | None = None

    @property
    def socket(self) -> str | None:
        return self.daemon.socket


# ---------------------------------------------------------------- the keys, from the fields

#: how a TOML value of each field type looks: an array for a tuple, any number for a float
_TOML_TYPE: Final[dict[object, type | tuple[type, ...]]] = {
    str: str,
    bool: bool,
    int: int,
    float: (int, float),
    tuple: list,
}


def _toml_types(cls: type) -> dict[str, type | tuple[type, ...]]:
    """field name -> the TOML type its value must have, for every field a config file may set."""
    hints = typing.get_type_hints(cls)
    out: dict[str, type | tuple[type, ...]] = {}
    for f in dataclasses.fields(cls):
        if f.name == "name" or not f.metadata.get("toml", True):
            continue
        hint: Any = hints[f.name]
        if isinstance(hint, types.UnionType):  # X | None: a key one may leave out
            (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
        out[f.name] = _TOML_TYPE[typing.get_origin(hint) or hint]
    return out


#: [profiles.NAME] key -> its TOML type; [daemon] likewise; [[profiles.NAME.sinks]] keys
PROFILE_KEYS: Final = _toml_types(Profile)
DAEMON_KEYS: Final = _toml_types(DaemonSettings)
SINK_KEYS: Final = tuple(_toml_types(Sink))
#: the keys `dc-broker set` takes (sinks are tables of their own)
SETTABLE_KEYS: Final = tuple(k for k in PROFILE_KEYS if k != "sinks")


def type_name(expected: type | tuple[type, ...]) -> str:
    """How a message names a TOML type: "text", "true or false", "number", "list"."""
    if isinstance(expected, tuple):
        return "number"
    return {str: "text in quotes, not empty", bool: "true or false", int: "whole number", list: "list"}[expected]


def profile_settings(p: Profile) -> dict[str, Any]:
    """A profile's settings as plain values (``list --json``): every key, None where unset. No secrets."""
    doc: dict[str, Any] = {"name": p.name}
    for key in PROFILE_KEYS:
        value = getattr(p, key)
        if key == "sinks":
            value = [{"path": s.path, "format": s.format, "mode": f"{s.mode:04o}", "group": s.group} for s in value]
        doc[key] = list(value) if isinstance(value, tuple) else value
    doc["endpoint"] = p.describe()  # the token endpoint it will use (or the issuer to discover it from)
    return doc
