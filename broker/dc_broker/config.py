"""Profiles and daemon settings: the TOML config file, XDG paths and validation.

Owns what a profile *is* (non-secret settings only: secrets live in the store, never here) and how
``config.toml`` becomes ``Config``. Every error names the file, the line and the key, and says what
to write instead. Pure apart from reading the one file it is given.

    [daemon]
    socket = "/run/user/1000/dc-broker/broker.sock"   # optional

    [profiles.acme]
    server = "https://dc.example.com"    # or issuer = ".../realms/acme", or token_url = "..."
    tenant = "acme"
    client_id = "dc-cli"
    grant = "password"                   # password | client_credentials | device | browser
    username = "alice"
    auth_method = "basic"                # basic | post | none
    scope = "openid"
    ca_bundle = "/etc/ssl/certs/acme.pem"
    proxy = "http://proxy.corp:3128"     # or "direct"; unset: https_proxy / no_proxy (dc_broker.idp.proxies)

    [[profiles.acme.sinks]]              # token files the broker keeps current (dc_broker.sinks)
    path = "~/.local/state/dc-broker/acme.token"
    format = "token"                     # token | header | json | env
    mode = "0600"                        # at most 0660; group = "analytics" for a shared file
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

from dc_broker.errors import ConfigError


class BadValue(ConfigError):
    """A profile value that is wrong: ``key`` names it, so the config's error points at its line."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


GRANTS: Final = ("password", "client_credentials", "device", "browser")
AUTH_METHODS: Final = ("basic", "post", "none")
_PROFILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_LOOPBACK_HOSTS: Final = frozenset({"localhost", "127.0.0.1", "::1"})
SINK_FORMATS: Final = ("token", "header", "json", "env")
_SINK_KEYS: Final = ("path", "format", "mode", "group")
_GROUP_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?$")


@dataclass(frozen=True, slots=True)
class Sink:
    """A token file the broker keeps current for one profile (written by ``dc_broker.sinks``)."""

    #: absolute: ``~`` expanded; a relative path is under $RUNTIME_DIRECTORY (the system unit), else
    #: under $XDG_STATE_HOME/dc-broker
    path: str
    format: str = "token"
    #: permission bits: owner read/write plus at most group read/write (never other users)
    mode: int = 0o600
    #: the file's group (a shared broker's readers), by name
    group: str | None = None

    def __post_init__(self) -> None:
        if self.format not in SINK_FORMATS:
            raise ConfigError(f"format {self.format!r} is not one of {', '.join(SINK_FORMATS)}")
        if self.mode & ~0o660 or not self.mode & 0o400:
            raise ConfigError(
                f"mode {self.mode:04o} is not allowed: a token file is readable by its owner and at most its "
                'group, never by other users and never executable (write e.g. "0600" or "0640")'
            )
        if self.group is not None and not _GROUP_NAME.match(self.group):
            raise ConfigError(f"group {self.group!r} is not a group name")


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


def check_profile(p: Profile) -> None:
    if not _PROFILE_NAME.match(p.name):
        raise ConfigError(f"profile name {p.name!r} is not valid: use letters, digits, '.', '_' or '-' (at most 64)")
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
    if p.proxy is not None:
        from dc_broker.idp.proxies import redacted, setting_problem

        problem = setting_problem(p.proxy)
        if problem is not None:
            raise BadValue("proxy", f"profile {p.name!r}: proxy {redacted(p.proxy)!r} {problem}")
    if p.grant == "password" and not p.username:
        raise BadValue("grant", f"profile {p.name!r}: grant 'password' needs a username")
    from dc_broker.access.rules import parse_rules

    for key in ("allow", "admin"):
        try:
            parse_rules(getattr(p, key))
        except ConfigError as exc:
            raise BadValue(key, f"profile {p.name!r}: {key}: {exc}") from None
    if p.grant == "client_credentials" and p.auth_method == "none":
        raise BadValue(
            "auth_method", f"profile {p.name!r}: client_credentials needs a client secret (auth_method basic or post)"
        )


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

    def __post_init__(self) -> None:
        for name, low, high in (
            ("max_connections", 1, 1_000_000),
            ("max_in_flight", 1, 100_000),
            ("max_frame", 256, 64 * 1024),
            ("partial_frame_timeout", 0.1, 3600),
            ("audit_interval", 1, 86400),
            ("auto_lock_after", 0, 30 * 86400),
            ("max_connections_per_uid", 1, 1_000_000),
            ("max_in_flight_per_uid", 1, 1_000_000),
            ("idle_timeout", 1, 86400),
        ):
            value = getattr(self, name)
            if not low <= value <= high:
                raise ConfigError(f"daemon.{name} = {value} is out of range ({low} to {high})")


