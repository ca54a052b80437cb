"""Token files (``dc_broker.sinks``): config checks, the atomic writer, lock/logout/remove on trio's
autojump clock, and a reader loop across refreshes, in-process and against real processes."""

from __future__ import annotations

import base64
import dataclasses
import grp
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import trio

from dc_broker import atomic, sinks
from dc_broker.access.caller import Caller
from dc_broker.cli.files import sink_options
from dc_broker.config import Sink
from dc_broker.config.edit import profile_table, remove_profile
from dc_broker.config.load import load_config, parse_config, parse_text
from dc_broker.errors import ConfigError
from dc_broker.secret import Secret
from dc_broker.serve.ops import HANDLERS, BrokerState
from dc_broker.sessions.registry import Sessions
from dc_broker.store import MemoryStore
from tests.conftest import CREDENTIALS, LockableStore, idp_transport, profile, running, trio_wall_clock
from tests.e2e import DC_BROKER, dev_idp, run, start_run, stop, wait_for, wait_for_socket
from tests.test_cli import cli, home, init_keyfile  # noqa: F401 - the home fixture

PROFILE_HEAD = """[profiles.acme]
token_url = "https://sso.example.com/token"
client_id = "dc-service"
grant = "client_credentials"
"""


def group_of(directory: Path) -> str:
    """How a message of the directory rule names the group of ``directory``: root's when the tests
    run as root, the user's own group otherwise (so the expected text holds for any user)."""
    gid = directory.stat().st_gid
    try:
        return f"group {grp.getgrgid(gid).gr_name}"
    except KeyError:
        return f"gid {gid}"


def jwt_exp(token: str) -> float:
    payload = token.split(".")[1]
    return float(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"])


# ---------------------------------------------------------------- config


def test_sink_config_parses_with_defaults_and_relative_paths(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path / "rt"))
    text = PROFILE_HEAD + (
        f'\n[[profiles.acme.sinks]]\npath = "{tmp_path}/a.token"\n'
        '\n[[profiles.acme.sinks]]\npath = "acme.env"\nformat = "env"\nmode = "0640"\n'
    )
    config = parse_config(tomllib.loads(text), text=text)
    first, second = config.profiles["acme"].sinks
    assert first == Sink(path=f"{tmp_path}/a.token", format="token", mode=0o600)
    assert second == Sink(path=str(tmp_path / "rt" / "acme.env"), format="env", mode=0o640)
    # what `dc-broker add` writes reads back the same
    import tomlkit

    doc = tomlkit.document()
    doc["profiles"] = tomlkit.table(is_super_table=True)
    doc["profiles"]["acme"] = profile_table(config.profiles["acme"])
    assert parse_text(doc.as_string()).profiles["acme"] == config.profiles["acme"]


def test_parsing_never_looks_at_the_disk_and_each_sink_knows_its_line(tmp_path: Path) -> None:
    """The same text loads the same everywhere: whether a directory is safe is decided where the
    file is written (below), not while parsing."""
    open_dir = tmp_path / "shared"
    open_dir.mkdir()
    open_dir.chmod(0o777)  # every user may write, not sticky: refused when a token file is written there
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        PROFILE_HEAD
        + f'\n[[profiles.acme.sinks]]\npath = "{tmp_path}/ok.token"\n'
        + f'\n[[profiles.acme.sinks]]\nformat = "json"\npath = "{tmp_path}/gone/sub/acme.token"\n'
        + f'\n[[profiles.acme.sinks]]\npath = "{open_dir}/acme.token"\n'
    )
    first, second, third = load_config(str(cfg)).profiles["acme"].sinks
    assert (first.origin, second.origin, third.origin) == (f"{cfg}:7", f"{cfg}:11", f"{cfg}:14")
    assert second.where == f"{tmp_path}/gone/sub/acme.token ({cfg}:11)"
    assert third == Sink(path=f"{open_dir}/acme.token")
    assert not (tmp_path / "gone").exists()
    with pytest.raises(atomic.UnsafeDirectory, match=f"^{open_dir} has mode 0777: "):  # the refusal is here
        sinks.write_atomically(third.path, b"x\n")
    assert os.listdir(open_dir) == []


@pytest.mark.parametrize(
    ("body", "line", "message"),
    [
        ('path = "X/a"\nmode = "0644"\n', 8, "mode 0644 is not allowed"),
        ('path = "X/a"\nmode = "0700"\n', 8, "mode 0700 is not allowed"),
        ('path = "X/a"\nmode = "rw"\n', 8, "mode must be octal"),
        ('path = "X/a"\nformat = "yaml"\n', 8, "format 'yaml' is not one of token, header, json, env"),
        ('format = "json"\n', 6, "needs a path"),
        ('path = "X/a"\ncolour = "red"\n', 8, "unknown key profiles.acme.sinks\\[0\\].colour"),
    ],
)
def test_bad_sink_settings_name_their_line(tmp_path: Path, body: str, line: int, message: str) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(PROFILE_HEAD + "\n[[profiles.acme.sinks]]\n" + body.replace("X", str(tmp_path)))
    with pytest.raises(ConfigError, match=f"^{cfg}:{line}: .*{message}"):
        load_config(str(cfg))


