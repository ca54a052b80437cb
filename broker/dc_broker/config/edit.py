"""The commands' edits to config.toml: ``dc-broker add``, ``add --force``, ``set``, ``remove``.

Through tomlkit, which reads TOML into a document that remembers its comments, spacing and layout
(multi-line arrays, inline tables, dotted keys, tables in any order) and writes back every byte it
was not asked to change. Only the commands that edit import this module, inside the command: the
daemon, ``--help`` and each TAB never load tomlkit.

One writer at a time (``config_lock``): every read-modify-write of the file, and the vault change
that goes with it, runs under an exclusive ``flock`` on the config's directory, so two commands at
once cannot lose each other's change. A change is checked before it is written: the new profile is
built (its values check themselves) and the new text must load (``dc_broker.config.load``); the file
is replaced atomically (``dc_broker.atomic``), keeping its owner, group and mode.

Must never: write a file that does not load, print a value's secret (config.toml holds none), or
hold the lock while a person types.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
import pwd
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final, TypeVar

import tomlkit
from tomlkit.items import AoT, Array, Table
from tomlkit.toml_document import TOMLDocument

from dc_broker import atomic
from dc_broker.config.load import parse_text, read_config_text
from dc_broker.config.values import PROFILE_KEYS, SETTABLE_KEYS, BadValue, Config, Profile, Sink
from dc_broker.errors import ConfigError
from dc_token.errors import UnknownProfile

_T = TypeVar("_T")

#: this process's held locks: path of the config's directory -> (fd, depth); a command that holds
#: the lock may call the edits below, which take it again
_held: dict[str, tuple[int, int]] = {}


def _who() -> str:
    uid = os.geteuid()
    try:
        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def file_error(path: str, exc: OSError, doing: str = "write") -> ConfigError:
    """An OSError on the config file as a message that names it, who we are, and what to do."""
    if exc.errno in (errno.EACCES, errno.EPERM):
        return ConfigError(
            f"cannot {doing} the config file {path} as {_who()}: permission denied. It belongs to "
            "someone else (a shared broker's config is root's): edit it as its owner, e.g. "
            "`sudo dc-broker ... --config " + path + "`, or give --config a file of your own"
        )
    if exc.errno == errno.EROFS:
        return ConfigError(f"cannot {doing} the config file {path}: it is on a read-only file system")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ConfigError(f"cannot {doing} the config file {path}: the disk (or quota) is full")
    if isinstance(exc, atomic.UnsafeDirectory):
        return ConfigError(f"cannot {doing} the config file {path}: {exc}")
    return ConfigError(f"cannot {doing} the config file {path}: {exc.strerror or exc}")


@contextlib.contextmanager
def config_lock(path: str) -> Iterator[None]:
    """Hold the one-writer lock of the config file at ``path`` (an exclusive ``flock`` on its
    directory, made 0700 if missing: the file itself is replaced by every write, its directory
    stays). Re-entrant within a process; waits for another process that holds it."""
    directory = os.path.dirname(os.path.abspath(path))
    held = _held.get(directory)
    if held is not None:
        _held[directory] = (held[0], held[1] + 1)
        try:
            yield
        finally:
            fd, depth = _held[directory]
            _held[directory] = (fd, depth - 1)
        return
    try:
        if not os.path.isdir(directory):
            os.close(atomic.open_directory(directory, create=True, safe=False))
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise file_error(path, exc, "lock") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _held[directory] = (fd, 1)
        try:
            yield
        finally:
            del _held[directory]
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def edit(path: str, change: Callable[[TOMLDocument, Config], _T]) -> _T:
    """Read the file (an empty document if there is none), let ``change`` edit the document (it also
    gets the file as loaded), check that the result loads, write it. All under ``config_lock``."""
    box: list[_T] = []

    def on_text(text: str, config: Config) -> str:
        doc = tomlkit.parse(text)
        box.append(change(doc, config))
        return doc.as_string()

    edit_text(path, on_text)
    return box[0]


def edit_text(path: str, change: Callable[[str, Config], str]) -> None:
    """``edit`` on the file's text: ``change`` gets the text ("" when there is no file) and the file
    as loaded, and returns the new text. A CRLF file stays CRLF."""
    with config_lock(path):
        text = read_config_text(path)
        config = parse_text(text or "", path)
        new = change(text or "", config)
        if text is not None and "\r\n" in text and "\n" not in text.replace("\r\n", ""):
            new = re.sub(r"(?<!\r)\n", "\r\n", new)  # tomlkit writes "\n" where it adds a line
        if new != text:
            parse_text(new, path)  # never write a config that does not load
            write_text(path, new)


def write_text(path: str, text: str) -> None:
    """Replace the config file with ``text`` (atomic; an existing file keeps its owner, group and
    mode; a new one is 0600 in a 0700 directory)."""
    try:
        atomic.write(path, text.encode("utf-8"), create_dirs=True)
    except OSError as exc:
        raise file_error(path, exc) from None


# ---------------------------------------------------------------- a profile as TOML


def _default(key: str) -> Any:
    return next(f.default for f in dataclasses.fields(Profile) if f.name == key)


def _wanted(p: Profile, key: str) -> Any:
    """The value a file should hold for ``key`` (None: leave it out, the default applies)."""
    value = getattr(p, key)
    if value is None or value == () or (key != "client_id" and value == _default(key)):
        return None
    return value


def _sinks_aot(sinks: tuple[Sink, ...]) -> AoT:
    aot = tomlkit.aot()
    for sink in sinks:
        table = tomlkit.table()
        table["path"] = sink.path
        table["format"] = sink.format
        table["mode"] = f"{sink.mode:04o}"
        if sink.group:
            table["group"] = sink.group
        aot.append(table)
    return aot


def _item(value: Any, like: Any = None) -> Any:
    """``value`` as a TOML item; a list keeps the multi-line layout of the array it replaces."""
    if isinstance(value, tuple):
        array = tomlkit.array()
        array.extend(value)
        if isinstance(like, Array) and "\n" in like.as_string():
            array.multiline(True)
        return array
    return value


def profile_table(p: Profile) -> Table:
    """The ``[profiles.NAME]`` table for a profile: every key that is set and not its default."""
    table = tomlkit.table()
    for key in PROFILE_KEYS:
        value = _wanted(p, key)
        if value is None:
            continue
        table[key] = _sinks_aot(value) if key == "sinks" else _item(value)
    return table


def _existing(doc: TOMLDocument, config: Config, name: str, path: str) -> Any:
    if name not in config.profiles:
        raise UnknownProfile(f"no profile named {name!r} in {path}; `dc-broker list` shows the profiles")
    return doc["profiles"][name]


def _apply(table: Any, old: Profile, new: Profile) -> None:
    """Change ``table`` (old's) so that it says ``new``: only the keys whose value differs."""
    for key in PROFILE_KEYS:
        if getattr(old, key) == getattr(new, key):
            continue
        value = _wanted(new, key)
        if value is None:
            if key in table:
                del table[key]
        elif key == "sinks":
            table[key] = _sinks_aot(value)
        else:
            table[key] = _item(value, like=table.get(key))


# ---------------------------------------------------------------- the edits


def add_profile(path: str, p: Profile) -> None:
    """Add a profile's table at the end of the file (made 0600 in a 0700 directory if missing), after
    a blank line; every byte before it stays. Refuses a name that exists."""

    def change(text: str, config: Config) -> str:
        if p.name in config.profiles:
            raise ConfigError(
                f"profile {p.name!r} already exists in {path}; replace it with `dc-broker add --force {p.name} ...`, "
                f"change it with `dc-broker set {p.name} KEY=VALUE`, or remove it with `dc-broker remove {p.name}`"
            )
        piece = tomlkit.document()
        piece["profiles"] = tomlkit.table(is_super_table=True)
        piece["profiles"][p.name] = profile_table(p)
        if text and not text.endswith("\n"):
            text += "\n"
        return text + ("\n" if text else "") + piece.as_string()

    edit_text(path, change)


def replace_profile(path: str, p: Profile) -> None:
    """``dc-broker add --force``: the profile's keys made to say ``p``; lines of keys that keep
    their value (and their comments) stay as they are."""

    def change(doc: TOMLDocument, config: Config) -> None:
        _apply(_existing(doc, config, p.name, path), config.profiles[p.name], p)

    edit(path, change)


def set_profile_values(path: str, name: str, changes: Mapping[str, Any]) -> Profile:
    """Change (or, with None, unset) keys of one profile in place: other lines, comments and tables
    stay as they are. The new profile is checked before anything is written."""

    def change(doc: TOMLDocument, config: Config) -> Profile:
        table = _existing(doc, config, name, path)
        old = config.profiles[name]
        values = {k: (_default(k) if v is None else v) for k, v in changes.items()}
        try:
            updated = dataclasses.replace(old, **values)
        except BadValue as exc:
            raise ConfigError(f"{exc}; {path} is unchanged") from None
        _apply(table, old, updated)
        return updated

    return edit(path, change)


def remove_profile(path: str, name: str) -> None:
    """Remove ``[profiles.NAME]`` and its sub-tables (``[[profiles.NAME.sinks]]``), keeping the rest."""

    def change(doc: TOMLDocument, config: Config) -> None:
        _existing(doc, config, name, path)
        del doc["profiles"][name]

    edit(path, change)


def profile_from_text(text: str | None, name: str, path: str) -> Profile | None:
    """The profile ``name`` in a config file's text (None: no such profile, or no file)."""
    return None if text is None else parse_text(text, path).profiles.get(name)


# ---------------------------------------------------------------- `dc-broker set`'s KEY=VALUE


def _cli_bool(key: str, text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0"):
        return False
    raise BadValue(key, f"{key} must be true or false, not {text!r}")


#: how a value typed on the command line becomes a profile value, by the key's TOML type
_CLI_VALUES: Final[dict[object, Callable[[str, str], Any]]] = {
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
    if key == "sinks":
        raise ConfigError(
            "sinks are [[profiles.NAME.sinks]] tables, not one value: give them with "
            "`dc-broker add --force NAME ... --sink PATH[:FORMAT]`, or edit config.toml"
        )
    if key not in SETTABLE_KEYS:
        raise ConfigError(f"unknown profile key {key!r}; keys: {', '.join(sorted(SETTABLE_KEYS))}")
    if value == "":
        if key == "client_id":
            raise ConfigError("client_id cannot be unset")
        return key, None
    return key, _CLI_VALUES[PROFILE_KEYS[key]](key, value)
