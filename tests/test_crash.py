"""kill -9 the daemon while refresh tokens rotate: no login is lost (the long run is bench/crash.py)."""

from __future__ import annotations

import pytest

from tests.crash_daemon import run_crash_loop

pytestmark = pytest.mark.e2e


@pytest.mark.slow
def test_kill_9_while_rotating_loses_no_login() -> None:
    """After every kill the broker's stored access token has expired before dc-token asks, so each
    answer is a new token got with the stored (rotated) refresh token: 12 kills, 12 rotations kept."""
    result = run_crash_loop(12, max_reuse=1, seed=3)
    assert result.lost_logins == 0, result
    assert result.refreshed_after_restart == result.kills, result