def test_add_sink_option_and_remove_profile_takes_its_sinks(tmp_path: Path) -> None:
    assert sink_options((f"{tmp_path}/a.token", f"{tmp_path}/b:env", f"{tmp_path}/c:weird")) == (
        Sink(path=f"{tmp_path}/a.token"),
        Sink(path=f"{tmp_path}/b", format="env"),
        Sink(path=f"{tmp_path}/c:weird"),
    )
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        PROFILE_HEAD
        + f'\n[[profiles.acme.sinks]]\npath = "{tmp_path}/a.token"\n'
        + '\n[profiles.other]\ntoken_url = "https://sso.example.com/token"\nclient_id = "x"\n'
        + 'grant = "client_credentials"\n'
    )
    remove_profile(str(cfg), "acme")
    assert set(load_config(str(cfg)).profiles) == {"other"}
    assert "sinks" not in cfg.read_text()


# ---------------------------------------------------------------- the writer


def test_render_formats() -> None:
    args = ("abc.def-ghi", "Bearer", 1750000000.9, "openid email", "acme")
    assert sinks.render("token", *args) == b"abc.def-ghi\n"
    assert sinks.render("header", *args) == b"Authorization: Bearer abc.def-ghi\n"
    assert sinks.render("env", *args) == b"DC_TOKEN=abc.def-ghi\nDC_TOKEN_EXPIRES_AT=1750000000\n"
    assert json.loads(sinks.render("json", *args)) == {
        "token": "abc.def-ghi",
        "type": "Bearer",
        "expires_at": 1750000000,
        "scope": "openid email",
        "profile": "acme",
    }
    with pytest.raises(ValueError, match="b64token"):
        sinks.render("env", "a b\n", "Bearer", 0, "", "acme")  # would break an env file: refused


def test_write_atomically_mode_group_and_no_leftovers(tmp_path: Path) -> None:
    target = tmp_path / "new" / "acme.token"
    old_umask = os.umask(0o077)
    try:
        sinks.write_atomically(str(target), b"one\n", 0o640, None)
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"one\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640  # exactly as configured, whatever the umask
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o700
    first_inode = target.stat().st_ino
    sinks.write_atomically(str(target), b"two\n", 0o600, None)
    assert target.read_bytes() == b"two\n" and target.stat().st_ino != first_inode  # renamed over, not rewritten
    assert os.listdir(target.parent) == ["acme.token"]
    with pytest.raises(OSError, match="does not exist"):
        sinks.write_atomically(str(target), b"x\n", 0o640, "no-such-group-here")
    assert os.listdir(target.parent) == ["acme.token"] and target.read_bytes() == b"two\n"
    assert sinks.remove_file(str(target)) and not sinks.remove_file(str(target))


def test_atomic_write_fsyncs_the_file_then_its_directory_after_the_rename(tmp_path: Path, monkeypatch) -> None:
    """The new file's bytes reach the disk before the rename, and the rename itself after it (the
    directory's fsync): a power cut leaves the old file or the new one, never an empty one."""
    target = tmp_path / "d" / "acme.token"
    target.parent.mkdir()
    target.write_bytes(b"old\n")
    synced: list[tuple[str, int, bytes]] = []  # (what, its inode, what the target held then)
    real_fsync = os.fsync

    def held() -> bytes:
        return target.read_bytes() if target.exists() else b"(none)"

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        synced.append(("directory" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino, held()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic.write(str(target), b"new\n")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert synced == [
        ("file", target.stat().st_ino, b"old\n"),  # the new file, before it takes the name
        ("directory", target.parent.stat().st_ino, b"new\n"),  # then its directory, with the rename in it
    ]
    synced.clear()
    monkeypatch.setattr(os, "fsync", fsync)
    assert atomic.remove(str(target))
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert synced == [("directory", target.parent.stat().st_ino, b"(none)")]  # the removal, made to last


def test_atomic_write_keeps_the_mode_of_the_file_it_replaces_unless_told(tmp_path: Path) -> None:
    target = tmp_path / "config.toml"
    target.write_text("old\n")
    target.chmod(0o640)
    old_umask = os.umask(0o077)
    try:
        atomic.write(str(target), b"kept\n")
        assert (stat.S_IMODE(target.stat().st_mode), target.read_bytes()) == (0o640, b"kept\n")
        atomic.write(str(target), b"told\n", mode=0o604)
        assert (stat.S_IMODE(target.stat().st_mode), target.read_bytes()) == (0o604, b"told\n")
        fresh = tmp_path / "fresh"
        atomic.write(str(fresh), b"x\n")
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o600  # a new file: private, whatever the umask
    finally:
        os.umask(old_umask)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own a file as another user (chown)")
def test_atomic_write_keeps_the_owner_and_group_of_the_file_it_replaces(tmp_path: Path) -> None:
    """A file of another user in a private directory (a config edited with sudo): root's write keeps
    its owner, group and mode, so its owner can still edit it."""
    target = tmp_path / "config.toml"
    target.write_text("old\n")
    os.chown(target, 65534, 65534)
    target.chmod(0o640)
    before = target.stat().st_ino
    atomic.write(str(target), b"new\n")
    st = target.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), target.read_bytes()) == (65534, 65534, 0o640, b"new\n")
    assert st.st_ino != before and os.listdir(tmp_path) == ["config.toml"]


