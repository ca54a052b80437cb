"""What starting each command costs in imports (issue 23): the daemon reads its version only when asked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


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


def test_the_default_socket_is_found_as_documented(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dc_token.paths import default_socket_path

    uid = os.getuid()
    assert default_socket_path({"DC_BROKER_SOCKET": "/x/b.sock", "XDG_RUNTIME_DIR": "/r"}) == "/x/b.sock"
    assert default_socket_path({"XDG_RUNTIME_DIR": "/r"}) == "/r/dc-broker/broker.sock"
    assert default_socket_path({"XDG_RUNTIME_DIR": "/r/"}) == "/r/dc-broker/broker.sock"
    run_user = f"/run/user/{uid}"
    expected = (
        os.path.join(run_user, "dc-broker", "broker.sock")
        if os.path.isdir(run_user)
        else f"/t/dc-broker-{uid}/broker.sock"
    )
    assert default_socket_path({"TMPDIR": "/t"}) == expected
    # this process's own environment, as os.environ reads it (a name that is not UTF-8 included)
    odd = str(tmp_path / "s\udcff.sock")
    monkeypatch.setenv("DC_BROKER_SOCKET", odd)
    assert default_socket_path() == odd == os.environ["DC_BROKER_SOCKET"]
    monkeypatch.delenv("DC_BROKER_SOCKET")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_socket_path() == os.path.join(str(tmp_path), "dc-broker", "broker.sock")


def test_dc_token_gets_a_token_without_the_heavy_imports(tmp_path: Path) -> None:
    """The path `$(dc-token PROFILE)` takes, run the way its launcher runs it (python -S, the package's
    own directories on the path, ``dc_token.quick``): a token printed, with nothing of dc-token's
    imported but the quick path's four modules (no class of ours built), and none of what would
    cost it start-up time; the same run with an option goes the full way and still avoids the heavy."""
    from tests.e2e import dev_broker

    client = str(Path(__file__).resolve().parent.parent / "client")
    code = (
        "import sys\n"
        f"sys.path.append({client!r})\n"
        "from dc_token.quick import main\n"
        "status = main()\n"
        "sys.stderr.write(' '.join(sorted(sys.modules)))\n"
        "sys.exit(status)\n"
    )
    heavy = {"os", "socket", "enum", "re", "typing", "collections", "collections.abc", "dataclasses", "datetime"}
    heavy |= {"msgpack", "importlib", "importlib.metadata", "json", "math", "__future__", "struct", "selectors"}
    heavy |= {"dc_token.codes", "dc_token.errors", "dc_token.sync"}  # the 14 error classes, the enum, the client
    quick = {"dc_token", "dc_token.quick", "dc_token.contract", "dc_token.paths", "dc_token.minipack"}
    with dev_broker(tmp_path) as (sock, _, _):
        for argv, ours in ((["demo"], quick), (["demo", "--min-ttl", "1"], None)):
            done = subprocess.run(
                [sys.executable, "-S", "-c", code, *argv],
                capture_output=True,
                text=True,
                env={**os.environ, "DC_BROKER_SOCKET": sock},
                timeout=60,
            )
            assert done.returncode == 0, done.stderr
            assert done.stdout.count(".") == 2  # a JWT
            loaded = set(done.stderr.split())
            assert "dc_token.minipack" in loaded and "_socket" in loaded
            assert not loaded & heavy, sorted(loaded & heavy)
            if ours is not None:
                assert {m for m in loaded if m.startswith("dc_token")} == ours


def test_the_exit_status_of_no_profile_is_unknown_profiles() -> None:
    from dc_token.cli import EXIT_NO_PROFILE
    from dc_token.errors import UnknownProfile

    assert UnknownProfile.exit_code == EXIT_NO_PROFILE
