"""`dc-broker set`, `add --force` and `remove` edit config.toml the way a person wrote it: over a corpus
of config files (multi-line arrays with comments, inline tables, dotted keys, tables out of order,
odd spacing, CRLF without a final newline, a comment block above every header, every key), each
edit changes only the lines of what it changes and keeps every other byte; what it cannot do (a
value with a newline or a control character, a profile that would not load) is refused with a
message, and the file stays as it was.

The checker is independent of the editor: it compares the bytes before and after with difflib and
allows a changed line only where it assigns the edited key in the edited profile's table (or is the
rest of that key's multi-line array, or the one line of an inline table that holds it); a key that
was not there goes right after the table's last key/value line. A removed profile takes its table,
its sub-tables and the comment block right above each header (the comment lines up to the blank
line before them: a header's own), and blank lines next to them; never another table's comment
block. It checks with tomllib that the file now says exactly the old settings with the one change.
The edits to the config through a symbolic link and the one-writer lock are tested at the end."""

from __future__ import annotations

import dataclasses
import difflib
import fcntl
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from dc_broker.config import SETTABLE_KEYS, Profile
from dc_broker.config.edit import (
    add_profile,
    config_lock,
    parse_assignment,
    remove_profile,
    replace_profile,
    set_profile_values,
    write_text,
)
from dc_broker.config.load import load_config, parse_text
from dc_broker.errors import ConfigError
from tests.e2e import DC_BROKER

CORPUS = sorted((Path(__file__).parent / "config_corpus").glob("*.toml"))

#: a valid new value for each key (the checker picks the first that the profile accepts)
NEW_VALUES: dict[str, list[str]] = {
    "server": ["https://new.example.com"],
    "tenant": ["t2"],
    "issuer": ["https://new.example.com/realms/x"],
    "token_url": ["https://new.example.com/token"],
    "username": ["carol"],
    "auth_method": ["basic", "post", "none", "private_key_jwt", "client_secret_jwt"],
    "assertion_audience": ["issuer", "token_endpoint", "https://sso.example.com/realms/x"],
    # refused where auth_method is not theirs: the matrix sees both outcomes
    "client_cert": ["/etc/dc-broker/client.pem"],
    "client_key": ["/etc/dc-broker/client.key"],
    "assertion_file": ["/var/run/secrets/tokens/dc-broker"],
    "assertion_type": ["jwt-spiffe"],
    "scope": ["openid offline_access"],
    "ca_bundle": ["/etc/ssl/certs/new.pem"],
    "proxy": ["direct", "http://proxy.example:8080"],
    "client_id": ["new-client"],
    "grant": ["device", "password", "client_credentials"],
    "legacy_paths": ["true", "false"],
    "allow": ["user:carol,group:staff", "uid:1001"],
    "admin": ["user:carol", "gid:0"],
}


def _bytes(path: Path) -> bytes:
    return path.read_bytes()


_ASSIGNS = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*=")
_HEADER = re.compile(r"^\s*\[\[?\s*([^\[\]]+?)\s*\]\]?\s*(#.*)?$")


def _lines(text: str) -> list[str]:
    return text.splitlines(keepends=True)


def _header(line: str) -> tuple[str, ...] | None:
    """The path of the table a header line opens (None: not a header)."""
    m = _HEADER.match(line)
    return None if m is None else tuple(part.strip().strip("\"'") for part in m.group(1).split("."))


def _is_comment(line: str) -> bool:
    return line.lstrip().startswith("#")


def _block_start(lines: list[str], header: int) -> int:
    """Where the comment block right above a header starts: the comment lines up to a blank line or
    any other line (the header itself if there is none)."""
    while header > 0 and _is_comment(lines[header - 1]):
        header -= 1
    return header


def _tables(lines: list[str]) -> list[tuple[tuple[str, ...], int, int, int]]:
    """Each header's table: (path, its comment block's first line, the header line, the end: the next
    header's comment block or the end of the file)."""
    heads = [(i, path) for i, line in enumerate(lines) if (path := _header(line)) is not None]
    return [
        (path, _block_start(lines, i), i, _block_start(lines, heads[n + 1][0]) if n + 1 < len(heads) else len(lines))
        for n, (i, path) in enumerate(heads)
    ]