def test_systemd_install_writes_each_unit_whole_0644_and_never_through_a_link(tmp_path: Path) -> None:
    """`dc-broker systemd install` writes with the same writer: a link planted at a unit's path is
    refused (not followed, not replaced), one at the old fixed temporary name (``NAME.tmp``) is never
    written through, and the units are 0644 whatever the umask."""
    from click.testing import CliRunner

    from dc_broker.cli import cli as dc_broker
    from dc_broker.cli.units import USER_UNITS, render

    dest = tmp_path / "units"
    dest.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("victim\n")
    (dest / "dc-broker.socket.tmp").symlink_to(victim)
    (dest / "dc-broker.service").symlink_to(victim)
    args = ["systemd", "install", "--user", "--dest", str(dest), "--allow-checkout"]
    old_umask = os.umask(0o077)
    try:
        refused = CliRunner().invoke(dc_broker, args)
        assert refused.exit_code == 1
        assert refused.output == (  # nothing printed before: "wrote" comes once every unit is written
            f"Error: cannot write {dest}/dc-broker.service: is not a regular file (a link, a directory...); not "
            "replaced\n"
        )
        assert (dest / "dc-broker.service").is_symlink() and victim.read_text() == "victim\n"
        (dest / "dc-broker.service").unlink()
        done = CliRunner().invoke(dc_broker, args)
    finally:
        os.umask(old_umask)
    assert done.exit_code == 0, done.output
    exe = next(line for line in (dest / "dc-broker.service").read_text().splitlines() if line.startswith("ExecStart="))
    for name, text in render(USER_UNITS, exe.removeprefix("ExecStart=").removesuffix(" run")).items():
        assert (dest / name).read_text() == text
        assert stat.S_IMODE((dest / name).stat().st_mode) == 0o644
    assert victim.read_text() == "victim\n"  # the link at the old temporary name was never written through
    assert sorted(os.listdir(dest)) == ["dc-broker.service", "dc-broker.socket", "dc-broker.socket.tmp"]


# ---------------------------------------------------------------- the task, on the autojump clock

T = 60.0


@pytest.fixture(autouse=True)
def inline_file_io(request, monkeypatch) -> None:
    """On the autojump clock a worker thread's real milliseconds let fake minutes pass; write inline."""
    if "autojump_clock" in request.fixturenames:

        async def inline(fn, *args):
            return fn(*args)

        monkeypatch.setattr(sinks, "_blocking", inline)


def sink_sessions(tmp_path: Path, idp, fmt: str = "token") -> tuple[Sessions, Path]:
    path = tmp_path / "sinks" / "demo.token"
    p = profile("demo", sinks=(Sink(path=str(path), format=fmt),))
    sessions = Sessions({"demo": p}, MemoryStore({"demo": CREDENTIALS["demo"]}), idp_transport(idp))
    return sessions, path


async def test_reader_never_sees_a_partial_empty_or_expired_token_across_100_refreshes(
    tmp_path: Path, make_idp, autojump_clock
) -> None:
    idp = make_idp(access_lifespan=T, sso_idle=10 * T, sso_max=1000 * T)
    sessions, path = sink_sessions(tmp_path, idp)
    seen: list[str] = []
    (tmp_path / "sinks").mkdir()
    path.write_text("stale-from-an-earlier-run\n")
    async with running(sessions.run, sinks.TokenFiles(sessions).run):
        with trio.fail_after(10 * T):
            while not path.exists() or path.read_text() == "stale-from-an-earlier-run\n":
                await trio.sleep(0.05)
        while len(seen) < 101:
            text = path.read_text()  # the file must exist throughout
            assert text.endswith("\n") and text.count("\n") == 1, text
            token = text[:-1]
            assert token.count(".") == 2
            assert jwt_exp(token) > trio_wall_clock(), "an expired token in the file"
            if not seen or seen[-1] != token:
                seen.append(token)
            await trio.sleep(0.25)
    assert len(set(seen)) == 101  # 100 refreshes, each written once and read
    assert not path.exists()  # the broker stopped: nobody vouches for the file any more