@dataclass(frozen=True, slots=True)
class Config:
    """The whole parsed config file."""

    profiles: dict[str, Profile] = field(default_factory=dict)
    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    path: str | None = None

    @property
    def socket(self) -> str | None:
        return self.daemon.socket


def config_home(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    return env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")


def default_config_path(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    return env.get("DC_BROKER_CONFIG") or os.path.join(config_home(env), "dc-broker", "config.toml")


_PROFILE_KEYS: Final[dict[str, type]] = {
    "client_id": str,
    "grant": str,
    "server": str,
    "tenant": str,
    "issuer": str,
    "token_url": str,
    "legacy_paths": bool,
    "username": str,
    "auth_method": str,
    "scope": str,
    "ca_bundle": str,
    "proxy": str,
    "allow": list,
    "admin": list,
    "sinks": list,
}
_DAEMON_KEYS: Final[dict[str, type | tuple[type, ...]]] = {
    "socket": str,
    "group": str,
    "max_connections": int,
    "max_in_flight": int,
    "max_frame": int,
    "partial_frame_timeout": (int, float),
    "audit_interval": (int, float),
    "auto_lock_after": (int, float),
    "max_connections_per_uid": int,
    "max_in_flight_per_uid": int,
    "idle_timeout": (int, float),
}


def _line_of(text: str, table: str, key: str | None) -> int | None:
    """Best-effort line number of ``key`` inside ``[table]`` (tomllib does not report positions)."""
    header = re.compile(r"^\s*\[\s*" + re.escape(table).replace(r"\.", r"\s*\.\s*") + r"\s*\]")
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if header.match(line):
            if key is None:
                return i + 1
            for j in range(i + 1, len(lines)):
                if lines[j].lstrip().startswith("["):
                    break
                if re.match(r"^\s*" + re.escape(key) + r"\s*=", lines[j]):
                    return j + 1
            return i + 1
    return None


def load_config(path: str | None = None, *, missing_ok: bool = True) -> Config:
    """Read and validate the config file. A missing file is an empty config when ``missing_ok``."""
    path = path or default_config_path()
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        if missing_ok:
            return Config(path=path)
        raise ConfigError(f"config file {path} does not exist; create it or run `dc-broker add`") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return parse_config(data, text=text, path=path)


def parse_config(data: dict[str, Any], *, text: str = "", path: str = "<config>") -> Config:
    def where(table: str, key: str | None = None) -> str:
        line = _line_of(text, table, key)
        return f"{path}:{line}" if line else path

    unknown = set(data) - {"daemon", "profiles"}
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"{path}: unknown top-level key {key!r}; expected [daemon] and [profiles.NAME]")
    daemon = data.get("daemon", {})
    if not isinstance(daemon, dict):
        raise ConfigError(f"{where('daemon')}: [daemon] must be a table")
    for key, value in daemon.items():
        expected = _DAEMON_KEYS.get(key)
        if expected is None:
            raise ConfigError(f"{where('daemon', key)}: unknown key daemon.{key}")
        if not isinstance(value, expected) or isinstance(value, bool):
            what = "number" if isinstance(expected, tuple) else expected.__name__
            raise ConfigError(f"{where('daemon', key)}: daemon.{key} must be a {what}")
    profiles_raw = data.get("profiles", {})
    if not isinstance(profiles_raw, dict):
        raise ConfigError(f"{path}: profiles must be tables like [profiles.acme]")
    profiles: dict[str, Profile] = {}
    for name, table in profiles_raw.items():
        section = f"profiles.{name}"
        if not isinstance(table, dict):
            raise ConfigError(f"{where(section)}: [profiles.{name}] must be a table")
        for key, value in table.items():
            expected = _PROFILE_KEYS.get(key)
            if expected is None:
                known = ", ".join(sorted(_PROFILE_KEYS))
                raise ConfigError(f"{where(section, key)}: unknown key {section}.{key} (known: {known})")
            if not isinstance(value, expected) or (expected is str and not value):
                raise ConfigError(f"{where(section, key)}: {section}.{key} must be a non-empty {expected.__name__}")
        kwargs = dict(table)
        for rules in ("allow", "admin"):
            if rules in kwargs:
                kwargs[rules] = tuple(str(rule) for rule in kwargs[rules])
        if "sinks" in kwargs:
            kwargs["sinks"] = parse_sinks(name, kwargs["sinks"], text=text, path=path)
        try:
            profiles[name] = Profile(name=name, **kwargs)
        except BadValue as exc:
            # the line of the bad value when the file has it, else the table's header
            raise ConfigError(f"{where(section, exc.key if exc.key in table else None)}: {exc}") from None
        except ConfigError as exc:
            raise ConfigError(f"{where(section)}: {exc}") from None
        except TypeError:
            raise ConfigError(f"{where(section)}: [profiles.{name}] needs client_id") from None
    try:
        settings = DaemonSettings(**daemon)
    except ConfigError as exc:
        raise ConfigError(f"{where('daemon')}: {exc}") from None
    return Config(profiles=profiles, daemon=settings, path=path)


def sink_path(raw: str, environ: Mapping[str, str] | None = None) -> str:
    """Where a configured sink path points: ``~`` expanded; relative paths under $RUNTIME_DIRECTORY
    (set by systemd for the system unit), else under $XDG_STATE_HOME/dc-broker."""
    env = os.environ if environ is None else environ
    path = os.path.expanduser(raw)
    if not os.path.isabs(path):
        base = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
        if not base:
            state = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
            base = os.path.join(state, "dc-broker")
        path = os.path.join(base, path)
    return os.path.normpath(path)


def writable_by_others(directory: str) -> str | None:
    """The directory (or, while it does not exist yet, its nearest existing parent) if users other than
    its owner may create or rename files in it, else None."""
    current = directory
    while True:
        try:
            st = os.stat(current)
        except FileNotFoundError:
            parent = os.path.dirname(current)
            if parent == current:
                return None
            current = parent
            continue
        except OSError:
            return None
        return current if st.st_mode & 0o002 else None


def _sink_line(text: str, profile: str, index: int, key: str) -> int | None:
    """Line of ``key`` in the ``index``-th ``[[profiles.PROFILE.sinks]]`` table (else of its header)."""
    header = re.compile(r"^\s*\[\[\s*profiles\s*\.\s*" + re.escape(profile) + r"\s*\.\s*sinks\s*\]\]")
    lines = text.splitlines()
    seen = -1
    for i, line in enumerate(lines):
        if header.match(line):
            seen += 1
            if seen != index:
                continue
            for j in range(i + 1, len(lines)):
                if lines[j].lstrip().startswith("["):
                    break
                if re.match(r"^\s*" + re.escape(key) + r"\s*=", lines[j]):
                    return j + 1
            return i + 1
    return None


def parse_sinks(profile: str, raw: object, *, text: str = "", path: str = "<config>") -> tuple[Sink, ...]:
    """``[[profiles.NAME.sinks]]`` tables -> Sinks. A path in a directory other users may write is
    refused (they could swap the file): the error names the line of its ``path`` key."""

    def where(index: int, key: str) -> str:
        line = _sink_line(text, profile, index, key)
        return f"{path}:{line}" if line else path

    if not isinstance(raw, list):
        raise ConfigError(f"{path}: profiles.{profile}.sinks must be tables: write [[profiles.{profile}.sinks]]")
    sinks: list[Sink] = []
    for index, table in enumerate(raw):
        what = f"profiles.{profile}.sinks[{index}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {what} must be a table: write [[profiles.{profile}.sinks]]")
        for key, value in table.items():
            if key not in _SINK_KEYS:
                raise ConfigError(f"{where(index, key)}: unknown key {what}.{key} (known: {', '.join(_SINK_KEYS)})")
            if key != "mode" and (not isinstance(value, str) or not value):
                raise ConfigError(f"{where(index, key)}: {what}.{key} must be a non-empty string")
        if "path" not in table:
            raise ConfigError(f"{where(index, 'path')}: {what} needs a path")
        mode = table.get("mode", "0600")
        try:
            bits = int(mode, 8) if isinstance(mode, str) else mode
        except ValueError:
            bits = None
        if not isinstance(bits, int) or isinstance(bits, bool):
            raise ConfigError(f'{where(index, "mode")}: {what}.mode must be octal text like "0600"')
        full = sink_path(table["path"])
        try:
            sink = Sink(path=full, format=table.get("format", "token"), mode=bits, group=table.get("group"))
        except ConfigError as exc:
            key = str(exc).split()[0]  # each Sink check names its key first
            raise ConfigError(f"{where(index, key)}: {what}: {exc}") from None
        open_dir = writable_by_others(os.path.dirname(full))
        if open_dir is not None:
            raise ConfigError(
                f"{where(index, 'path')}: {what}.path {full!r} is in {open_dir}, which other users may write "
                "to (they could replace the token file); use a private directory such as "
                "~/.local/state/dc-broker or $RUNTIME_DIRECTORY"
            )
        if any(s.path == full for s in sinks):
            raise ConfigError(f"{where(index, 'path')}: {what}.path {full!r} is given twice")
        sinks.append(sink)
    return tuple(sinks)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def profile_toml(p: Profile) -> str:
    """The ``[profiles.NAME]`` table for a profile: every field that is set and not its default."""
    defaults = {f.name: f.default for f in dataclasses.fields(Profile)}
    lines = [f"[profiles.{p.name}]"]
    for key in _PROFILE_KEYS:
        value = getattr(p, key)
        if key == "sinks":
            continue  # array-of-tables, after the table itself
        if value is not None and value != () and (key == "client_id" or value != defaults.get(key)):
            lines.append(f"{key} = {_toml_value(value)}")
    for sink in p.sinks:
        lines += ["", f"[[profiles.{p.name}.sinks]]", f"path = {_toml_value(sink.path)}"]
        lines.append(f"format = {_toml_value(sink.format)}")
        lines.append(f'mode = "{sink.mode:04o}"')
        if sink.group:
            lines.append(f"group = {_toml_value(sink.group)}")
    return "\n".join(lines) + "\n"