def _scope(lines: list[str]) -> list[tuple[str, ...]]:
    """The table each line is in (the last header above it; () before the first)."""
    out: list[tuple[str, ...]] = []
    current: tuple[str, ...] = ()
    for line in lines:
        current = _header(line) or current
        out.append(current)
    return out


def _key_lines(lines: list[str], profile: str, keys: set[str]) -> set[int]:
    """The lines that assign one of ``keys`` in ``profile``'s table (``key =`` under its header, a
    dotted ``profiles.NAME.key =``, the one line of its inline table), with the rest of a multi-line
    array they open."""
    out: set[int] = set()
    scopes = _scope(lines)
    i = 0
    while i < len(lines):
        m = _ASSIGNS.match(lines[i])
        if m is not None:
            full = (*scopes[i], *m.group(1).split("."))
            if (full[:2] == ("profiles", profile) and len(full) == 3 and full[2] in keys) or (
                full == ("profiles", profile) and "{" in lines[i]
            ):
                out.add(i)
                depth = lines[i].split("#")[0].count("[") - lines[i].split("#")[0].count("]")
                while depth > 0 and i + 1 < len(lines):  # a multi-line array: to its closing bracket
                    i += 1
                    out.add(i)
                    if lines[i].lstrip().startswith("]"):
                        depth = 0
        i += 1
    return out


def _last_key_line(lines: list[str], profile: str) -> int | None:
    """The last key/value line of ``[profiles.NAME]`` (the closing bracket of a multi-line array): its
    last line that is neither blank nor a comment (None: the profile has no such header)."""
    for path, _block, header, end in _tables(lines):
        if path == ("profiles", profile):
            body = [i for i in range(header + 1, end) if lines[i].strip() and not _is_comment(lines[i])]
            return body[-1] if body else header
    return None


def _only_touches(old: str, new: str, profile: str, keys: set[str]) -> None:
    """Every changed line assigns one of ``keys`` in the profile's table (or continues such a
    multi-line array, or is the profile's inline table): no other line, comment or blank line
    changes. A key that was not there is added right after the table's last key/value line, before
    the comments and blank lines that follow it (the next table's comment block among them)."""
    eol = "\r\n" if "\r\n" in old else "\n"  # a key added after the last line gives that line its line ending
    old, new = (t if t.endswith("\n") else t + eol for t in (old, new))
    a, b = _lines(old), _lines(new)
    mine_before, mine_after, last = (
        _key_lines(a, profile, keys),
        _key_lines(b, profile, keys),
        _last_key_line(a, profile),
    )
    ops = difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes()
    for tag, i1, i2, j1, j2 in ops:
        if tag == "equal":
            continue
        assert set(range(i1, i2)) <= mine_before, ("changed a line it did not own", a[i1:i2], b[j1:j2])
        assert set(range(j1, j2)) <= mine_after, ("wrote a line it did not own", a[i1:i2], b[j1:j2])
        if tag == "insert" and last is not None:
            assert i1 == last + 1, ("a new key goes right after the table's last key/value line", a[i1 - 1], b[j1:j2])


def _owned_by(lines: list[str], profile: str) -> set[int]:
    """The lines a removed profile takes: each of its tables (``[profiles.NAME]``, its sub-tables)
    from its own comment block to the next header's comment block; a profile without a header (dotted
    keys, an inline table) its assignments."""
    out: set[int] = set()
    for path, block, _header_line, end in _tables(lines):
        if path[:2] == ("profiles", profile):
            out.update(range(block, end))
    scopes = _scope(lines)
    for i, line in enumerate(lines):
        m = _ASSIGNS.match(line)
        if m is not None and (*scopes[i], *m.group(1).split("."))[:2] == ("profiles", profile):
            out.add(i)
    return out


def _check_removed(old: str, new: str, profile: str) -> None:
    """``new`` is ``old`` without the profile's own lines (``_owned_by``), every other line kept
    byte for byte, except blank lines next to them, which may go with them."""
    a, b = _lines(old), _lines(new)
    owned = _owned_by(a, profile)
    kept = [line for i, line in enumerate(a) if i not in owned]
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=kept, b=b, autojunk=False).get_opcodes():
        if tag != "equal":
            assert tag == "delete" and not "".join(kept[i1:i2]).strip(), (
                "only the profile's own lines (and blank lines beside them) may go",
                kept[i1:i2],
                b[j1:j2],
            )


