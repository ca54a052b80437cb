"""Two defects the system flow showed, as unit tests (no container, no ``systemd`` marker):

* a broker started with no profiles died on the first reload ("Nursery is closed to new arrivals"):
  the sessions' nursery closed as soon as it had no task;
* ``dc-broker add`` through a socket nobody answers (a socket unit whose service cannot start) waited
  60 s and ended in a TimeoutError traceback.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import trio
from click.testing import CliRunner

from dc_broker.cli import cli, talk
from dc_broker.sessions.registry import Sessions
from dc_broker.sessions.states import State
from dc_broker.store import MemoryStore
from tests.conftest import CREDENTIALS, idp_transport, profile, running


async def test_sessions_started_empty_accept_profiles_later(make_idp, autojump_clock) -> None:
    idp = make_idp()
    sessions = Sessions({}, MemoryStore(dict(CREDENTIALS)), idp_transport(idp))
    async with running(sessions.run):
        await trio.sleep(60)  # long after start: the empty set must still take profiles
        added, _, _ = sessions.reload({"demo": profile("demo")})
        assert added == ["demo"]
        token = await sessions.lookup("demo").get()
        assert token.access_token.reveal()
        # removing every profile and adding one again works too
        sessions.reload({})
        await trio.sleep(1)
        sessions.reload({"service": profile("service")})
        await sessions.lookup("service").get()
        assert sessions.lookup("service").state is State.FRESH


def test_add_through_a_socket_nobody_answers_fails_fast_and_clearly(tmp_path: Path, monkeypatch) -> None:
    path = str(tmp_path / "broker.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)  # connections queue, as on a .socket unit whose service fails to start
    monkeypatch.setattr(talk, "HELLO_TIMEOUT", 0.5)
    args = ["add", "demo", "--server", "http://127.0.0.1:1", "--tenant", "demo", "--client-id", "dc-cli"]
    args += ["--username", "demo", "--password-stdin", "--secret-stdin", "--no-verify"]
    args += ["--socket", path, "--config", str(tmp_path / "config.toml"), "--vault", str(tmp_path / "vault.db")]
    t0 = time.monotonic()
    try:
        result = CliRunner().invoke(cli, args, input="demo\ndc-cli-secret\n")
    finally:
        listener.close()
    assert time.monotonic() - t0 < 5
    assert result.exit_code == 3, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "no broker answered in 0.5 s" in result.output and "systemctl status dc-broker.service" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "config.toml").exists()  # nothing half-done


def test_remove_through_a_socket_nobody_answers_fails_fast(tmp_path: Path, monkeypatch) -> None:
    path = str(tmp_path / "broker.sock")
    config = tmp_path / "config.toml"
    config.write_text(
        '[profiles.demo]\nserver = "http://127.0.0.1:1"\ntenant = "demo"\nclient_id = "dc-cli"\nusername = "demo"\n'
    )
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    monkeypatch.setattr(talk, "HELLO_TIMEOUT", 0.5)
    try:
        result = CliRunner().invoke(cli, ["remove", "demo", "--socket", path, "--config", str(config)])
    finally:
        listener.close()
    assert result.exit_code == 3 and "no broker answered" in result.output, result.output
    assert "demo" in config.read_text()