async def test_lock_logout_and_remove_take_the_file_away(tmp_path: Path, make_idp, autojump_clock) -> None:
    idp = make_idp(access_lifespan=T)
    sessions, path = sink_sessions(tmp_path, idp, fmt="json")

    async def appears() -> str:
        with trio.fail_after(2 * T):
            while not path.exists():
                await trio.sleep(0.05)
        return str(json.loads(path.read_text())["token"])

    async def disappears() -> None:
        with trio.fail_after(5):
            while path.exists():
                await trio.sleep(0.05)

    async with running(sessions.run, sinks.TokenFiles(sessions).run):
        first = await appears()
        sessions.locked()
        await disappears()
        sessions.unlocked()  # the stored token is served (and written) again
        assert await appears() == first
        await sessions.lookup("demo").logout()
        await disappears()
        sessions.lookup("demo").credentials_changed()  # logged out: nothing comes back
        await trio.sleep(T)
        assert not path.exists()
        sessions.lookup("demo").store.set_credentials("demo", CREDENTIALS["demo"])
        sessions.lookup("demo").credentials_changed()
        await appears()
        sessions.reload({})  # `dc-broker remove`
        await disappears()


async def test_a_reload_that_drops_a_sink_removes_its_file(tmp_path: Path, make_idp, autojump_clock) -> None:
    idp = make_idp(access_lifespan=T)
    sessions, path = sink_sessions(tmp_path, idp)
    other = tmp_path / "sinks" / "other.token"
    async with running(sessions.run, sinks.TokenFiles(sessions).run):
        with trio.fail_after(T):
            while not path.exists():
                await trio.sleep(0.05)
        sessions.reload({"demo": profile("demo", sinks=(Sink(path=str(other)),))})
        with trio.fail_after(T):
            while path.exists() or not other.exists():
                await trio.sleep(0.05)


async def appears(path: Path, within: float = 2 * T) -> str:
    """The file's text once it exists (on the autojump clock)."""
    with trio.fail_after(within):
        while not path.exists():
            await trio.sleep(0.05)
    return path.read_text()


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"username": "other"}, id="user-the-idp-refuses"),
        pytest.param({"client_id": "no-such-client"}, id="client-the-idp-refuses"),
        pytest.param({"tenant": "nowhere"}, id="idp-that-does-not-answer"),
    ],
)
async def test_a_reload_for_another_login_takes_the_old_logins_file_away(
    tmp_path: Path, make_idp, autojump_clock, change: dict[str, Any]
) -> None:
    """`dc-broker set demo username=other` (or `add --force` with another client or IdP) drops the
    login. The file holding the old login's token goes before the reload's ``settle`` returns,
    although that token is still valid and the new login has none yet (its IdP refuses it, or has
    no such realm): a reader must not go on acting as the old user. A reload back to the old login
    brings a file again, with a token of the new login."""
    idp = make_idp(access_lifespan=T)
    sessions, path = sink_sessions(tmp_path, idp)
    files = sinks.TokenFiles(sessions)
    session = sessions.lookup("demo")
    before = session.profile
    async with running(sessions.run, files.run):
        old = await appears(path)
        sessions.reload({"demo": dataclasses.replace(before, **change)})
        await files.settle(["demo"])
        assert not path.exists(), "the old login's token file outlived the reload"
        await trio.sleep(T)  # the new login gets no token; nothing comes back, least of all the old one
        # refused, unreachable, or (a new user or client) the old one's secret dropped: nothing to send
        assert session.token is None
        assert session.state.value in ("rejected", "unavailable", "empty", "login_required")
        assert not path.exists()
        sessions.reload({"demo": before})
        session.store.set_credentials("demo", CREDENTIALS["demo"])  # what `rotate` stores again after the drop
        session.credentials_changed()
        assert await appears(path) != old


async def test_a_new_logins_token_that_cannot_be_written_still_takes_the_old_one_away(
    tmp_path: Path, make_idp, autojump_clock, monkeypatch
) -> None:
    """The new login got a token, but writing it fails (a full disk): the file must not keep the old
    user's token meanwhile. It comes back once the write succeeds."""
    idp = make_idp(access_lifespan=T)
    sessions, path = sink_sessions(tmp_path, idp)
    files = sinks.TokenFiles(sessions)
    session = sessions.lookup("demo")
    written = sinks.write_atomically

    def full_disk(*args: object) -> None:
        raise OSError(28, "No space left on device")

    async with running(sessions.run, files.run):
        old = await appears(path)
        monkeypatch.setattr(sinks, "write_atomically", full_disk)
        # as `add --force` does it: the new settings (the old user's password is dropped), then the new
        # user's password (set_secrets)
        sessions.reload({"demo": dataclasses.replace(session.profile, username="viewer")})
        session.store.set_credentials("demo", dataclasses.replace(CREDENTIALS["demo"], password=Secret("viewer")))
        session.credentials_changed()
        with trio.fail_after(T):  # the viewer's login gets a token
            while session.peek(0.0, trio.current_time()) is None:
                await trio.sleep(0.05)
        await files.settle(["demo"])
        assert not path.exists(), "the old user's token stayed while the new user's could not be written"
        monkeypatch.setattr(sinks, "write_atomically", written)
        assert await appears(path) not in (old, "")


