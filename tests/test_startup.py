"""What starting each command costs in imports (issue 23): the daemon reads its version only when asked."""

from __future__ import annotations

import subprocess
import sys


def _loaded_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(out.split())


def test_starting_the_daemon_does_not_read_the_package_metadata() -> None:
    # what `dc-broker run` imports before it serves: the command group, the run command, the daemon
    loaded = _loaded_after("import dc_broker.cli, dc_broker.cli.run, dc_broker.daemon")
    assert "dc_broker.serve.ops" in loaded
    assert not loaded & {"importlib.metadata", "zipfile", "csv"}, loaded & {"importlib.metadata", "zipfile", "csv"}


def test_the_version_is_read_when_asked() -> None:
    from dc_token.version import version

    out = subprocess.run(
        [sys.executable, "-c", "import sys; from dc_broker.cli import main; sys.argv[1:] = ['--version']; main()"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out == f"dc-broker {version()}\n" and version() != "0+unknown"
