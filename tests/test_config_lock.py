# ruff: noqa: F811 - the home fixture comes from tests.test_cli
"""One writer for config changes (issue 22, finding 6): `dc-broker add`, `set` and `remove` read,
change and write config.toml (and the vault's matching change) under one lock, and a failed add
undoes only its own change. Real processes against a real running broker."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from dc_broker.config.edit import config_lock, set_profile_values
from dc_broker.config.load import load_config
from dc_broker.vault import Vault
from tests.e2e import DC_BROKER, stop, wait_for, wait_for_socket
from tests.test_cli import cli, home  # noqa: F401 - the home fixture
from tests.test_cli_profiles import config_file, init_default_keyfile

pytestmark = pytest.mark.e2e

ADDS = 50


def _add_args(name: str) -> list[str]:
    return [DC_BROKER, "add", name, "--token-url", "https://sso.example.com/token", "--client-id", name,
            "--grant", "client_credentials", "--secret-stdin", "--no-verify"]  # fmt: skip


def _reading_stdin(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return "pipe" in f.read()
    except OSError:
        return False


def test_50_concurrent_adds_against_a_running_broker_lose_no_profile(home: dict[str, str], tmp_path: Path) -> None:
    init_default_keyfile(home, tmp_path)
    sock = home["DC_BROKER_SOCKET"]
    log = (tmp_path / "daemon.log").open("w")  # a file, not a pipe nobody reads: a full pipe stops the daemon
    daemon = subprocess.Popen([DC_BROKER, "run"], env=home, stdout=log, stderr=log, text=True)
    try:
        wait_for_socket(sock, daemon)
        names = [f"p{i:02d}" for i in range(ADDS)]
        procs = [
            subprocess.Popen(
                _add_args(n), env=home, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            for n in names
        ]
        # all 50 wait at their secret's prompt (reading stdin); then all go at once into the change
        wait_for(lambda: all(_reading_stdin(proc.pid) for proc in procs), 120, "50 adds waiting on stdin")
        for n, proc in zip(names, procs, strict=True):
            assert proc.stdin is not None
            proc.stdin.write(f"secret-of-{n}\n")
            proc.stdin.flush()
        for n, proc in zip(names, procs, strict=True):
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, (n, err)
            assert out.startswith(f"Added profile {n} ")
        assert sorted(load_config(str(config_file(tmp_path))).profiles) == names
        status = cli(home, "status", "--json")
        assert status.returncode == 0, status.stderr
        import json

        assert sorted(p["profile"] for p in json.loads(status.stdout)["profiles"]) == names
    finally:
        assert stop(daemon) == 0
        log.close()
    with Vault.open(str(tmp_path / "data" / "dc-broker" / "vault.db"), auto_unlock=True) as vault:
        for n in names:
            secret = vault.credentials(n).client_secret
            assert secret is not None and secret.reveal() == f"secret-of-{n}"


def test_a_failed_add_undoes_only_its_own_change(home: dict[str, str], tmp_path: Path) -> None:
    """The broker refuses the add's secrets after the config was written (it serves another config
    file, so it does not know the profile): the add takes back its profile, and every other byte of
    the file is as it was."""
    init_default_keyfile(home, tmp_path)
    cfg = config_file(tmp_path)
    cfg.parent.mkdir(parents=True, exist_ok=True)
    hand = (
        '# written by hand\n[profiles.kept]\ntoken_url = "https://sso.example.com/token"  # hi\n'
        'client_id = "k"\ngrant = "client_credentials"\n'
    )
    cfg.write_text(hand)
    other = tmp_path / "other.toml"
    other.write_text("")
    sock = home["DC_BROKER_SOCKET"]
    daemon = subprocess.Popen([DC_BROKER, "run", "--config", str(other)], env=home, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_for_socket(sock, daemon)
        added = subprocess.run(_add_args("new"), env=home, input="s\n", capture_output=True, text=True, timeout=60)
        assert added.returncode == 4, added.stderr
        assert "no profile named 'new'" in added.stderr, added.stderr
        assert cfg.read_text() == hand
    finally:
        assert stop(daemon) == 0


def test_the_rollback_keeps_a_change_made_after_its_own(tmp_path: Path) -> None:
    """Undo = take back this add's profile, not "write back the file as it was before": an edit made
    in between (by hand, which takes no lock) stays."""
    from dc_broker.cli.files import _undo
    from dc_broker.config import Profile
    from dc_broker.config.edit import add_profile

    cfg = tmp_path / "config.toml"
    kept = '[profiles.kept]\ntoken_url = "https://x.example/t"\nclient_id = "k"\ngrant = "client_credentials"\n'
    cfg.write_text(kept)
    new = Profile(name="new", token_url="https://x.example/t", client_id="n", grant="client_credentials")
    add_profile(str(cfg), new)
    cfg.write_text(cfg.read_text().replace('client_id = "k"', 'client_id = "k2"'))  # someone edits meanwhile
    _undo(str(cfg), "new", None)
    assert cfg.read_text() == kept.replace('client_id = "k"', 'client_id = "k2"')  # the edit, and nothing of new's
    assert set(load_config(str(cfg)).profiles) == {"kept"}
    assert load_config(str(cfg)).profiles["kept"].client_id == "k2"


def test_the_lock_holds_off_another_writer_until_released(tmp_path: Path) -> None:
    """A `dc-broker set` started while another process holds the lock waits, then applies its change
    to the file as the holder left it (no lost update)."""
    cfg = tmp_path / "config.toml"
    cfg.write_text('[profiles.a]\ntoken_url = "https://x.example/t"\nclient_id = "a"\ngrant = "client_credentials"\n')
    with config_lock(str(cfg)):
        waiting = subprocess.Popen([DC_BROKER, "set", "--config", str(cfg), "--socket", str(tmp_path / "none"), "a",
                                    "scope=openid"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        with pytest.raises(subprocess.TimeoutExpired):
            waiting.wait(1.0)  # it waits for the lock
        set_profile_values(str(cfg), "a", {"client_id": "changed-while-locked"})  # re-entrant for the holder
    _out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, err
    profile = load_config(str(cfg)).profiles["a"]
    assert (profile.client_id, profile.scope) == ("changed-while-locked", "openid")  # both changes kept
