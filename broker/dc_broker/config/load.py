"""config.toml -> ``Config``: reading the file, the XDG paths, and errors that name file, line and key.

Reads the one file it is given and the environment (XDG paths, where a relative sink path points);
never writes, never looks at any other file: the same text loads the same everywhere. Whether a
token file's directory is safe is checked where the file is written (``dc_broker.sinks`` through
``dc_broker.atomic``), each time, not here once. Every error says what to write instead.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from typing import Any

from dc_broker.config.values import (
    DAEMON_KEYS,
    PROFILE_KEYS,
    SINK_KEYS,
    BadValue,
    Config,
    DaemonSettings,
    Profile,
    Sink,
    type_name,
)
from dc_broker.errors import ConfigError


def config_home(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    return env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")


def default_config_path(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    return env.get("DC_BROKER_CONFIG") or os.path.join(config_home(env), "dc-broker", "config.toml")


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


def read_config_text(path: str) -> str | None:
    """The config file's text (None when there is none); a ConfigError naming the file otherwise."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None


def load_config(path: str | None = None, *, missing_ok: bool = True) -> Config:
    """Read and validate the config file. A missing file is an empty config when ``missing_ok``."""
    path = path or default_config_path()
    text = read_config_text(path)
    if text is None:
        if missing_ok:
            return Config(path=path)
        raise ConfigError(f"config file {path} does not exist; create it or run `dc-broker add`")
    return parse_text(text, path)


def parse_text(text: str, path: str = "<config>") -> Config:
    """A config file's text -> Config (what ``load_config`` does after reading)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return parse_config(data, text=text, path=path)


def _line_of(text: str, table: str, key: str | None) -> int | None:
    """Best-effort line number of ``key`` inside ``[table]`` (tomllib does not report positions)."""
    header = re.compile(r"^\s*\[\s*" + re.escape(table).replace(r"\.", r"\s*\.\s*") + r"\s*\]")
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if header.match(line):
            return i + 1 if key is None else _key_line(lines, i, key)
    return None


def _key_line(lines: list[str], header: int, key: str) -> int:
    """Line number of ``key`` in the table whose header is ``lines[header]`` (else the header's)."""
    for j in range(header + 1, len(lines)):
        if lines[j].lstrip().startswith("["):
            break
        if re.match(r"^\s*" + re.escape(key) + r"\s*=", lines[j]):
            return j + 1
    return header + 1


def _type_problem(value: object, expected: type | tuple[type, ...]) -> bool:
    if isinstance(value, bool) and expected is not bool:
        return True
    return not isinstance(value, expected) or (expected is str and not value)


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
        expected = DAEMON_KEYS.get(key)
        if expected is None:
            raise ConfigError(f"{where('daemon', key)}: unknown key daemon.{key} (known: {', '.join(DAEMON_KEYS)})")
        if _type_problem(value, expected):
            raise ConfigError(f"{where('daemon', key)}: daemon.{key} must be {_a(type_name(expected))}")
    profiles_raw = data.get("profiles", {})
    if not isinstance(profiles_raw, dict):
        raise ConfigError(f"{path}: profiles must be tables like [profiles.acme]")
    profiles: dict[str, Profile] = {}
    for name, table in profiles_raw.items():
        section = f"profiles.{name}"
        if not isinstance(table, dict):
            raise ConfigError(f"{where(section)}: [profiles.{name}] must be a table")
        for key, value in table.items():
            expected = PROFILE_KEYS.get(key)
            if expected is None:
                known = ", ".join(sorted(PROFILE_KEYS))
                raise ConfigError(f"{where(section, key)}: unknown key {section}.{key} (known: {known})")
            if _type_problem(value, expected):
                what = "a list of rules" if key in ("allow", "admin") else _a(type_name(expected))
                raise ConfigError(f"{where(section, key)}: {section}.{key} must be {what}")
        kwargs = dict(table)
        for rules in ("allow", "admin"):
            if rules in kwargs:
                kwargs[rules] = tuple(str(rule) for rule in kwargs[rules])
        if "sinks" in kwargs:
            kwargs["sinks"] = parse_sinks(name, kwargs["sinks"], text=text, path=path)
        if "client_id" not in kwargs:
            raise ConfigError(f'{where(section)}: [profiles.{name}] needs client_id (write client_id = "...")')
        try:
            profiles[name] = Profile(name=name, **kwargs)
        except BadValue as exc:
            # the line of the bad value when the file has it, else the table's header
            raise ConfigError(f"{where(section, exc.key if exc.key in table else None)}: {exc}") from None
        except ConfigError as exc:
            raise ConfigError(f"{where(section)}: {exc}") from None
    try:
        settings = DaemonSettings(**daemon)
    except BadValue as exc:
        raise ConfigError(f"{where('daemon', exc.key)}: {exc}") from None
    return Config(profiles=profiles, daemon=settings, path=path)


def _a(what: str) -> str:
    return what if what.startswith(("true", "text", "a ", "an ")) else f"a {what}"


def _sink_line(text: str, profile: str, index: int, key: str) -> int | None:
    """Line of ``key`` in the ``index``-th ``[[profiles.PROFILE.sinks]]`` table (else of its header)."""
    header = re.compile(r"^\s*\[\[\s*profiles\s*\.\s*" + re.escape(profile) + r"\s*\.\s*sinks\s*\]\]")
    lines = text.splitlines()
    seen = -1
    for i, line in enumerate(lines):
        if header.match(line):
            seen += 1
            if seen == index:
                return _key_line(lines, i, key)
    return None


def parse_sinks(profile: str, raw: object, *, text: str = "", path: str = "<config>") -> tuple[Sink, ...]:
    """``[[profiles.NAME.sinks]]`` tables -> Sinks, each knowing the line of its ``path`` (``origin``)."""

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
            if key not in SINK_KEYS:
                raise ConfigError(f"{where(index, key)}: unknown key {what}.{key} (known: {', '.join(SINK_KEYS)})")
            if key != "mode" and (not isinstance(value, str) or not value):
                raise ConfigError(f"{where(index, key)}: {what}.{key} must be text in quotes, not empty")
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
            sink = Sink(
                path=full,
                format=table.get("format", "token"),
                mode=bits,
                group=table.get("group"),
                origin=where(index, "path"),
            )
        except BadValue as exc:
            raise ConfigError(f"{where(index, exc.key)}: {what}: {exc}") from None
        if any(s.path == full for s in sinks):
            raise ConfigError(f"{where(index, 'path')}: {what}.path {full!r} is given twice")
        sinks.append(sink)
    return tuple(sinks)
