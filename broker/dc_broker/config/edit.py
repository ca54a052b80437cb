"""The commands' edits to config.toml: ``dc-broker add``, ``add --force``, ``set``, ``remove``.

Through tomlkit, which reads TOML into a document that remembers its comments, spacing and layout
(multi-line arrays, inline tables, dotted keys, tables in any order) and writes back every byte it
was not asked to change. Only the commands that edit import this module, inside the command: the
daemon, ``--help`` and each TAB never load tomlkit.

Where comments belong (``_outline``): a comment block (the comment lines right above a header, up
to the blank line or other line before them) belongs to the header below it, though tomlkit keeps
it at the end of the table above. So a removed table (``_without_tables``) takes its own comment
block and leaves the next table's, and a key a table did not have (``_after_last_key``) goes right
after its last key/value line, before its trailing comments, blank lines and the next table's
block. Both work on the text's lines as tomlkit classifies them; what they write must say exactly
what tomlkit's own edit says (``_same_data``), or tomlkit's edit is written instead.

A config that is a symbolic link (dotfile managers: stow, chezmoi) is edited at its target: the path
is resolved once (``os.path.realpath``) before the read-modify-write, the target is replaced
atomically and the link stays. Errors name the target and the link.

One writer at a time (``config_lock``): every read-modify-write of the file, and the vault change
that goes with it, runs under an exclusive ``flock`` on the lock file ``.NAME.lock`` beside the
config (beside a link's target), so two commands at once cannot lose each other's change. The lock
file is 0600 and belongs to the editor (or to the owner of its directory, who could replace it
anyway): no other user can open it, so none can hold off root's edit by holding the lock, as anyone
could with a flock on a world-readable directory such as /etc/dc-broker. It stays after the edit
(removing it would race with the next editor). A lock held by another process is waited for, said
once on stderr after ``_NOTICE_AFTER`` seconds (which process holds it, from /proc/locks), and
given up on after ``LOCK_WAIT`` seconds with an error naming the lock file.

A change is checked before it is written: the new profile is built (its values check themselves) and
the new text must load (``dc_broker.config.load``); the file is replaced atomically
(``dc_broker.atomic``), keeping its owner, group and mode.

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
import stat
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final

import tomlkit
from tomlkit.container import Container
from tomlkit.items import AoT, Array, Comment, Table, Whitespace

from dc_broker import atomic
from dc_broker.config.load import parse_text, read_config_text
from dc_broker.config.values import PROFILE_KEYS, SETTABLE_KEYS, BadValue, Config, Profile, Sink
from dc_broker.errors import ConfigError
from dc_token.errors import UnknownProfile

#: this process's held locks: path of the lock file -> (fd, depth); a command that holds the lock
#: may call the edits below, which take it again
_held: dict[str, tuple[int, int]] = {}

#: how long an edit waits for another process's lock before it gives up (seconds)
LOCK_WAIT: Final = 60.0
#: after this long waiting, say once on stderr which process holds the lock
_NOTICE_AFTER: Final = 1.0
#: how often a waiting edit tries the lock again
_POLL: Final = 0.05


def _user(uid: int) -> str:
    try:
        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _who() -> str:
    return _user(os.geteuid())


def _named(path: str, real: str) -> str:
    """The config file as a message names it: a link's target with the link the user gave."""
    return real if real == os.path.abspath(path) else f"{real} (where the link {path} leads)"


def file_error(path: str, exc: OSError, doing: str = "write", real: str | None = None) -> ConfigError:
    """An OSError on the config file as a message that names it (``real``: the target of the link
    ``path``), who we are, and what to do."""
    name = path if real is None else _named(path, real)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return ConfigError(
            f"cannot {doing} the config file {name} as {_who()}: permission denied. It belongs to "
            "someone else (a shared broker's config is root's): edit it as its owner, e.g. "
            "`sudo dc-broker ... --config " + path + "`, or give --config a file of your own"
        )
    if exc.errno == errno.EROFS:
        return ConfigError(f"cannot {doing} the config file {name}: it is on a read-only file system")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ConfigError(f"cannot {doing} the config file {name}: the disk (or quota) is full")
    if isinstance(exc, atomic.UnsafeDirectory):
        return ConfigError(f"cannot {doing} the config file {name}: {exc}")
    return ConfigError(f"cannot {doing} the config file {name}: {exc.strerror or exc}")