def profile_settings(p: Profile) -> dict[str, Any]:
    """A profile's settings as plain values (``list --json``): every key, None where unset. No secrets."""
    doc: dict[str, Any] = {"name": p.name}
    for key in _PROFILE_KEYS:
        value = getattr(p, key)
        if key == "sinks":
            value = [{"path": s.path, "format": s.format, "mode": f"{s.mode:04o}", "group": s.group} for s in value]
        doc[key] = list(value) if isinstance(value, tuple) else value
    doc["endpoint"] = p.describe()  # the token endpoint it will use (or the issuer to discover it from)
    return doc


def add_profile(path: str, p: Profile) -> None:
    """Append a profile to the config file (created 0600 in a 0700 directory if missing); comments and
    other tables are kept as they are. Refuses a name that exists."""
    config = load_config(path, missing_ok=True)
    if p.name in config.profiles:
        raise ConfigError(
            f"profile {p.name!r} already exists in {path}; remove it first with `dc-broker remove {p.name}`"
        )
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        text = ""
    if text and not text.endswith("\n"):
        text += "\n"
    _write_atomically(path, text + ("\n" if text else "") + profile_toml(p))


#: `dc-broker set`: how a KEY=VALUE typed on the command line becomes a profile value
def _cli_bool(key: str, text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0"):
        return False
    raise BadValue(key, f"{key} must be true or false, not {text!r}")


_CLI_VALUES: Final[dict[type, Any]] = {
    str: lambda key, text: text,
    bool: _cli_bool,
    list: lambda key, text: tuple(rule.strip() for rule in text.split(",") if rule.strip()),
}


def parse_assignment(text: str) -> tuple[str, Any]:
    """``key=value`` as typed (``key=`` unsets it) -> (key, typed value or None)."""
    key, eq, value = text.partition("=")
    key = key.strip().replace("-", "_")
    if not eq or not key:
        raise ConfigError(f"{text!r} is not KEY=VALUE; e.g. `scope=openid email` or `ca_bundle=` to unset")
    expected = _PROFILE_KEYS.get(key)
    if expected is None:
        raise ConfigError(f"unknown profile key {key!r}; keys: {', '.join(sorted(_PROFILE_KEYS))}")
    if key == "sinks":
        raise ConfigError(
            "sinks are [[profiles.NAME.sinks]] tables, not one value: give them with "
            "`dc-broker add --force NAME ... --sink PATH[:FORMAT]`, or edit config.toml"
        )
    if value == "":
        if key == "client_id":
            raise ConfigError("client_id cannot be unset")
        return key, None
    return key, _CLI_VALUES[expected](key, value)


def _profile_header(name: str, *, subtables: bool) -> re.Pattern[str]:
    """The header line ``[profiles.NAME]``, or (``subtables``) any of its sub-tables'
    (``[[profiles.NAME.sinks]]``)."""
    tail = r"\s*\." if subtables else r"\s*\]"
    return re.compile(r"^\s*\[\[?\s*profiles\s*\.\s*" + re.escape(name) + tail)


def _next_table(lines: list[str], after: int) -> int:
    return next((j for j in range(after + 1, len(lines)) if lines[j].lstrip().startswith("[")), len(lines))


def _table_span(lines: list[str], name: str, *, with_subtables: bool = False) -> tuple[int, int]:
    """[start, end) of ``[profiles.NAME]`` in the file's lines (header included, up to the next table;
    ``with_subtables``: also the sub-tables that follow it)."""
    header = _profile_header(name, subtables=False)
    start = next((i for i, line in enumerate(lines) if header.match(line)), None)
    if start is None:
        raise ConfigError(f"profile {name!r} is not a [profiles.{name}] table; edit the file by hand")
    end = _next_table(lines, start)
    sub = _profile_header(name, subtables=True)
    while with_subtables and end < len(lines) and sub.match(lines[end]):
        end = _next_table(lines, end)
    return start, end


def set_profile_values(path: str, name: str, changes: Mapping[str, Any]) -> Profile:
    """Change (or, with None, unset) keys of one profile in place: other lines, comments and tables
    stay as they are. The new profile is validated before anything is written."""
    from dc_token.errors import UnknownProfile

    config = load_config(path, missing_ok=False)
    old = config.profiles.get(name)
    if old is None:
        raise UnknownProfile(f"no profile named {name!r} in {path}; `dc-broker list` shows the profiles")
    defaults: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(Profile)}
    values: dict[str, Any] = {k: (defaults[k] if v is None else v) for k, v in changes.items()}
    updated = dataclasses.replace(old, **values)
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    start, end = _table_span(lines, name)
    for key, value in changes.items():
        pattern = re.compile(r"^\s*" + re.escape(key) + r"\s*=")
        at = next((i for i in range(start + 1, end) if pattern.match(lines[i])), None)
        line = None if value is None else f"{key} = {_toml_value(value)}\n"
        if at is not None and line is None:
            del lines[at]
            end -= 1
        elif at is not None and line is not None:
            lines[at] = line
        elif line is not None:
            last = end
            while last > start + 1 and (not lines[last - 1].strip() or lines[last - 1].lstrip().startswith("#")):
                last -= 1  # after the table's last key, before the blank lines and comments that end it
            if lines[last - 1] and not lines[last - 1].endswith("\n"):
                lines[last - 1] += "\n"
            lines.insert(last, line)
            end += 1
    _write_atomically(path, "".join(lines))
    return updated


