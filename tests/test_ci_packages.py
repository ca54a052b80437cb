"""`.ci/packages` (run by `make test` before pytest): a package lock another process holds (unattended
upgrades, a colleague's apt-get) is waited for, not a failed run. Here with stand-ins on a PATH of
their own: a machine that lacks the packages, an apt-get that finds the lock held twice."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

APT_GET = """#!/bin/bash
echo "$*" >> "$CALLS"
n=$(wc -l < "$CALLS")
if [ "$n" -le 2 ]; then
    echo "E: Could not get lock /var/lib/dpkg/lock-frontend. It is held by process 4242 (unattended-upgr)" >&2
    exit 100
fi
exit 0
"""


def test_a_held_package_lock_is_waited_for_and_the_install_goes_on(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "grep", "id", "sleep", "wc", "cat"):
        found = shutil.which(tool)
        assert found is not None, tool
        (bin_dir / tool).symlink_to(found)
    (bin_dir / "apt-get").write_text(APT_GET)
    (bin_dir / "apt-get").chmod(0o755)
    calls = tmp_path / "calls"
    calls.touch()
    env = {"PATH": str(bin_dir), "CALLS": str(calls), "DC_PACKAGES_RETRY_SLEEP": "0.1", "CI": "true"}
    done = subprocess.run(
        [str(bin_dir / "bash"), str(ROOT / ".ci" / "packages")], env=env, capture_output=True, text=True, timeout=60
    )
    if os.geteuid() != 0:  # without root it installs nothing, and says so; the waiting is not tested
        assert done.returncode == 0 and "needs root and apt-get" in done.stderr, done.stderr
        assert calls.read_text() == ""
        pytest.skip("needs root: without it .ci/packages installs nothing, so the lock is never waited for")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("another process holds the package lock; waiting") == 2, done.stderr
    sent = calls.read_text().splitlines()
    assert len(sent) == 4 and "update" in sent[2] and "install" in sent[3], sent
    assert "systemd-container" in sent[3] and "gnome-keyring" in sent[3]
