"""The light-client promise and the console scripts, checked on the real interpreter."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("trio", "httpx", "click", "anyio", "httpcore", "h11", "sniffio", "starlette", "hypercorn", "jwt")


@pytest.mark.parametrize("module", ["dc_token.cli", "dc_token.sync", "dc_token.protocol", "dc_token"])
def test_client_imports_nothing_heavy(module: str) -> None:
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"], capture_output=True, text=True, check=True
    ).stderr
    imported = {line.split("|")[-1].strip().split(".")[0] for line in out.splitlines() if "|" in line}
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_console_scripts_have_help() -> None:
    from tests.e2e import DC_BROKER, DC_TOKEN

    for cmd in (DC_BROKER, DC_TOKEN):
        result = subprocess.run([cmd, "--help"], capture_output=True, text=True, check=True)
        assert "usage" in result.stdout.lower()