def as_written(value: object) -> str:
    """A setting's value as its line in config.toml has it (``allow = ["user:carol"]``), for messages."""
    return tomlkit.item(list(value) if isinstance(value, tuple) else value).as_string()


def lock_path(path: str) -> str:
    """The lock file of the config file at ``path``: ``.NAME.lock`` beside it (beside a link's target)."""
    directory, name = os.path.split(os.path.realpath(path))
    return os.path.join(directory, f".{name}.lock")


@contextlib.contextmanager
def config_lock(path: str, *, wait: float = LOCK_WAIT) -> Iterator[None]:
    """Hold the one-writer lock of the config file at ``path``: an exclusive ``flock`` on its lock file
    (``lock_path``; its directory is made 0700 if missing). Re-entrant within a process; waits up to
    ``wait`` seconds for another process that holds it, then raises ConfigError."""
    lock = lock_path(path)
    held = _held.get(lock)
    if held is not None:
        _held[lock] = (held[0], held[1] + 1)
        try:
            yield
        finally:
            fd, depth = _held[lock]
            _held[lock] = (fd, depth - 1)
        return
    fd = _open_lock(path, lock)
    try:
        _take_lock(fd, path, lock, wait)
        _held[lock] = (fd, 1)
        try:
            yield
        finally:
            del _held[lock]
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _open_lock(path: str, lock: str) -> int:
    """The lock file opened for ``flock``: made 0600 if missing, never through a link, refused if it
    is not a regular file or belongs to someone other than us or its directory's owner."""
    directory, name = os.path.split(lock)
    try:
        dfd = atomic.open_directory(directory, create=True, safe=False)
    except OSError as exc:
        raise file_error(path, exc, "write", os.path.realpath(path)) from None  # its lock is made beside it
    try:
        owner = os.fstat(dfd).st_uid
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(
                f"the config's lock file {lock} is a symbolic link; remove it (`rm {lock}`): the lock must be a "
                "file of its own, which dc-broker makes again"
            ) from None
        raise file_error(path, exc, "write", os.path.realpath(path)) from None  # its lock is made beside it
    finally:
        os.close(dfd)
    try:
        _check_lock(fd, lock, owner)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_lock(fd: int, lock: str, owner: int) -> None:
    """Refuse a lock file that others could open (not a regular file, someone else's); make ours
    0600, and one root made in another user's directory that user's (so that they can edit too)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"the config's lock file {lock} is not a regular file; remove it (dc-broker makes it again)")
    me = os.geteuid()
    if st.st_uid not in (me, owner):
        raise ConfigError(
            f"the config's lock file {lock} belongs to {_user(st.st_uid)}, not to {_who()}: whoever "
            f"can open it can hold off every edit of the config; remove it (`rm {lock}`) and run this again"
        )
    if me == 0 and st.st_uid == 0 and owner != 0:
        os.fchown(fd, owner, -1)
    if stat.S_IMODE(st.st_mode) != 0o600:
        os.fchmod(fd, 0o600)


def _take_lock(fd: int, path: str, lock: str, wait: float) -> None:
    """``flock`` ``fd``, trying again every ``_POLL`` seconds while another process holds it: said
    once on stderr after ``_NOTICE_AFTER`` seconds, a ConfigError after ``wait``."""
    start = time.monotonic()
    told = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        waited = time.monotonic() - start
        if waited >= wait:
            raise ConfigError(
                f"gave up after {wait:g} s waiting for the lock of the config file {path}: {lock} is held by "
                f"{_holder(fd)}; let it finish (or stop it) and run this command again"
            )
        if not told and waited >= _NOTICE_AFTER:
            sys.stderr.write(
                f"Waiting for {_holder(fd)}, which holds {lock} (the lock of the config file {path}); "
                f"giving up after {wait:g} s\n"
            )
            sys.stderr.flush()
            told = True
        time.sleep(_POLL)


def _holder(fd: int) -> str:
    """Which process holds the ``flock`` on ``fd``'s file, from /proc/locks (best effort: "another
    process" when it cannot tell), with its command line made printable, at most 100 characters."""
    st = os.fstat(fd)
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            pid = next(fields[4] for fields in map(str.split, f) if fields[1:2] == ["FLOCK"] and fields[5:6] == [where])
    except (OSError, StopIteration):
        return "another process"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read().rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return f"process {pid}"
    shown = "".join(c if c.isprintable() else "?" for c in command)[:100]
    return f"process {pid} ({shown})" if shown else f"process {pid}"