async def test_the_same_login_between_tokens_keeps_its_file(tmp_path: Path, make_idp, autojump_clock) -> None:
    """The counterpart: while the broker is between two tokens of the *same* login the file keeps the
    token it holds, until ``REMOVE_BEFORE`` its expiry (that is what a file is for): a refresh hung
    at the IdP, a reload that changes nothing about whom the login is for (a proxy: new endpoints
    and a new attempt), and new secrets for the same user and client (`dc-broker rotate`), after
    which the session holds no token at all until the IdP answers."""
    idp = make_idp(access_lifespan=T, sso_idle=100 * T, sso_max=1000 * T)
    sessions, path = sink_sessions(tmp_path, idp)
    files = sinks.TokenFiles(sessions)
    session = sessions.lookup("demo")
    async with running(sessions.run, files.run):
        first = await appears(path)
        idp.faults.hang = True  # the next refresh gets no answer
        with trio.fail_after(T):
            while session.attempt is None:
                await trio.sleep(0.05)
        await files.settle(["demo"])
        assert path.read_text() == first
        sessions.reload({"demo": dataclasses.replace(session.profile, proxy="direct")})
        await files.settle(["demo"])
        assert path.read_text() == first
        session.store.set_credentials("demo", CREDENTIALS["demo"])
        session.credentials_changed(relogin=True)  # what `dc-broker rotate demo --password` does
        await files.settle(["demo"])
        assert session.token is None and path.read_text() == first
        while path.exists():  # kept while its token is valid, removed shortly before it expires
            assert path.read_text() == first
            await trio.sleep(0.25)
        assert trio_wall_clock() >= jwt_exp(first[:-1]) - sinks.REMOVE_BEFORE - 1
        idp.faults.clear()
        assert await appears(path, 10 * T) != first


# ---------------------------------------------------------------- real processes

READER = r"""
import base64, json, os, sys, time
path, want, deadline = sys.argv[1], int(sys.argv[2]), time.time() + float(sys.argv[3])
seen, reads = [], 0
def exp(token):
    p = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))["exp"]
while len(seen) < want + 1:
    if time.time() > deadline:
        sys.exit(f"only {len(seen) - 1} refreshes seen in time")
    with open(path) as f:  # FileNotFoundError fails the run: the file must exist throughout
        text = f.read()
    reads += 1
    if not text.endswith("\n") or text.count("\n") != 1 or text.count(".") != 2:
        sys.exit(f"partial or empty file after {reads} reads: {text[:20]!r}")
    token = text[:-1]
    # the dev IdP writes exp in whole seconds (truncated), up to 1 s before the expiry it announces
    if exp(token) + 1 <= time.time():
        sys.exit(f"expired token read: exp {exp(token)} at {time.time():.3f}")
    if not seen or seen[-1] != token:
        seen.append(token)
    time.sleep(0.002)  # the reader's pace: it reads as often as a busy program would
print(f"{len(seen) - 1} refreshes, {reads} reads, all complete and unexpired")
"""


