"""dc-broker's management CLI as a user runs it: real processes, a real dev IdP, a real vault.
Exact exit codes and messages for the failures a person will meet."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import DC_BROKER, dc_token, stop, wait_for_socket

pytestmark = pytest.mark.e2e


@pytest.fixture
def home(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DC_BROKER_")}
    env.update(
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        XDG_DATA_HOME=str(tmp_path / "data"),
        DC_BROKER_SOCKET=str(tmp_path / "run" / "broker.sock"),
    )
    return env


def cli(env: dict[str, str], *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([DC_BROKER, *args], input=stdin, capture_output=True, text=True, env=env, timeout=60)


def add_demo(
    env: dict[str, str], idp: str, name: str = "acme", password: str = "demo", vault_passphrase: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`dc-broker add` for the demo user; a locked vault's passphrase is the third line of stdin."""
    return cli(
        env,
        "add",
        name,
        "--server",
        idp,
        "--tenant",
        "demo",
        "--client-id",
        "dc-cli",
        "--username",
        "demo",
        "--password-stdin",
        "--secret-stdin",
        stdin=f"{password}\ndc-cli-secret\n" + (f"{vault_passphrase}\n" if vault_passphrase else ""),
    )


def on_a_terminal(env: dict[str, str], *args: str, answer: str) -> tuple[int, bytes]:
    """Run dc-broker on a pseudo-terminal, type ``answer`` at its first prompt; (exit status, all it showed)."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen([DC_BROKER, *args], env=env, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    shown = b""
    try:
        while b": " not in shown:
            shown += os.read(master, 4096)
        os.write(master, answer.encode() + b"\n")
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the program closed the terminal
                break
            if not chunk:
                break
            shown += chunk
        return proc.wait(20), shown
    finally:
        os.close(master)


def init_keyfile(env: dict[str, str], tmp: Path) -> None:
    result = cli(env, "init", "--key-source", "keyfile", "--key-file", str(tmp / "key"))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("where", ["/proc/nope/key", "/proc/self/key"], ids=["missing", "not-creatable"])
def test_init_with_a_key_file_where_none_can_be_is_one_clear_error(home: dict[str, str], where: str) -> None:
    result = cli(home, "init", "--key-source", "keyfile", "--key-file", where)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"Error: the key file's directory {os.path.dirname(where)} ")


def test_add_list_remove_without_a_daemon(idp: str, home: dict[str, str], tmp_path: Path) -> None:
    init_keyfile(home, tmp_path)
    result = add_demo(home, idp)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Added profile acme (") and result.stdout.endswith(
        "Next: `dc-broker run` (or `systemctl --user start dc-broker`), then `dc-token acme`\n"
    )
    listed = cli(home, "list")
    assert listed.returncode == 0 and listed.stdout.startswith("acme  password")
    config = (tmp_path / "config" / "dc-broker" / "config.toml").read_text()
    assert "demo" in config and "dc-cli-secret" not in config  # the username is there, secrets never
    assert oct(os.stat(tmp_path / "config" / "dc-broker" / "config.toml").st_mode & 0o777) == "0o600"
    duplicate = add_demo(home, idp)
    assert duplicate.returncode == 2
    assert "Error: profile 'acme' already exists in" in duplicate.stderr
    assert "replace it with `dc-broker add --force acme ...`" in duplicate.stderr
    assert "or remove it with `dc-broker remove acme`" in duplicate.stderr
    removed = cli(home, "remove", "acme")
    assert (removed.returncode, removed.stdout) == (
        0,
        "Removed profile acme (no broker running: its login was not revoked at the identity provider).\n",
    )
    unknown = cli(home, "remove", "acme")
    assert unknown.returncode == 4  # the exit status of "unknown profile" in every command (dc-token's too)
    assert "Error: no profile named 'acme' in" in unknown.stderr and "`dc-broker list`" in unknown.stderr


def test_wrong_password_at_add_is_refused_and_nothing_is_stored(idp: str, home: dict[str, str], tmp_path: Path) -> None:
    init_keyfile(home, tmp_path)
    result = add_demo(home, idp, password="wrong")
    assert result.returncode == 8
    assert (
        "the identity provider refused the password of user 'demo' (HTTP 401: invalid_grant: Invalid user credentials)"
        in result.stderr
    )
    assert "wrong" not in result.stderr.replace("wrong password", "")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "config" / "dc-broker" / "config.toml").exists()  # nothing was written


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ("ftp://sso.example.com", "is not an http(s) URL"),
        ("http://sso.example.com", "uses plain http to a non-loopback host; use https"),
        ("not a url", "is not an http(s) URL"),
    ],
)
def test_bad_url(home: dict[str, str], server: str, message: str) -> None:
    result = cli(
        home, "add", "x", "--server", server, "--tenant", "t", "--client-id", "c", "--username", "u", "--no-verify"
    )
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_unreachable_idp_at_add(home: dict[str, str], tmp_path: Path) -> None:
    init_keyfile(home, tmp_path)
    result = cli(
        home,
        "add",
        "x",
        "--server",
        "http://127.0.0.1:9",
        "--tenant",
        "t",
        "--client-id",
        "c",
        "--username",
        "u",
        "--password-stdin",
        "--secret-stdin",
        stdin="p\ns\n",
    )
    assert result.returncode == 7
    assert "could not verify profile 'x'" in result.stderr and "--no-verify" in result.stderr


def test_missing_config(home: dict[str, str], tmp_path: Path) -> None:
    result = cli(home, "list", "--config", str(tmp_path / "nope.toml"))
    assert (result.returncode, result.stdout) == (2, "")
    assert (
        result.stderr
        == f"Error: config file {tmp_path / 'nope.toml'} does not exist; create it or run `dc-broker add`\n"
    )


def test_unreadable_vault(idp: str, home: dict[str, str], tmp_path: Path) -> None:
    vault = tmp_path / "data" / "dc-broker" / "vault.db"
    vault.parent.mkdir(parents=True, mode=0o700)
    vault.write_bytes(b"this is not a vault")
    vault.chmod(0o600)
    result = add_demo(home, idp)
    assert result.returncode == 2
    assert str(vault) in result.stderr and "Traceback" not in result.stderr


def test_daemon_not_running(home: dict[str, str]) -> None:
    sock = home["DC_BROKER_SOCKET"]
    for args in (["unlock", "--passphrase-stdin"], ["lock"], ["status"], ["logout", "acme"]):
        result = cli(home, *args, stdin="x\n")
        assert result.returncode == 3, args
        assert result.stderr.startswith(f"Error: no dc-broker is running on {sock}"), result.stderr
        assert "dc-broker run" in result.stderr


def test_passphrase_vault_locked_daemon_unlock_lock_restart(idp: str, home: dict[str, str], tmp_path: Path) -> None:
    assert cli(home, "init", "--passphrase-stdin", stdin="correct horse\n").returncode == 0
    vault = tmp_path / "data" / "dc-broker" / "vault.db"
    assert oct(vault.stat().st_mode & 0o777) == "0o600" and oct(vault.parent.stat().st_mode & 0o777) == "0o700"
    added = add_demo(home, idp, vault_passphrase="correct horse")
    assert added.returncode == 0, added.stderr
    sock = home["DC_BROKER_SOCKET"]

    def start() -> subprocess.Popen[str]:
        proc = subprocess.Popen([DC_BROKER, "run"], env=home, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for_socket(sock, proc)
        return proc

    daemon = start()
    try:
        locked = dc_token(sock, "acme")
        assert locked.returncode == 6 and "run `dc-broker unlock`" in locked.stderr
        wrong = cli(home, "unlock", "--passphrase-stdin", stdin="wrong\n")
        assert wrong.returncode == 6 and "Traceback" not in wrong.stderr
        assert cli(home, "unlock", "--passphrase-stdin", stdin="correct horse\n").returncode == 0
        first = dc_token(sock, "acme")
        assert first.returncode == 0, first.stderr
        assert cli(home, "lock").returncode == 0
        assert dc_token(sock, "acme").returncode == 6
        no_terminal = cli(home, "unlock")  # a passphrase vault, no flag and no terminal to ask on
        assert no_terminal.returncode == 2 and "pass it on stdin" in no_terminal.stderr
        code, shown = on_a_terminal(home, "unlock", answer="correct horse")  # the prompt a person sees
        assert code == 0 and b"Vault passphrase:" in shown and b"Unlocked" in shown and b"correct" not in shown
        assert dc_token(sock, "acme").stdout == first.stdout  # restored from the vault, no new login
        # a profile added while the daemon runs works at once, no restart
        second = add_demo(home, idp, name="beta")
        assert second.returncode == 0 and "secrets are in the running broker" in second.stdout
        assert dc_token(sock, "beta").returncode == 0
    finally:
        assert stop(daemon) == 0
    daemon = start()
    try:
        assert cli(home, "unlock", "--passphrase-stdin", stdin="correct horse\n").returncode == 0
        assert dc_token(sock, "acme").stdout == first.stdout  # a restart serves the stored token at once
        out = cli(home, "logout", "acme")
        assert out.returncode == 0 and out.stdout.startswith(
            "Logged out of profile acme: its session at the identity provider ended"
        )
        gone = dc_token(sock, "acme")
        assert gone.returncode == 5 and "dc-broker login acme" in gone.stderr
    finally:
        assert stop(daemon) == 0
    err = daemon.stderr.read() if daemon.stderr else ""
    for secret in ("correct horse", "dc-cli-secret", first.stdout.strip()):
        assert secret not in err


def test_add_with_issuer_to_a_running_broker_works_at_once(idp: str, home: dict[str, str], tmp_path: Path) -> None:
    init_keyfile(home, tmp_path)
    sock = home["DC_BROKER_SOCKET"]
    daemon = subprocess.Popen([DC_BROKER, "run"], env=home, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_socket(sock, daemon)
        args = ["add", "iss", "--issuer", f"{idp}/realms/demo", "--client-id", "dc-cli", "--username", "demo"]
        added = cli(home, *args, "--password-stdin", "--secret-stdin", stdin="demo\ndc-cli-secret\n")
        assert added.returncode == 0, added.stderr
        got = dc_token(sock, "iss")
        assert got.returncode == 0, got.stderr
        removed = cli(home, "remove", "iss")
        assert removed.returncode == 0 and "revoked at the identity provider" in removed.stdout, removed.stdout
    finally:
        assert stop(daemon) == 0
    # forgotten, not only logged out: the client secret a logout keeps is gone from the vault too
    from dc_broker.vault import default_vault_path

    with contextlib.closing(sqlite3.connect(default_vault_path(home))) as vault:
        held = vault.execute("SELECT field FROM records WHERE profile = 'iss'").fetchall()
        named = vault.execute("SELECT name FROM profiles WHERE name = 'iss'").fetchall()
    assert (held, named) == ([], [])


# ---------------------------------------------------------------- a broker slower than the command's patience


@pytest.fixture
def busy_broker(tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """A broker on a real socket that answers ``hello`` and takes every other op without ever
    answering it (as one waiting on a slow IdP); (its socket, the ops it was sent)."""
    import socket

    from dc_token.protocol import NEED_DATA, FrameDecoder, reply_frame
    from tests.sockets import accept_in_thread, each_in_thread

    path = str(tmp_path / "busy.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(8)
    ops: list[str] = []
    held: list[socket.socket] = []

    def serve(conn: socket.socket) -> None:
        held.append(conn)
        decoder = FrameDecoder()
        while True:
            frame = decoder.next_frame()
            if frame is NEED_DATA:
                data = conn.recv(65536)
                if not data:
                    return
                decoder.receive_data(data)
                continue
            assert isinstance(frame, dict)
            ops.append(frame["op"])
            if frame["op"] == "hello":
                conn.sendall(reply_frame(frame["id"], {"server": "dc-broker", "protocol": frame["v"]}))

    accept_in_thread(listener, each_in_thread(serve))
    try:
        yield path, ops
    finally:
        listener.close()
        for conn in held:
            conn.close()


def dc_broker_here(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int | str | None, str]:
    """`dc-broker ARGS` in this process (so its timeouts can be patched): (exit status, stderr)."""
    import sys

    from dc_broker.cli import main

    monkeypatch.setattr(sys, "argv", ["dc-broker", *args])
    with pytest.raises(SystemExit) as done:
        main()
    return done.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "op"),
    [(["lock"], "lock"), (["logout", "acme"], "logout for profile 'acme'")],
    ids=["lock", "logout"],
)
def test_an_op_the_broker_took_and_did_not_answer_in_time_may_still_complete(
    busy_broker: tuple[str, list[str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    op: str,
) -> None:
    """The broker answered (it runs) and took the op: no answer in time is not "not running" (exit 3,
    "start it"), but "it may still complete it" with the exit status for "unavailable, retry" (7)."""
    from dc_broker.cli import talk

    path, ops = busy_broker
    monkeypatch.setattr(talk, "SLOW_ANSWER_TIMEOUT", 0.5)
    status, err = dc_broker_here(monkeypatch, capsys, *args, "--socket", path)
    assert (status, err) == (
        7,
        f"Error: the broker took longer than 0.5 s to answer {op}; it may still complete it: check with "
        "`dc-broker status`\n",
    )
    assert ops == ["hello", args[0]]


def test_a_socket_that_no_broker_answers_on_is_still_no_broker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """ "Not running" (exit 3) stays for a socket nobody listens on, and for one something accepts on
    but no broker answers (a socket unit whose service cannot start): the slow op is never sent."""
    import socket

    from dc_broker.cli import talk

    nobody = str(tmp_path / "none.sock")
    status, err = dc_broker_here(monkeypatch, capsys, "lock", "--socket", nobody)
    assert status == 3 and err.startswith(f"Error: no dc-broker is running on {nobody}"), err
    silent = socket.socket(socket.AF_UNIX)  # listens, never accepts: the kernel's backlog takes the connection
    silent.bind(str(tmp_path / "silent.sock"))
    silent.listen(8)
    monkeypatch.setattr(talk, "HELLO_TIMEOUT", 0.3)
    try:
        status, err = dc_broker_here(monkeypatch, capsys, "lock", "--socket", str(tmp_path / "silent.sock"))
    finally:
        silent.close()
    assert status == 3, err
    assert err.startswith(f"Error: {tmp_path / 'silent.sock'} accepted the connection but no broker answered in 0.3 s")


def test_slow_ops_wait_longer_than_the_broker_may_rightly_take() -> None:
    """What `lock`, `unlock`, `rotate`/`add` (set_secrets) and `logout` wait for is bounded by the
    broker's own limits; the command's patience must exceed each (so a change to them cannot
    silently undercut it), while a quick op stays short."""
    from dc_broker.cli.talk import HELLO_TIMEOUT, answer_timeout
    from dc_broker.idp.transport import Timeouts
    from dc_broker.sessions.registry import LOCK_SETTLE_LIMIT
    from dc_broker.vault.records import unlock_delay

    t = Timeouts()
    grant = max(t.patient_total, t.total)  # one request at the IdP, a token grant read patiently
    longest = {
        "lock": LOCK_SETTLE_LIMIT * 2,  # behind another lock's settling, then its own
        "unlock": LOCK_SETTLE_LIMIT + unlock_delay(100),  # behind a lock's settling, then a wrong passphrase's delay
        "set_secrets": grant,  # a grant that checks the new secret (rotate, add --verify)
        "logout": grant * 2,  # a stalled refresh holding the login lock, then ending the login at the IdP
        "login": grant * 2,
    }
    for op, bound in longest.items():
        assert answer_timeout(op) > bound, op
    for op in ("hello", "status", "token"):
        assert answer_timeout(op) <= 60, op
    assert HELLO_TIMEOUT < 60


def test_an_add_taken_back_through_a_config_link_leaves_the_link_as_it_was(
    busy_broker: tuple[str, list[str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A config that is a link to a file not made yet (a dotfile manager's): the add writes the
    target; when the running broker then fails it (here: no answer to its reload), the add is taken
    back: the file it made goes, and the link stays, as it was."""
    from dc_broker.cli import talk

    path, ops = busy_broker
    target = tmp_path / "dotfiles" / "config.toml"
    target.parent.mkdir()
    link = tmp_path / "config.toml"
    link.symlink_to(target)
    monkeypatch.setattr(talk, "ANSWER_TIMEOUT", 0.3)
    status, err = dc_broker_here(
        monkeypatch, capsys, "add", "dev1", "--config", str(link), "--socket", path, "--server",
        "https://sso.example.com", "--tenant", "t", "--client-id", "c", "--grant", "device", "--no-verify",
    )  # fmt: skip
    assert status != 0 and "Traceback" not in err, err
    assert ops[-1] == "reload"
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert not target.exists()