def _value(key: str, text: str) -> Any:
    return parse_assignment(f"{key}={text}")[1]


def _settings(p: Profile) -> dict[str, Any]:
    return {f.name: getattr(p, f.name) for f in dataclasses.fields(p)}


@pytest.mark.parametrize("source", CORPUS, ids=[p.stem for p in CORPUS])
def test_set_changes_only_the_key_it_sets_in_every_file_of_the_corpus(source: Path, tmp_path: Path) -> None:
    original = load_config(str(source))
    edits = refused = 0
    for name, p in original.profiles.items():
        for key in SETTABLE_KEYS:
            for text in [*NEW_VALUES[key], ""]:
                cfg = tmp_path / "config.toml"
                shutil.copyfile(source, cfg)
                before = _bytes(cfg)
                try:
                    value = None if text == "" else _value(key, text)
                    if value == getattr(p, key) or (value is None and key == "client_id"):
                        continue
                    updated = set_profile_values(str(cfg), name, {key: value})
                except ConfigError:
                    refused += 1
                    assert _bytes(cfg) == before, f"{key}={text!r} was refused but the file changed"
                    continue
                edits += 1
                after = _bytes(cfg)
                _only_touches(before.decode(), after.decode(), name, {key})
                now = load_config(str(cfg))
                assert now.profiles[name] == updated
                expected = {**_settings(p), key: value if value is not None else _default(key)}
                assert _settings(now.profiles[name]) == expected
                assert {n: q for n, q in now.profiles.items() if n != name} == {
                    n: q for n, q in original.profiles.items() if n != name
                }
                assert now.daemon == original.daemon
    assert edits > 10 * len(original.profiles) and refused > 0  # the matrix did exercise both


def _default(key: str) -> Any:
    return next(f.default for f in dataclasses.fields(Profile) if f.name == key)


@pytest.mark.parametrize("source", CORPUS, ids=[p.stem for p in CORPUS])
def test_add_force_rewrites_only_what_changed_and_remove_takes_only_the_profile(source: Path, tmp_path: Path) -> None:
    original = load_config(str(source))
    for name, p in original.profiles.items():
        cfg = tmp_path / "config.toml"
        shutil.copyfile(source, cfg)
        before = _bytes(cfg).decode()
        same = dataclasses.replace(p)
        replace_profile(str(cfg), same)
        assert _bytes(cfg).decode() == before  # the same settings again: not a byte changes
        changed = dataclasses.replace(p, client_id="other-client", scope="openid roles", allow=("user:dave",))
        replace_profile(str(cfg), changed)
        _only_touches(before, _bytes(cfg).decode(), name, {"client_id", "scope", "allow"})
        assert load_config(str(cfg)).profiles[name] == changed

        shutil.copyfile(source, cfg)
        remove_profile(str(cfg), name)
        after = _bytes(cfg).decode()
        now = load_config(str(cfg))
        assert name not in now.profiles
        assert now.profiles == {n: q for n, q in original.profiles.items() if n != name}
        assert now.daemon == original.daemon
        _check_removed(before, after, name)
        # a new profile goes at the end; the text before it stays as it was
        new = Profile(name="zz-new", client_id="x", grant="client_credentials", token_url="https://z.example/token")
        shutil.copyfile(source, cfg)
        add_profile(str(cfg), new)
        text = _bytes(cfg).decode()
        assert text.startswith(before.rstrip("\r\n")), "add changed what was there"
        assert load_config(str(cfg)).profiles["zz-new"] == new