def replace_profile(path: str, p: Profile) -> None:
    """`dc-broker add --force`: the profile's table written anew (in place of the old one)."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    start, end = _table_span(lines, p.name, with_subtables=True)  # its [[profiles.NAME.sinks]] go too
    cut = end
    while cut > start + 1 and (not lines[cut - 1].strip() or lines[cut - 1].lstrip().startswith("#")):
        cut -= 1  # blank lines and comments just above the next table belong to that table
    body = profile_toml(p).splitlines(keepends=True)
    if cut == end < len(lines):
        body.append("\n")
    lines[start:cut] = body
    _write_atomically(path, "".join(lines))


def remove_profile(path: str, name: str) -> None:
    """Remove ``[profiles.NAME]`` (header to the next table) from the config file, keeping the rest."""
    config = load_config(path, missing_ok=False)
    if name not in config.profiles:
        raise ConfigError(f"no profile named {name!r} in {path}; `dc-broker list` shows the profiles")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    # the table and its sub-tables ([[profiles.NAME.sinks]]), wherever they stand
    table, sub = _profile_header(name, subtables=False), _profile_header(name, subtables=True)
    out, skipping = [], False
    for line in lines:
        if line.lstrip().startswith("["):
            skipping = bool(table.match(line) or sub.match(line))
        if not skipping:
            out.append(line)
    _write_atomically(path, "".join(out))
    if name in load_config(path).profiles:  # e.g. an inline-table form we do not edit
        raise ConfigError(f"could not remove profile {name!r} from {path}; edit the file by hand")


def read_text(path: str) -> str | None:
    """The config file's text as it is now (None if there is none), for ``restore``."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return None


def restore(path: str, text: str | None) -> None:
    """Put the config file back as ``read_text`` found it (undo a failed ``dc-broker add``)."""
    if text is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    else:
        _write_atomically(path, text)


def _write_atomically(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` (fsynced, then renamed). An existing file keeps its mode, owner
    and group (a shared broker's config is often 0640 root:dc-broker); a new one is 0600."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        old: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        old = None
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            if old is not None:
                _keep_owner_and_mode(f.fileno(), old, path)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        parse_config(tomllib.loads(text), text=text, path=path)  # never write a config that will not load
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise ConfigError(f"cannot write the config file {path}: {exc.strerror}") from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _keep_owner_and_mode(fd: int, old: os.stat_result, path: str) -> None:
    """Give the new file the old one's owner, group and mode (owner first: chown clears set-id bits)."""
    if (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()):
        try:
            os.fchown(fd, old.st_uid, old.st_gid)
        except PermissionError:
            raise ConfigError(
                f"cannot keep the owner of {path} (uid {old.st_uid}, gid {old.st_gid}) on rewrite; "
                "run this as root or as the file's owner"
            ) from None
    os.fchmod(fd, stat.S_IMODE(old.st_mode))
