"""Crash-safety harness for the vault, shared by tests/test_vault_crash.py and bench/vault.py.

As a program (``python -m tests.vault_writer VAULT``) it is the *writer*: it opens a key-file vault,
then rotates one profile's refresh token forever through ``save_tokens`` (each new one = previous + 1)
and prints each counter on its own line only after ``save_tokens`` returned. ``kill_loop`` is the
*parent*: it starts writers, SIGKILLs them at random moments, reopens the vault and checks that the
stored refresh token is at least the last one the writer acknowledged (a lost one would have killed
a rotated login) and that SQLite's integrity check passes.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from dc_broker.secret import Secret
from dc_broker.tokens import TokenSet
from dc_broker.vault import KeyFile, Vault, create_key_file

PROFILE = "rotating"
REPO = Path(__file__).resolve().parent.parent


def token_set(n: int) -> TokenSet:
    now = time.time()
    return TokenSet(
        access_token=Secret(f"access-{n}"),
        obtained_at=now,
        expires_at=now + 1800,
        refresh_token=Secret(f"refresh-{n:012d}"),
        refresh_expires_at=now + 1800,
    )


def counter_of(tokens: TokenSet | None) -> int:
    if tokens is None or tokens.refresh_token is None:
        return 0
    return int(tokens.refresh_token.reveal().removeprefix("refresh-"))


async def _rotate(vault: Vault, n: int) -> None:
    print("ready", n, flush=True)
    while True:
        n += 1
        await vault.save_tokens(PROFILE, token_set(n))
        sys.stdout.write(f"{n}\n")
        sys.stdout.flush()


def writer_main(path: str) -> None:
    vault = Vault.open(path, auto_unlock=True)
    trio.run(_rotate, vault, counter_of(vault.saved_tokens(PROFILE)))


def new_vault(directory: Path) -> Path:
    """A fresh key-file vault in ``directory`` (which must exist, mode 0700)."""
    key = directory / "vault.key"
    create_key_file(str(key))
    path = directory / "vault.db"
    Vault.create(path, KeyFile(str(key))).close()
    return path


@dataclass
class KillReport:
    kills: int = 0
    lost: int = 0  # stored counter < last acknowledged one: a rotated refresh token was lost
    acknowledged: int = 0  # saves acknowledged over all runs
    killed_before_ready: int = 0
    integrity_failures: list[str] = field(default_factory=list)


def _stored(path: Path) -> tuple[int, str]:
    with Vault.open(path, auto_unlock=True) as vault:
        stored = counter_of(vault.saved_tokens(PROFILE))
        check = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            result = str(check.execute("PRAGMA integrity_check").fetchone()[0])
        finally:
            check.close()
    return stored, result


def kill_loop(path: Path, kills: int, rng: random.Random, *, max_delay: float = 0.03) -> KillReport:
    """Start a writer, SIGKILL it after a random delay, verify; ``kills`` times."""
    report = KillReport()
    last_acked, _ = _stored(path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for _ in range(kills):
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.vault_writer", str(path)],
            stdout=subprocess.PIPE,
            cwd=REPO,
            env=env,
        )
        assert proc.stdout is not None
        if rng.random() < 0.1:  # sometimes kill during start-up (open, WAL recovery)
            time.sleep(rng.uniform(0, 0.15))  # the harness's random moment to kill: no event to wait for
            report.killed_before_ready += 1
        else:
            proc.stdout.readline()  # "ready N"
            time.sleep(rng.uniform(0, max_delay))  # a random moment in the writes to kill at
        proc.send_signal(signal.SIGKILL)
        out = proc.stdout.read()
        proc.wait()
        lines = out.split(b"\n")[:-1]  # a line cut by the kill was never acknowledged
        acked = [int(x) for x in lines if x and not x.startswith(b"ready")]
        report.acknowledged += len(acked)
        if acked:
            last_acked = max(last_acked, max(acked))
        stored, integrity = _stored(path)
        report.kills += 1
        if stored < last_acked:
            report.lost += 1
        if integrity != "ok":
            report.integrity_failures.append(integrity)
        last_acked = max(last_acked, stored)
    return report


if __name__ == "__main__":
    writer_main(sys.argv[1])