@pytest.mark.parametrize(
    ("assignment", "problem"),
    [
        ("scope=openid\nemail", "scope 'openid\\nemail' contains a newline"),
        ("username=al\x07ice", "username 'al\\x07ice' contains U+0007"),
        ("tenant=a\rb", "tenant 'a\\rb' contains a carriage return"),
        ("allow=user:al\x1bice", "allow 'user:al\\x1bice' contains U+001B"),
        ("scope=a\u2028b", "scope 'a\\u2028b' contains U+2028"),
    ],
)
def test_a_value_with_a_newline_or_control_character_is_refused_and_nothing_changes(
    tmp_path: Path, assignment: str, problem: str
) -> None:
    cfg = tmp_path / "config.toml"
    shutil.copyfile(CORPUS[0].parent / "everything.toml", cfg)
    before = _bytes(cfg)
    done = subprocess.run([DC_BROKER, "set", "--config", str(cfg), "--socket", str(tmp_path / "none"), "acme", assignment],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"Error: profile 'acme': {problem}; a setting is one line of text; {cfg} is unchanged\n"
    assert _bytes(cfg) == before


def test_set_on_a_multi_line_allow_keeps_its_layout(tmp_path: Path) -> None:
    """What a newcomer met: `set acme allow=user:carol` on a multi-line array died with a traceback."""
    cfg = tmp_path / "config.toml"
    shutil.copyfile(CORPUS[0].parent / "everything.toml", cfg)
    done = subprocess.run([DC_BROKER, "set", "--config", str(cfg), "--socket", str(tmp_path / "none"), "acme",
                           "allow=user:carol,group:staff"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == 'Updated profile acme: allow = ["user:carol", "group:staff"].\n'
    text = cfg.read_text()
    assert '\nallow = [\n    "user:carol",\n    "group:staff",\n]\nadmin = ["user:root"]\n' in text
    assert load_config(str(cfg)).profiles["acme"].allow == ("user:carol", "group:staff")


def test_the_tables_of_keys_come_from_the_fields() -> None:
    from dc_broker.config import DAEMON_KEYS, PROFILE_KEYS, SINK_KEYS, DaemonSettings, Sink

    assert list(PROFILE_KEYS) == [f.name for f in dataclasses.fields(Profile) if f.name != "name"]
    assert PROFILE_KEYS["legacy_paths"] is bool and PROFILE_KEYS["allow"] is list and PROFILE_KEYS["scope"] is str
    assert list(DAEMON_KEYS) == [f.name for f in dataclasses.fields(DaemonSettings)]
    assert DAEMON_KEYS["idle_timeout"] == (int, float) and DAEMON_KEYS["max_frame"] is int
    assert SINK_KEYS == ("path", "format", "mode", "group")  # origin is where it was read, not a key
    assert "origin" not in [f.name for f in dataclasses.fields(Sink) if f.compare]


def test_a_file_that_does_not_load_is_never_written(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        '[profiles.acme]\nclient_id = "x"\ngrant = "client_credentials"\ntoken_url = "https://x.example/t"\n'
    )
    with pytest.raises(ConfigError, match="client_credentials needs the client to authenticate"):
        set_profile_values(str(cfg), "acme", {"auth_method": "none"})
    with pytest.raises(ConfigError, match=r"grant 'password' needs a username"):
        set_profile_values(str(cfg), "acme", {"grant": "password"})
    assert parse_text(cfg.read_text()).profiles["acme"].grant == "client_credentials"
    # no temporary file left; the lock file stays (removing it would race with the next editor)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".config.toml.lock", "config.toml"]


# ---------------------------------------------------------------- comment blocks belong to the header below


TEAM = """\
# acme: the team's login -- owner: alice
[profiles.acme]
server = "https://sso.example.com"
tenant = "acme"
client_id = "dc-cli"
username = "alice"

# svc: the batch jobs' client -- owner: ops
[profiles.svc]
token_url = "https://sso.example.com/realms/acme/protocol/openid-connect/token"
client_id = "svc"
grant = "client_credentials"

# trailing notes about the daemon
[daemon]
max_connections = 64

# dev: a public client -- owner: bob
[profiles.dev]
issuer = "https://sso.example.com/realms/dev"
client_id = "dc-public"
grant = "device"
auth_method = "none"
# dev's own note, the last line
"""


def _cut(text: str, first: str, up_to: str | None) -> str:
    """``text`` without the lines from the one that starts with ``first`` to the one before ``up_to``."""
    start = text.index(first)
    return text[:start] + ("" if up_to is None else text[text.index(up_to) :])


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("acme", _cut(TEAM, "# acme:", "# svc:")),  # the first: its block goes, svc's stays
        ("svc", _cut(TEAM, "# svc:", "# trailing notes")),  # the middle: the daemon's block stays
        ("dev", _cut(TEAM, "\n# dev:", None)),  # the last: to the end, with the blank line before it
    ],
)
def test_remove_takes_the_profiles_own_comment_block_and_keeps_the_next_ones(
    tmp_path: Path, name: str, expected: str
) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(TEAM)
    remove_profile(str(cfg), name)
    assert cfg.read_text() == expected


def test_a_new_key_goes_after_the_tables_last_key_not_under_the_next_tables_comment(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(TEAM)
    set_profile_values(str(cfg), "acme", {"scope": "openid"})
    assert cfg.read_text() == TEAM.replace('username = "alice"\n', 'username = "alice"\nscope = "openid"\n')
    set_profile_values(str(cfg), "dev", {"scope": "openid"})  # before its own trailing note
    assert cfg.read_text().endswith('auth_method = "none"\nscope = "openid"\n# dev\'s own note, the last line\n')


def test_add_force_with_token_files_keeps_the_next_tables_comment_block(tmp_path: Path) -> None:
    """A profile's [[profiles.NAME.sinks]] tables are its tables too: replaced or removed by `add
    --force`, they take their own comment blocks, never the next table's."""
    from dc_broker.config import Sink

    cfg = tmp_path / "config.toml"
    cfg.write_text(TEAM)
    svc = load_config(str(cfg)).profiles["svc"]
    with_sink = dataclasses.replace(svc, sinks=(Sink(path="/run/dc-broker/svc.token", format="header"),))
    replace_profile(str(cfg), with_sink)
    sink = '\n[[profiles.svc.sinks]]\npath = "/run/dc-broker/svc.token"\nformat = "header"\nmode = "0600"\n'
    assert cfg.read_text() == TEAM.replace('grant = "client_credentials"\n', 'grant = "client_credentials"\n' + sink)
    assert load_config(str(cfg)).profiles["svc"] == with_sink
    replace_profile(str(cfg), svc)  # without it again: its table goes, the daemon's block stays
    assert cfg.read_text() == TEAM


# ---------------------------------------------------------------- a config that is a symbolic link


def test_set_through_a_symlinked_config_replaces_its_target_and_keeps_the_link(tmp_path: Path) -> None:
    """Dotfile managers (stow, chezmoi) make config.toml a link into their repository: the edit
    replaces the link's target atomically, with its owner, group and mode; the link stays a link."""
    repo = tmp_path / "dotfiles" / "dc-broker"
    repo.mkdir(parents=True)
    target = repo / "config.toml"
    target.write_text(TEAM)
    os.chown(target, 65534, 65534)
    target.chmod(0o640)
    home = tmp_path / "home" / ".config" / "dc-broker"
    home.mkdir(parents=True)
    link = home / "config.toml"
    link.symlink_to(os.path.relpath(target, home))  # as stow makes them: relative
    plain = tmp_path / "plain.toml"
    plain.write_text(TEAM)
    said = {}
    for cfg in (link, plain):
        done = subprocess.run([DC_BROKER, "set", "--config", str(cfg), "--socket", str(tmp_path / "none"), "acme",
                               "scope=openid"], capture_output=True, text=True, timeout=60)  # fmt: skip
        assert (done.returncode, done.stderr) == (0, ""), done.stderr
        said[cfg] = done.stdout
    assert said[link] == said[plain]  # the message says nothing new: a link is no news
    assert link.is_symlink() and os.readlink(link) == os.path.relpath(target, home)
    assert target.read_text() == TEAM.replace('username = "alice"\n', 'username = "alice"\nscope = "openid"\n')
    st = target.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65534, 0o640)
    assert sorted(os.listdir(home)) == ["config.toml"]  # nothing beside the link
    assert sorted(os.listdir(repo)) == [".config.toml.lock", "config.toml"]  # the lock is beside the target


def test_a_symlinked_config_whose_target_cannot_be_written_is_named_in_the_error(tmp_path: Path) -> None:
    (tmp_path / "not-a-directory").write_text("")
    link = tmp_path / "config.toml"
    link.symlink_to(tmp_path / "not-a-directory" / "config.toml")
    target = str(tmp_path / "not-a-directory" / "config.toml")
    new = Profile(name="x", client_id="x", grant="client_credentials", token_url="https://x.example/t")
    with pytest.raises(ConfigError, match=f"{re.escape(target)} \\(where the link {re.escape(str(link))} leads\\)"):
        add_profile(str(link), new)
    with pytest.raises(ConfigError, match=f"cannot write the config file {re.escape(target)} \\(where the link"):
        write_text(str(link), "")
    assert link.is_symlink()


# ---------------------------------------------------------------- the one-writer lock


def _world_readable_directory() -> Path:
    """A directory like /etc/dc-broker: root's, mode 0755, that every user may open (tmp_path is 0700)."""
    top = Path(tempfile.mkdtemp(prefix="dc-broker-etc-"))
    top.chmod(0o755)
    return top


def _flock_as_nobody(*paths: Path) -> int:
    """A forked child that, as uid 65534 (nobody), opens each path read-only and flocks it, then
    sleeps; its pid, once it holds them all."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            for path in paths:
                fcntl.flock(os.open(path, os.O_RDONLY | os.O_CLOEXEC), fcntl.LOCK_EX)
            os.write(w, b"locked\n")
            time.sleep(300)
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as ready:
        assert ready.readline() == b"locked\n", "the child (uid 65534) could not flock the directory"
    return pid


def test_a_user_who_flocks_the_config_directory_does_not_hold_off_root(tmp_path: Path) -> None:
    """Any user may open a world-readable directory and flock it: the lock is a file of its own that
    only the config's owner can open, so `sudo dc-broker set` still goes through at once."""
    top = _world_readable_directory()
    holder = 0
    try:
        cfg = top / "config.toml"
        cfg.write_text(TEAM)
        cfg.chmod(0o644)
        holder = _flock_as_nobody(top, cfg)
        started = time.monotonic()
        done = subprocess.run([DC_BROKER, "set", "--config", str(cfg), "--socket", str(top / "none"), "acme",
                               "scope=openid"], capture_output=True, text=True, timeout=30)  # fmt: skip
        assert (done.returncode, done.stderr) == (0, ""), done.stderr
        assert time.monotonic() - started < 10
        assert load_config(str(cfg)).profiles["acme"].scope == "openid"
        lock = os.stat(top / ".config.toml.lock")
        assert (lock.st_uid, stat.S_IMODE(lock.st_mode), stat.S_ISREG(lock.st_mode)) == (0, 0o600, True)
    finally:
        if holder:
            os.kill(holder, signal.SIGKILL)
            os.waitpid(holder, 0)
        shutil.rmtree(top)


def test_a_lock_file_that_is_a_link_or_someone_elses_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(TEAM)
    lock = tmp_path / ".config.toml.lock"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("keep\n")
    lock.symlink_to(elsewhere)
    with pytest.raises(
        ConfigError, match=f"the config's lock file {re.escape(str(lock))} is a symbolic link; remove it"
    ):
        set_profile_values(str(cfg), "acme", {"scope": "openid"})
    assert elsewhere.read_text() == "keep\n" and cfg.read_text() == TEAM
    lock.unlink()
    lock.write_text("")
    os.chown(lock, 65534, 65534)
    with pytest.raises(
        ConfigError,
        match=f"the config's lock file {re.escape(str(lock))} belongs to user nobody \\(uid 65534\\), not to user root",
    ):
        set_profile_values(str(cfg), "acme", {"scope": "openid"})
    assert cfg.read_text() == TEAM


def test_a_held_lock_is_waited_for_said_once_and_given_up_on_naming_the_lock_file(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(TEAM)
    with config_lock(str(cfg)):
        pass  # makes the lock file
    lock = tmp_path / ".config.toml.lock"
    grab = "import fcntl, os, sys, time\nfcntl.flock(os.open(sys.argv[1], os.O_RDWR), fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(300)\n"
    holder = subprocess.Popen([sys.executable, "-c", grab, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        started = time.monotonic()
        with pytest.raises(ConfigError) as failed, config_lock(str(cfg), wait=2.5):
            pytest.fail("took a lock another process holds")
        assert 2.5 <= time.monotonic() - started < 10
    finally:
        holder.kill()
        holder.wait()
    message = str(failed.value)
    assert message.startswith(
        f"gave up after 2.5 s waiting for the lock of the config file {cfg}: {lock} is held by process {holder.pid} ("
    ), message
    assert message.endswith("); let it finish (or stop it) and run this command again"), message
    err = capfd.readouterr().err
    assert err.count("\n") == 1, err  # said once
    assert err.startswith(f"Waiting for process {holder.pid} (") and f"{lock}" in err, err
    with config_lock(str(cfg), wait=2.5):  # free again once the holder is gone
        pass
