"""End to end against DOT: `dc-broker run` as a real process, dc-token on its socket, DOT's protected view."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dc_token.sync import TokenClient
from tests.e2e import dc_token, start_run, stop, wait_for, wait_for_socket
from tests.integration.conftest import DotServer
from tests.integration.dot_idp import (
    ACCESS_LIFETIME,
    PASSWORD,
    PASSWORD_CLIENT_ID,
    PASSWORD_CLIENT_SECRET,
    SERVICE_CLIENT_ID,
    SERVICE_CLIENT_SECRET,
    TENANT,
    USERNAME,
)
from tests.integration.helpers import bearer

pytestmark = pytest.mark.integration

SECRETS = (
    f'[acme]\npassword = "{PASSWORD}"\nclient_secret = "{PASSWORD_CLIENT_SECRET}"\n'
    f'[svc]\nclient_secret = "{SERVICE_CLIENT_SECRET}"\n'
)


def write_config(tmp: Path, base: str) -> Path:
    cfg = tmp / "config.toml"
    cfg.write_text(
        f"""
[profiles.acme]
server = "{base}"
tenant = "{TENANT}"
client_id = "{PASSWORD_CLIENT_ID}"
username = "{USERNAME}"

[profiles.svc]
server = "{base}"
tenant = "{TENANT}"
client_id = "{SERVICE_CLIENT_ID}"
grant = "client_credentials"
auth_method = "post"
"""
    )
    return cfg


@pytest.fixture
def daemon(dot_server: DotServer, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    sock = str(tmp_path / "r" / "s.sock")
    proc = start_run(write_config(tmp_path, dot_server.base), sock, SECRETS, wait=False)
    try:
        wait_for_socket(sock, proc)
        yield sock, proc
    finally:
        stop(proc, signal.SIGTERM)


def hello(server: DotServer, token: str | None = None) -> httpx.Response:
    return httpx.get(server.hello_url, headers=bearer(token) if token else {}, timeout=10)


def test_dc_token_through_the_daemon(dot_server: DotServer, daemon: tuple[str, subprocess.Popen[str]]) -> None:
    sock, proc = daemon
    result = dc_token(sock, "acme")
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    token = result.stdout.strip()
    ok = hello(dot_server, token)
    assert (ok.status_code, ok.json()) == (200, {"hello": USERNAME})
    assert hello(dot_server).status_code == 401
    assert hello(dot_server, token + "x").status_code == 401

    svc = dc_token(sock, "svc")
    assert svc.returncode == 0, svc.stderr
    assert hello(dot_server, svc.stdout.strip()).status_code == 200

    # the daemon refreshes ahead of expiry with the rotated refresh token; DOT then revokes the
    # previous access token at once (Keycloak would let it live to its exp)
    with TokenClient(sock) as client:
        wait_for(
            lambda: client.status("acme")["profiles"][0]["refreshes"] >= 2,
            ACCESS_LIFETIME + 5,
            "a second refresh",
            every=0.1,
        )
        status = client.status("acme")["profiles"][0]
    assert status["state"] == "fresh" and status["last_error"] is None
    assert status["idp_requests"] == status["refreshes"]  # the refresh token worked: no fallback to the password
    again = dc_token(sock, "acme")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() != token
    assert hello(dot_server, again.stdout.strip()).status_code == 200
    assert hello(dot_server, token).status_code == 401

    assert stop(proc, signal.SIGTERM) == 0
    err = proc.stderr.read() if proc.stderr else ""
    assert "Traceback" not in err
    for secret in (PASSWORD, PASSWORD_CLIENT_SECRET, SERVICE_CLIENT_SECRET, token):
        assert secret not in err
