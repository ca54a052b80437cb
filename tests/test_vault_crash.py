"""kill -9 during token rotation never loses an acknowledged refresh token (the fast CI loop;
bench/vault.py runs the long one and prints how long the kills take: no timing is asserted here,
it failed on a loaded machine without saying anything about the vault)."""

from __future__ import annotations

import random
from pathlib import Path

from tests.vault_writer import kill_loop, new_vault

KILLS = 30


def test_kill_9_never_loses_an_acknowledged_refresh_token(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    path = new_vault(tmp_path)
    report = kill_loop(path, KILLS, random.Random(20240611))
    assert report.kills == KILLS
    assert report.lost == 0
    assert report.integrity_failures == []
    assert report.acknowledged > KILLS  # the writers really were rotating when killed