@pytest.mark.slow
@pytest.mark.e2e
def test_reader_process_across_refreshes_of_a_real_broker(tmp_path: Path) -> None:
    # 4-second tokens, refreshed every ~3 s: 8 by default (about 25 s); DC_SINK_REFRESHES=100 for the
    # full run (the in-process test above does 100 on the fake clock). Shorter tokens leave margins
    # (0.4 s for 2-second ones) within reach of a loaded 2-core machine's scheduling delays.
    refreshes = int(os.environ.get("DC_SINK_REFRESHES", "8"))
    idp = subprocess.Popen(
        [sys.executable, "-m", "dc_broker.devserver", "--access-lifespan", "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert idp.stdout is not None
    base = idp.stdout.readline().strip()
    token_file = tmp_path / "state" / "demo.token"
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f'[profiles.demo]\nserver = "{base}"\ntenant = "demo"\nclient_id = "dc-cli"\nusername = "demo"\n'
        f'\n[[profiles.demo.sinks]]\npath = "{token_file}"\n'
    )
    sock = str(tmp_path / "run" / "b.sock")
    broker = start_run(cfg, sock, '[demo]\npassword = "demo"\nclient_secret = "dc-cli-secret"\n')
    try:
        wait_for(token_file.exists, 20, "the token file", process=broker, every=0.02)
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        limit = 4 * refreshes + 20
        result = subprocess.run(
            [sys.executable, "-c", READER, str(token_file), str(refreshes), str(limit)],
            capture_output=True,
            text=True,
            timeout=limit + 10,
        )
        assert result.returncode == 0, result.stderr + result.stdout
        assert f"{refreshes} refreshes" in result.stdout
        status = run([DC_BROKER, "status", "--socket", sock, "--json"])
        assert json.loads(status.stdout)["profiles"][0]["refreshes"] >= refreshes
    finally:
        assert stop(broker, signal.SIGTERM) == 0
        idp.terminate()
        idp.wait(10)
    assert not token_file.exists()
    err = broker.stderr.read() if broker.stderr else ""
    assert "eyJ" not in err  # no token in the logs


def test_lock_logout_and_remove_return_once_the_file_is_gone(tmp_path: Path, home: dict[str, str]) -> None:  # noqa: F811
    """`dc-broker lock`, `logout` and `remove` against a real broker with a vault: when each command
    returns, the token file is already gone. Unlock and a new login bring it back. (On a fast disk
    the file went within milliseconds before too: the slow-disk test below is the one that fails
    without the wait.)"""
    env = home
    token_file = tmp_path / "state" / "acme.token"
    with dev_idp() as base:
        init_keyfile(env, tmp_path)
        added = cli(
            env,
            *("add", "acme", "--server", base, "--tenant", "demo", "--client-id", "dc-cli", "--username", "demo"),
            *("--password-stdin", "--secret-stdin", "--sink", str(token_file)),
            stdin="demo\ndc-cli-secret\n",
        )
        assert added.returncode == 0, added.stderr
        daemon = subprocess.Popen(
            [DC_BROKER, "run"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            wait_for_socket(env["DC_BROKER_SOCKET"], daemon)
            wait_for(token_file.exists, 20, "the token file", process=daemon, every=0.02)
            done = cli(env, "lock")
            assert done.returncode == 0, done.stderr
            assert not token_file.exists(), "the token file outlived `dc-broker lock`"
            assert cli(env, "unlock").returncode == 0
            wait_for(token_file.exists, 20, "the token file", process=daemon, every=0.02)
            done = cli(env, "logout", "acme")
            assert done.returncode == 0, done.stderr
            assert not token_file.exists(), "the token file outlived `dc-broker logout`"
            login = cli(env, "login", "acme", "--password-stdin", stdin="demo\n")
            assert login.returncode == 0, login.stderr
            wait_for(token_file.exists, 20, "the token file", process=daemon, every=0.02)
            done = cli(env, "remove", "acme")
            assert done.returncode == 0, done.stderr
            assert not token_file.exists(), "the token file outlived `dc-broker remove`"
        finally:
            assert stop(daemon) == 0


async def test_lock_and_logout_wait_for_a_slow_disk_to_take_the_file_away(
    tmp_path: Path, make_idp, autojump_clock, monkeypatch
) -> None:
    """Every file operation takes 0.4 s (fsync on a busy disk): the `lock` and `logout` ops return
    only once the token file is gone, not before the sinks task has got round to it (it went 0.3 to
    0.5 s after the reply on the red team's host)."""

    async def slow_disk(fn, *args):
        await trio.sleep(0.4)
        return fn(*args)

    monkeypatch.setattr(sinks, "_blocking", slow_disk)
    path = tmp_path / "sinks" / "demo.token"
    store = LockableStore({"demo": CREDENTIALS["demo"]})
    sessions = Sessions(
        {"demo": profile("demo", sinks=(Sink(path=str(path)),))}, store, idp_transport(make_idp(access_lifespan=T))
    )
    files = sinks.TokenFiles(sessions)
    state = BrokerState(sessions=sessions, socket_path="-", files=files)
    owner = Caller(os.getuid(), os.getgid(), os.getpid())

    async def appears() -> None:
        with trio.fail_after(2 * T):
            while not path.exists():
                await trio.sleep(0.05)

    async with running(sessions.run, files.run):
        await appears()
        assert await HANDLERS["lock"](state, owner, {}, trio.current_time()) == {"locked": True}
        assert not path.exists(), "the token file outlived the lock's reply"
        store.unlock()
        sessions.unlocked()
        await appears()
        out = await HANDLERS["logout"](state, owner, {"profile": "demo"}, trio.current_time())
        assert out["profile"] == "demo"
        assert not path.exists(), "the token file outlived the logout's reply"


def test_dc_broker_add_with_sinks(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    base = [DC_BROKER, "add", "dev1", "--config", str(cfg), "--socket", str(tmp_path / "none.sock")]
    base += ["--server", "http://127.0.0.1:1", "--tenant", "t", "--client-id", "c", "--grant", "device", "--no-verify"]
    added = run([*base, "--sink", f"{tmp_path}/dev1.token", "--sink", f"{tmp_path}/dev1.json:json"])
    assert added.returncode == 0, added.stderr
    assert load_config(str(cfg)).profiles["dev1"].sinks == (
        Sink(path=f"{tmp_path}/dev1.token"),
        Sink(path=f"{tmp_path}/dev1.json", format="json"),
    )
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o2770)  # setgid, group-writable: the group could swap the file
    refused = run([*base[:2], "dev2", *base[3:], "--sink", f"{shared}/dev2.token"])
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr == (
        f"Error: --sink {shared}/dev2.token: {shared} has mode 2770: {group_of(shared)} may write in it and could "
        f"replace what is in it; token files are refused there, since {atomic.RULE}\n"
    )
    assert "dev2" not in cfg.read_text()  # nothing written


async def test_an_idp_outage_past_expiry_takes_the_file_away_and_recovery_brings_it_back(
    tmp_path: Path, make_idp, autojump_clock
) -> None:
    idp = make_idp(access_lifespan=T, sso_idle=100 * T, sso_max=1000 * T)
    sessions, path = sink_sessions(tmp_path, idp)
    async with running(sessions.run, sinks.TokenFiles(sessions).run):
        with trio.fail_after(T):
            while not path.exists():
                await trio.sleep(0.05)
        first = path.read_text()[:-1]
        idp.faults.fail_next(10_000, status=503)  # the IdP is down from here on
        while path.exists():  # kept while the token is valid, removed before it expires
            assert jwt_exp(path.read_text()[:-1]) > trio_wall_clock() + 1
            await trio.sleep(0.25)
        # kept through the outage until shortly before the token's expiry (exp: whole seconds)
        assert trio_wall_clock() >= jwt_exp(first) - sinks.REMOVE_BEFORE - 1
        idp.faults.clear()
        with trio.fail_after(10 * T):  # the broker's backoff retries; the file comes back with a new token
            while not path.exists():
                await trio.sleep(0.25)
        assert path.read_text()[:-1] != first


# ---------------------------------------------------------------- the directory rule (OpenSSH StrictModes)


async def test_a_sink_in_a_2770_directory_is_refused_with_its_config_line_until_it_is_private(
    tmp_path: Path, make_idp, autojump_clock, caplog
) -> None:
    caplog.set_level(logging.INFO, "dc_broker.sinks")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o2770)  # setgid and group-writable: any member could swap the file
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        '[profiles.demo]\nserver = "http://127.0.0.1:1"\ntenant = "demo"\nclient_id = "dc-cli"\n'
        'username = "demo"\n\n[[profiles.demo.sinks]]\nformat = "json"\n'
        f'path = "{shared}/demo.token"\n'
    )
    p = load_config(str(cfg)).profiles["demo"]  # parsing says nothing about the disk
    idp = make_idp(access_lifespan=T)
    sessions = Sessions({"demo": p}, MemoryStore({"demo": CREDENTIALS["demo"]}), idp_transport(idp))
    target = shared / "demo.token"
    async with running(sessions.run, sinks.TokenFiles(sessions).run):
        with trio.fail_after(T):
            while "cannot write the token file" not in caplog.text:
                await trio.sleep(0.05)
        assert (
            f"profile demo: cannot write the token file {target} ({cfg}:9): {shared} has mode 2770: "
            f"{group_of(shared)} may write in it and could replace what is in it; refused, since {atomic.RULE}; "
            "retrying"
        ) in caplog.messages
        await trio.sleep(5 * sinks.CHECK_EVERY)
        assert os.listdir(shared) == []  # not one byte, not even a temporary file
        assert caplog.text.count("cannot write the token file") == 1  # said once, not every check
        shared.chmod(0o700)  # checked again at every write: now it is written
        with trio.fail_after(T):
            while not target.exists():
                await trio.sleep(0.05)
        assert f"profile demo: token file {target} written again" in caplog.messages


def test_every_directory_up_to_the_root_is_checked(tmp_path: Path) -> None:
    """OpenSSH's rule, walked up to /: a private directory below an open one is refused too; a sticky
    one (like /tmp) is not. (A directory of another user: the next test, as root.)"""
    open_dir = tmp_path / "open"
    (open_dir / "private").mkdir(parents=True)
    (open_dir / "private").chmod(0o700)
    open_dir.chmod(0o777)
    with pytest.raises(atomic.UnsafeDirectory) as err:
        sinks.write_atomically(str(open_dir / "private" / "a.token"), b"x\n")
    assert err.value.directory == str(open_dir) and str(err.value) == (
        f"{open_dir} has mode 0777: {group_of(open_dir)} and every user may write in it and could replace what is in it"
    )
    open_dir.chmod(0o1777)  # sticky: others may add files but not replace ours
    sinks.write_atomically(str(open_dir / "private" / "a.token"), b"x\n")
    assert (open_dir / "private" / "a.token").read_bytes() == b"x\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another user (chown)")