def edit_text(path: str, change: Callable[[str, Config], str]) -> None:
    """Read the file, let ``change`` make its new text, check that it loads, write it; all under
    ``config_lock``. ``change`` gets the text ("" when there is no file) and the file as loaded. A
    link is edited at its target (resolved once, first). A CRLF file stays CRLF."""
    real = os.path.realpath(path)
    with config_lock(path):
        text = read_config_text(real)
        config = parse_text(text or "", path)
        new = change(text or "", config)
        if text is not None and "\r\n" in text and "\n" not in text.replace("\r\n", ""):
            new = re.sub(r"(?<!\r)\n", "\r\n", new)  # tomlkit writes "\n" where it adds a line
        if new != text:
            parse_text(new, path)  # never write a config that does not load
            write_text(path, new)


def write_text(path: str, text: str) -> None:
    """Replace the config file with ``text`` (atomic; an existing file keeps its owner, group and
    mode; a new one is 0600 in a 0700 directory). A link's target is replaced; the link stays."""
    real = os.path.realpath(path)
    try:
        atomic.write(real, text.encode("utf-8"), create_dirs=True)
    except OSError as exc:
        raise file_error(path, exc, real=real) from None


# ---------------------------------------------------------------- where comments belong

#: markers that ``_outline`` puts in a copy of the text: a header (with its table's number), a comment
#: line, the end of a key/value (with its table's number); NUL is never in a TOML document
_MARK: Final = re.compile("\x00([hce])([0-9]*)\x00")


@dataclasses.dataclass(frozen=True)
class _Line:
    """One line of a config file (its line ending kept), as tomlkit parsed it."""

    text: str
    head: tuple[str, ...] | None = None  # a table's header: the table's path
    comment: bool = False  # a line that is a comment and nothing else
    ends: tuple[str, ...] | None = None  # the last line of a key/value of the table at this path


def _split(text: str) -> list[str]:
    """The lines of ``text``, each with its line ending (only "\n" ends a line in TOML)."""
    return re.findall(r"[^\n]*\n|[^\n]+$", text)


def _outline(text: str) -> list[_Line] | None:
    """``text``'s lines, each marked as what tomlkit parsed it to be: headers (with their table),
    comment lines, the last lines of key/values (with their table). None when the marks do not add up
    (tomlkit rendered something unexpected): the callers then leave the edit to tomlkit."""
    doc = tomlkit.parse(text)
    paths: list[tuple[str, ...]] = []

    def mark(kind: str, path: tuple[str, ...]) -> str:
        paths.append(path)
        return f"\x00{kind}{len(paths) - 1}\x00"

    def walk(container: Container, path: tuple[str, ...]) -> None:
        for key, item in container.body:
            if isinstance(item, Comment):
                item.trivia.indent = "\x00c\x00" + item.trivia.indent
            elif key is None or isinstance(item, Whitespace):
                continue
            elif isinstance(item, Table | AoT):
                inner = (*path, key.key)
                for table in item.body if isinstance(item, AoT) else [item]:
                    if isinstance(item, AoT) or not (table.is_super_table() or key.is_dotted()):
                        table.trivia.indent = mark("h", inner) + table.trivia.indent
                    walk(table.value, inner)
            else:
                item.trivia.trail = mark("e", path) + item.trivia.trail

    walk(doc, ())
    lines = []
    for raw in _split(doc.as_string()):
        found = {(m.group(1), m.start()): paths[int(m.group(2))] if m.group(2) else () for m in _MARK.finditer(raw)}
        line = _Line(
            _MARK.sub("", raw),
            head=found.get(("h", 0)),
            comment=("c", 0) in found,
            ends=next((p for (kind, _), p in found.items() if kind == "e"), None),
        )
        if len(found) != (line.head is not None) + line.comment + (line.ends is not None):
            return None  # a header or comment mark that is not at the start of its line
        if (line.head and not line.text.lstrip().startswith("[")) or (
            line.comment and not line.text.lstrip().startswith("#")
        ):
            return None
        lines.append(line)
    return lines if "".join(line.text for line in lines) == text else None


