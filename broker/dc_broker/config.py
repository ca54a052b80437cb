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
    grant = "password"                   # password | client_credentials | device
    username = "alice"
    auth_method = "basic"                # basic | post | none
    scope = "openid"
    ca_bundle = "/etc/ssl/certs/acme.pem"

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
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

from dc_token.errors import ConfigError

GRANTS: Final = ("password", "client_credentials", "device")
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
    allow: tuple[str, ...] = ()
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
        raise ConfigError(f"profile {p.name!r}: grant {p.grant!r} is not one of {', '.join(GRANTS)}")
    if p.auth_method not in AUTH_METHODS:
        raise ConfigError(f"profile {p.name!r}: auth_method {p.auth_method!r} is not one of {', '.join(AUTH_METHODS)}")
    if not p.client_id:
        raise ConfigError(f"profile {p.name!r}: client_id is required")
    if p.token_url is None and p.issuer is None and (p.server is None or p.tenant is None):
        raise ConfigError(f"profile {p.name!r}: say where the IdP is with server + tenant, issuer, or token_url")
    for what in ("server", "issuer", "token_url"):
        url = getattr(p, what)
        if url is not None:
            check_url(url, f"profile {p.name!r}: {what}")
    if p.grant == "password" and not p.username:
        raise ConfigError(f"profile {p.name!r}: grant 'password' needs a username")
    from dc_broker.acl import parse_rules

    try:
        parse_rules(p.allow)
    except ConfigError as exc:
        raise ConfigError(f"profile {p.name!r}: {exc}") from None
    if p.grant == "client_credentials" and p.auth_method == "none":
        raise ConfigError(f"profile {p.name!r}: client_credentials needs a client secret (auth_method basic or post)")


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

    def __post_init__(self) -> None:
        for name, low, high in (
            ("max_connections", 1, 1_000_000),
            ("max_in_flight", 1, 100_000),
            ("max_frame", 256, 64 * 1024),
            ("partial_frame_timeout", 0.1, 3600),
            ("audit_interval", 1, 86400),
            ("auto_lock_after", 0, 30 * 86400),
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
    "allow": list,
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
        if "allow" in kwargs:
            kwargs["allow"] = tuple(str(rule) for rule in kwargs["allow"])
        if "sinks" in kwargs:
            kwargs["sinks"] = parse_sinks(name, kwargs["sinks"], text=text, path=path)
        try:
            profiles[name] = Profile(name=name, **kwargs)
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


def remove_profile(path: str, name: str) -> None:
    """Remove ``[profiles.NAME]`` (header to the next table) from the config file, keeping the rest."""
    config = load_config(path, missing_ok=False)
    if name not in config.profiles:
        raise ConfigError(f"no profile named {name!r} in {path}; `dc-broker list` shows the profiles")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    # the table and its sub-tables ([[profiles.NAME.sinks]])
    header = re.compile(r"^\s*\[\[?\s*profiles\s*\.\s*" + re.escape(name) + r"\s*[].]")
    out, skipping = [], False
    for line in lines:
        if line.lstrip().startswith("["):
            skipping = bool(header.match(line))
        if not skipping:
            out.append(line)
    _write_atomically(path, "".join(out))
    if name in load_config(path).profiles:  # e.g. an inline-table form we do not edit
        raise ConfigError(f"could not remove profile {name!r} from {path}; edit the file by hand")


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        parse_config(tomllib.loads(text), text=text, path=path)  # never write a config that will not load
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