def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    os.chown(private, 65534, -1)  # nobody's
    with pytest.raises(atomic.UnsafeDirectory) as err:
        sinks.write_atomically(str(private / "b.token"), b"x\n")
    assert str(err.value) == f"{private} belongs to nobody (uid 65534), who could replace what is in it"
    assert os.listdir(private) == []


def test_a_directory_swapped_after_the_check_does_not_get_the_file(tmp_path: Path, monkeypatch) -> None:
    """The race: the directory passes the check, then (before the file is made) an attacker swaps an
    open directory, or a link to one, in at its path. The write happens in the directory that was
    checked (an open descriptor), so the swapped-in one never sees a byte."""
    real = tmp_path / "sinks"
    real.mkdir(mode=0o700)
    evil = tmp_path / "evil"
    evil.mkdir()
    evil.chmod(0o777)
    aside = tmp_path / "sinks.checked"
    checked = atomic.directory_problem

    for swap in ("rename", "symlink"):

        def check_then_swap(st: os.stat_result, uid: int | None = None, swap: str = swap) -> str | None:
            problem = checked(st, uid)
            if st.st_ino == real.stat().st_ino and not aside.exists():  # the last directory passed: swap now
                real.rename(aside)
                if swap == "rename":
                    evil.rename(real)
                else:
                    real.symlink_to(evil)
            return problem

        monkeypatch.setattr(atomic, "directory_problem", check_then_swap)
        sinks.write_atomically(str(real / "acme.token"), f"{swap}\n".encode())
        monkeypatch.setattr(atomic, "directory_problem", checked)
        assert (aside / "acme.token").read_text() == f"{swap}\n"  # where the checked directory went
        evil_now = real if swap == "rename" else evil
        assert os.listdir(evil_now) == []
        # put things back for the next round
        if swap == "rename":
            real.rename(evil)
        else:
            real.unlink()
        (aside / "acme.token").unlink()
        aside.rename(real)
    # and a link swapped in before the walk is not followed: the write fails, the open directory stays empty
    real.rename(aside)
    real.symlink_to(evil)
    with pytest.raises(atomic.UnsafeDirectory, match=f"{evil} has mode 0777"):
        sinks.write_atomically(str(real / "acme.token"), b"x\n")
    assert os.listdir(evil) == []


