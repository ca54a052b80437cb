"""The DOT server fixture: a real Django OAuth Toolkit server in its own process on 127.0.0.1.

The parent binds a listening socket on port 0 and hands it to the child (``--fd``), so the port is
known before the child starts and cannot be taken by anyone else meanwhile. The child migrates a
fresh sqlite DB in the fixture's temp dir, seeds the user and applications and serves with
hypercorn. Only the child imports Django: nothing here touches Django settings.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.integration.dot_idp import HELLO_PATH, TENANT, revoke_path, token_path

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 20.0


@dataclass(frozen=True)
class DotServer:
    """A running DOT server: its base URL (as a profile's ``server``), its DB and its log."""

    base: str
    db: Path
    log: Path
    proc: subprocess.Popen[bytes]

    @property
    def token_url(self) -> str:
        return self.base + token_path()

    @property
    def revoke_url(self) -> str:
        return self.base + revoke_path()

    @property
    def hello_url(self) -> str:
        return self.base + HELLO_PATH

    def query(self, sql: str, *params: object) -> list[tuple[object, ...]]:
        """Read DOT's DB directly (read-only; the server keeps writing it)."""
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5) as db:
            return db.execute(sql, params).fetchall()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _wait_until_serving(server: DotServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"DOT server exited with {server.proc.returncode}:\n{server.log_text()}")
        try:
            # the listening socket exists from the start: a connection waits in the backlog until
            # hypercorn accepts it, so one request with a short timeout is a readiness probe
            if httpx.get(server.hello_url, timeout=2.0).status_code == 401:
                return
        except httpx.HTTPError as exc:
            last = exc
    server.proc.kill()
    server.proc.wait()
    raise RuntimeError(f"DOT server not serving after {timeout} s ({last!r}):\n{server.log_text()}")


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


@pytest.fixture(scope="session")
def dot_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DotServer]:
    with _dot(tmp_path_factory.mktemp("dot")) as server:
        yield server


@pytest.fixture(scope="session")
def dot_oidc_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DotServer]:
    """DOT with OpenID Connect on (``OIDC_ENABLED``, RS256): ID tokens, as DOT issues them."""
    with _dot(tmp_path_factory.mktemp("dot-oidc"), oidc=True) as server:
        yield server


@contextlib.contextmanager
def _dot(tmp: Path, *, oidc: bool = False) -> Iterator[DotServer]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "DOT_IDP_"))}
    if oidc:
        env["DOT_IDP_OIDC"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    log = tmp / "server.log"
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        port = listener.getsockname()[1]
        if oidc:  # DOT names itself in the ID tokens (it would reverse a discovery URL we do not route)
            env["DOT_IDP_ISSUER"] = f"http://127.0.0.1:{port}/auth/realms/{TENANT}"
        cmd = [sys.executable, "-m", "tests.integration.dot_idp.serve", "--db", str(tmp / "db.sqlite3")]
        cmd += ["--fd", str(listener.fileno())]
        with open(log, "wb") as out:  # a file, not a pipe: a chatty server must never block on a full pipe
            proc = subprocess.Popen(
                cmd,
                pass_fds=(listener.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                env=env,
            )
    finally:
        listener.close()  # the child has its own copy; once it dies, connections are refused
    server = DotServer(f"http://127.0.0.1:{port}", tmp / "db.sqlite3", log, proc)
    _wait_until_serving(server, STARTUP_TIMEOUT)
    try:
        yield server
    finally:
        code = _stop(proc)
    assert code == 0, f"DOT server exited with {code}:\n{server.log_text()}"
