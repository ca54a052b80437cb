"""`dc-broker set`, `add --force` and `remove` edit config.toml the way a person wrote it: over a corpus
of config files (multi-line arrays with comments, inline tables, dotted keys, tables out of order,
odd spacing, CRLF without a final newline, every key), each edit changes only the lines of what it
changes and keeps every other byte; what it cannot do (a value with a newline or a control
character, a profile that would not load) is refused with a message, and the file stays as it was.

The checker is independent of the editor: it compares the bytes before and after with difflib and
allows a changed line only where it assigns the edited key (or is the inside of that key's
multi-line array, or the one line of an inline table that holds it), and it checks with tomllib
that the file now says exactly the old settings with the one change."""

from __future__ import annotations

import dataclasses
import difflib
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from dc_broker.config import SETTABLE_KEYS, Profile
from dc_broker.config.edit import add_profile, parse_assignment, remove_profile, replace_profile, set_profile_values
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


def _changed_lines(old: str, new: str) -> list[tuple[list[str], list[str]]]:
    """The hunks that differ: (old lines, new lines), line endings kept."""
    a, b = old.splitlines(keepends=True), new.splitlines(keepends=True)
    ops = difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes()
    return [(a[i1:i2], b[j1:j2]) for tag, i1, i2, j1, j2 in ops if tag != "equal"]


_ASSIGNS = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*=")


def _only_touches(old: str, new: str, profile: str, keys: set[str]) -> None:
    """Every changed line assigns one of ``keys`` (``key =`` in the profile's table, or the dotted
    ``profiles.NAME.key =``), or continues such a multi-line array, or is the profile's inline table."""
    eol = "\r\n" if "\r\n" in old else "\n"  # a key added after the last line gives that line its line ending
    old, new = (t if t.endswith("\n") else t + eol for t in (old, new))
    for before, after in _changed_lines(old, new):
        for line in [*before, *after]:
            m = _ASSIGNS.match(line)
            if m is None:
                # inside a multi-line array of a key we changed: a value, a comment or the closing bracket
                assert re.match(r"^\s*(\"[^\"]*\"|'[^']*'|\]|#.*)?\s*,?\s*(#.*)?\s*$", line), (line, before, after)
                continue
            name = m.group(1)
            if name == profile and "{" in line:  # an inline table: one line holds the whole profile
                continue
            assert name.removeprefix(f"profiles.{profile}.") in keys, (line, keys, before, after)


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
        for removed, added in _changed_lines(before, after):
            assert added == [] or all(not line.strip() for line in added), added
            for line in removed:  # the profile's own lines only: never another's, never a comment above it
                m = _ASSIGNS.match(line)
                header = re.match(r"^\s*\[\[?\s*profiles\s*\.\s*([^.\]\s]+)", line)
                assert (
                    not line.strip()
                    or (header and header.group(1) == name)
                    or (m and (m.group(1).startswith(f"profiles.{name}.") or m.group(1) == name))
                    or (m and m.group(1) in {*SETTABLE_KEYS, "path", "format", "mode", "group"})
                    or line.lstrip().startswith(("#", '"', "'", "]"))
                ), line
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
    assert done.stdout == "Updated profile acme: allow = ('user:carol', 'group:staff').\n"
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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"]  # no temporary file left