def test_a_reader_racing_writes_removals_and_comebacks_sees_whole_files_only(tmp_path: Path) -> None:
    """The writer (``sinks.write_atomically`` / ``remove_file``) and a reader in two real threads,
    interleaving as the scheduler likes: the reader sees a whole token, or no file at all (removed,
    not yet back), never a partial, empty or mixed one; no temporary file is left behind."""
    import threading

    target = tmp_path / "sinks" / "acme.token"
    tokens = [f"t{i:04d}." + "x" * (1000 + 37 * (i % 50)) for i in range(400)]
    whole = {t + "\n" for t in tokens}
    stop_reading = threading.Event()
    seen: dict[str, int] = {"whole": 0, "missing": 0}
    bad: list[str] = []

    def reader() -> None:
        while not stop_reading.is_set():
            try:
                text = target.read_text()
            except FileNotFoundError:
                seen["missing"] += 1
                continue
            if text in whole:
                seen["whole"] += 1
            else:
                bad.append(text[:40])

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i, token in enumerate(tokens):
            sinks.write_atomically(str(target), f"{token}\n".encode())
            if i % 7 == 3:  # removed (lock, logout, expiry), then back with the next token
                sinks.remove_file(str(target))
    finally:
        stop_reading.set()
        thread.join(30)
    assert bad == []
    assert seen["whole"] > 0 and seen["missing"] > 0, seen  # both kinds of interleaving happened
    assert os.listdir(target.parent) == ["acme.token"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a file as another user (setuid)")
def test_a_file_someone_else_made_first_in_a_sticky_directory_is_not_taken_over(tmp_path: Path) -> None:
    """In a sticky shared directory (/tmp) any user may create the token file's name first. Root
    replacing it must not give the new file that user as owner (the existing owner is kept for
    files in private directories, e.g. a config edited with sudo): it is refused, untouched."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    target = shared / "demo.token"
    dfd = os.open(shared, os.O_RDONLY | os.O_DIRECTORY)  # (tmp_path itself is 0700: no way in for others)
    pid = os.fork()
    if pid == 0:  # another user gets there first
        try:
            os.setgid(65534)
            os.setuid(65534)
            os.close(os.open(target.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dfd))
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    os.close(dfd)
    assert target.stat().st_uid == 65534
    with pytest.raises(PermissionError, match=r"belongs to nobody \(uid 65534\), in a directory every user may add"):
        sinks.write_atomically(str(target), b"SECRET-TOKEN\n")
    assert target.read_bytes() == b"" and target.stat().st_uid == 65534
    assert sorted(os.listdir(shared)) == ["demo.token"]  # no temporary file left
    target.unlink()  # once it is gone, the broker's own file is made, and kept on later writes
    sinks.write_atomically(str(target), b"SECRET-TOKEN\n")
    sinks.write_atomically(str(target), b"NEXT-TOKEN\n")
    st = target.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode), target.read_bytes()) == (os.geteuid(), 0o600, b"NEXT-TOKEN\n")