def _block_start(lines: list[_Line], header: int) -> int:
    """The first line of the comment block right above the header at ``header`` (itself if none)."""
    while header > 0 and lines[header - 1].comment:
        header -= 1
    return header


def _without_tables(text: str, doomed: Callable[[tuple[str, ...]], bool]) -> str | None:
    """``text`` without the tables whose path is ``doomed``: each from its own comment block to the
    next header's comment block (or the end of the file, and then the blank lines before it too).
    None when no doomed table has a header (dotted keys, an inline table): tomlkit removes those."""
    lines = _outline(text)
    if lines is None:
        return None
    heads = [i for i, line in enumerate(lines) if line.head is not None]
    gone = [False] * len(lines)
    for n, i in enumerate(heads):
        if doomed(lines[i].head or ()):
            start, end = _block_start(lines, i), _block_start(lines, heads[n + 1]) if n + 1 < len(heads) else len(lines)
            gone[start:end] = [True] * (end - start)
    if not any(gone):
        return None
    if gone[-1]:  # the file's end went: so do the blank lines that separated it
        i = len(gone) - 1
        while i >= 0 and gone[i]:
            i -= 1
        while i >= 0 and not lines[i].text.strip():
            gone[i] = True
            i -= 1
    return "".join(line.text for line, g in zip(lines, gone, strict=True) if not g)


def _after_last_key(text: str, table: tuple[str, ...], piece: str) -> str | None:
    """``text`` with ``piece`` (lines of TOML) right after the last key/value line of ``table`` (after
    its header if it has none). None when the table has no header: tomlkit adds to those."""
    lines = _outline(text)
    if lines is None or not any(line.head == table for line in lines):
        return None
    last = max(i for i, line in enumerate(lines) if line.head == table or line.ends == table)
    before, after = "".join(line.text for line in lines[: last + 1]), "".join(line.text for line in lines[last + 1 :])
    if not before.endswith("\n"):  # the file's last line: it gets the line ending, the piece does not
        before, piece = before + ("\r\n" if "\r\n" in text else "\n"), piece.removesuffix("\n")
    return before + piece + after


def _same_data(mine: str | None, tomlkits: str) -> bool:
    """Whether ``mine`` says exactly what ``tomlkits`` says (an empty ``profiles`` table is none)."""
    if mine is None:
        return False
    try:
        data = [tomllib.loads(mine), tomllib.loads(tomlkits)]
    except tomllib.TOMLDecodeError:
        return False
    for d in data:
        if d.get("profiles") == {}:
            del d["profiles"]
    return data[0] == data[1]


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


def _known(config: Config, name: str, path: str) -> Profile:
    if name not in config.profiles:
        raise UnknownProfile(f"no profile named {name!r} in {path}; `dc-broker list` shows the profiles")
    return config.profiles[name]


