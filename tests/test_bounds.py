"""Bounds that protect the broker from its inputs (issue 13, findings 13 and 14): [daemon] limits
applied on SIGHUP (and the settings that need a restart named), and Argon2id costs a vault file may
ask for."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dc_broker.config import DaemonSettings
from dc_broker.daemon import apply_daemon_settings, limits_of
from dc_broker.errors import ConfigError, VaultError
from dc_broker.idp.transport import IdpTransport
from dc_broker.serve.listen import bind_unix_socket
from dc_broker.serve.ops import BrokerState
from dc_broker.serve.server import Server
from dc_broker.sessions.registry import Sessions
from dc_broker.store import MemoryStore
from dc_broker.vault.keysource import MAX_STORED_MEMORY_KIB, KdfParams


def test_sighup_applies_limits_and_names_what_needs_a_restart() -> None:
    state = BrokerState(sessions=Sessions({}, MemoryStore(), IdpTransport()), socket_path="/x")
    old = DaemonSettings()
    server = Server(state, limits=limits_of(old))
    new = DaemonSettings(max_connections_per_uid=7, idle_timeout=12.0, audit_interval=5.0, group="g", socket="/y")
    restart = apply_daemon_settings(server, old, new)
    assert (server.limits.max_connections_per_uid, server.limits.idle_timeout) == (7, 12.0)
    assert state.audit.interval == 5.0
    assert restart == ["socket", "group"]
    assert apply_daemon_settings(server, new, new) == []


@pytest.mark.parametrize(
    ("memory_kib", "iterations", "lanes"),
    [(4 * 1024 * 1024, 3, 4), (MAX_STORED_MEMORY_KIB + 1, 3, 4), (64 * 1024, 64, 4), (64 * 1024, 3, 255)],
)
def test_a_vault_file_cannot_ask_for_an_unbounded_kdf(memory_kib: int, iterations: int, lanes: int) -> None:
    text = json.dumps({"alg": "argon2id", "memory_kib": memory_kib, "iterations": iterations, "lanes": lanes})
    with pytest.raises(VaultError, match="exceed what dc-broker accepts"):
        KdfParams.from_json(text)


def test_the_production_kdf_reads_back() -> None:
    params = KdfParams()
    assert KdfParams.from_json(params.to_json()) == params


def test_the_socket_lock_is_never_opened_through_a_symlink(tmp_path: Path) -> None:
    """A symlink planted at ``<socket>.lock`` (finding 10) is refused, and its target is untouched."""
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    target = tmp_path / "someone-elses-file"
    target.write_text("precious\n")
    os.symlink(target, run / "b.sock.lock")
    with pytest.raises(ConfigError, match="symbolic link"):
        bind_unix_socket(str(run / "b.sock"))
    assert target.read_text() == "precious\n" and not (run / "b.sock").exists()