def _apply(table: Any, old: Profile, new: Profile, *, later: dict[str, Any] | None = None) -> None:
    """Change ``table`` (old's) so that it says ``new``: only the keys whose value differs. With
    ``later``, a key the table does not have, and the token files (``sinks``, tables of their own),
    are put there instead (None: the sinks go), for ``_profile_text`` to place."""
    for key in PROFILE_KEYS:
        if getattr(old, key) == getattr(new, key):
            continue
        value = _wanted(new, key)
        if later is not None and (key == "sinks" or (value is not None and key not in table)):
            later[key] = value
        elif value is None:
            if key in table:
                del table[key]
        elif key == "sinks":
            table[key] = _sinks_aot(value)
        else:
            table[key] = _item(value, like=table.get(key))


def _piece(name: str, key: str, value: Any) -> str:
    """The lines of TOML that give profile ``name``'s table a key it did not have (under its header)."""
    piece = tomlkit.document()
    if key != "sinks":
        piece[key] = _item(value)
        return piece.as_string()
    piece["profiles"] = tomlkit.table(is_super_table=True)
    piece["profiles"][name] = tomlkit.table(is_super_table=True)
    piece["profiles"][name]["sinks"] = _sinks_aot(value)
    return "\n" + piece.as_string()


def _profile_text(text: str, old: Profile, new: Profile) -> str:
    """``text`` with profile ``old`` made to say ``new``. tomlkit changes the keys it has in place;
    a new key goes after the table's last key/value line and token files are tables replaced whole,
    each table with its own comment block (``_without_tables``, ``_after_last_key``). If that does not
    say what tomlkit's whole edit says (a profile of dotted keys, an inline table), tomlkit's edit."""
    theirs = tomlkit.parse(text)
    _apply(theirs["profiles"][old.name], old, new)
    doc = tomlkit.parse(text)
    later: dict[str, Any] = {}
    _apply(doc["profiles"][old.name], old, new, later=later)
    mine: str | None = doc.as_string()
    table = ("profiles", old.name)
    if "sinks" in later and old.sinks and mine is not None:
        mine = _without_tables(mine, lambda path: path[:3] == (*table, "sinks"))
    pieces = [
        _piece(old.name, k, v) for k, v in sorted(later.items(), key=lambda kv: kv[0] == "sinks") if v is not None
    ]
    if pieces and mine is not None:
        mine = _after_last_key(mine, table, "".join(pieces))
    return mine if mine is not None and _same_data(mine, theirs.as_string()) else theirs.as_string()


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

    def change(text: str, config: Config) -> str:
        return _profile_text(text, _known(config, p.name, path), p)

    edit_text(path, change)


def with_values(old: Profile, changes: Mapping[str, Any], path: str) -> Profile:
    """``old`` with ``changes`` (None: the key's default), checked; nothing is written."""
    values = {k: (_default(k) if v is None else v) for k, v in changes.items()}
    try:
        return dataclasses.replace(old, **values)
    except BadValue as exc:
        raise ConfigError(f"{exc}; {path} is unchanged") from None


def set_profile_values(path: str, name: str, changes: Mapping[str, Any]) -> Profile:
    """Change (or, with None, unset) keys of one profile in place: other lines, comments and tables
    stay as they are. The new profile is checked before anything is written."""
    box: list[Profile] = []

    def change(text: str, config: Config) -> str:
        old = _known(config, name, path)
        updated = with_values(old, changes, path)
        box.append(updated)
        return _profile_text(text, old, updated)

    edit_text(path, change)
    return box[0]


def remove_profile(path: str, name: str) -> None:
    """Remove ``[profiles.NAME]`` and its sub-tables (``[[profiles.NAME.sinks]]``), each with the
    comment block above its header (``_without_tables``), keeping the rest: the next table's comment
    block too. A profile of dotted keys or an inline table: tomlkit removes its keys."""

    def change(text: str, config: Config) -> str:
        _known(config, name, path)
        doc = tomlkit.parse(text)
        del doc["profiles"][name]
        mine = _without_tables(text, lambda table: table[:2] == ("profiles", name))
        return mine if mine is not None and _same_data(mine, doc.as_string()) else doc.as_string()

    edit_text(path, change)


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
