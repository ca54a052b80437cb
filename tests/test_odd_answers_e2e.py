"""End to end against the dev IdP in each standing fault mode (real processes, real sockets): body-less
refusals, an IdP restart that forgets every session, odd token lifetimes, echoed secrets."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import DC_BROKER, dc_token, dev_idp, run, start_run, stop, wait_for

pytestmark = pytest.mark.e2e

SECRETS = '[acme]\npassword = "demo"\nclient_secret = "dc-cli-secret"\n[svc]\nclient_secret = "dc-service-secret"\n'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(tmp: Path, base: str) -> Path:
    cfg = tmp / "config.toml"
    cfg.write_text(
        f"""
[profiles.acme]
server = "{base}"
tenant = "demo"
client_id = "dc-cli"
username = "demo"

[profiles.svc]
server = "{base}"
tenant = "demo"
client_id = "dc-service"
grant = "client_credentials"
"""
    )
    return cfg


def status(sock: str) -> dict[str, dict[str, Any]]:
    out = run([DC_BROKER, "status", "--socket", sock, "--json"])
    assert out.returncode == 0, out.stderr
    return {p["profile"]: p for p in json.loads(out.stdout)["profiles"]}


@pytest.mark.parametrize("body", ["empty", "html", "json"])
def test_a_wrong_password_at_add_exits_8_naming_the_http_status(tmp_path: Path, body: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DC_BROKER_")}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "c"), XDG_DATA_HOME=str(tmp_path / "d"))
    env["DC_BROKER_SOCKET"] = str(tmp_path / "none.sock")
    with dev_idp("--refusal-body", body, "--echo-description") as base:
        args = ["add", "acme", "--server", base, "--tenant", "demo", "--client-id", "dc-cli", "--username", "demo"]
        result = subprocess.run(
            [DC_BROKER, *args, "--password-stdin", "--secret-stdin"],
            input="Wr0ng-Secret-pw\ndc-cli-secret\n",
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
    assert result.returncode == 8, result.stderr
    assert "HTTP 401" in result.stderr and "password of user 'demo'" in result.stderr
    assert "Wr0ng-Secret-pw" not in result.stderr and "dc-cli-secret" not in result.stderr
    assert "Traceback" not in result.stderr and "PROFILE" not in result.stderr


@pytest.mark.parametrize(
    "dead",
    [("--refusal-body", "empty"), ("--dead-refresh-error", "invalid_request")],
    ids=["body-less-refusal", "invalid_request"],
)
def test_an_idp_restart_that_forgets_every_session_is_recovered_within_one_refresh_interval(
    tmp_path: Path, dead: tuple[str, str]
) -> None:
    """The IdP comes back with no memory of any session and says so of the refresh token as OPs do:
    a body-less 400, or ``invalid_request`` where Keycloak says ``invalid_grant``; either way the
    token is dead and the stored password logs in again within one refresh interval."""
    lifespan = 6.0
    port = free_port()
    flags = (*dead, "--access-lifespan", str(lifespan), "--sso-idle", str(lifespan))
    sock = str(tmp_path / "run" / "b.sock")
    with dev_idp(*flags, port=port) as base:
        broker = start_run(write_config(tmp_path, base), sock, SECRETS)
        wait_for(lambda: status(sock)["acme"]["state"] == "fresh", 10, "a fresh acme token", every=0.1)
    try:
        # the IdP is down: the broker's refreshes fail while it is gone (the sleep is the outage itself,
        # not a wait for anything)
        time.sleep(1.0)
        with dev_idp(*flags, port=port):  # back, with no memory of any session
            restarted = time.monotonic()
            before = status(sock)["acme"]["refreshes"]
            wait_for(
                lambda: status(sock)["acme"]["refreshes"] > before,
                lifespan + 2,
                "a refresh after the restart",
                every=0.1,
            )
            assert time.monotonic() - restarted <= lifespan + 2
            st = status(sock)["acme"]
            assert st["state"] == "fresh" and st["last_error"] is None
            got = dc_token(sock, "acme")
            assert got.returncode == 0, got.stderr
    finally:
        assert stop(broker) == 0


@pytest.mark.parametrize("raw", ["NaN", "1e999", "1e18", "absent", "0", "-5"])
def test_every_lifetime_works_in_status_and_every_dc_token_form(tmp_path: Path, raw: str) -> None:
    sock = str(tmp_path / "run" / "b.sock")
    with dev_idp("--expires-in", raw) as base:
        broker = start_run(write_config(tmp_path, base), sock, SECRETS)
        started = time.monotonic()
        try:
            outs = {
                form: dc_token(sock, "svc", *form) for form in [(), ("--header",), ("--json",), ("--exec-credential",)]
            }
            for form, out in outs.items():
                assert out.returncode == 0, (form, out.stderr)
                assert "Traceback" not in out.stderr
            doc = json.loads(outs[("--json",)].stdout)
            assert 0 <= doc["expires_in"] <= 366 * 86400
            cred = json.loads(outs[("--exec-credential",)].stdout)
            stamp = time.mktime(time.strptime(cred["status"]["expirationTimestamp"], "%Y-%m-%dT%H:%M:%SZ"))
            assert stamp - time.timezone >= time.time() - 1  # never in the past
            time.sleep(2.0)  # the window under test: no more IdP requests in it than the floor allows
            st = status(sock)
            elapsed = time.monotonic() - started
            for name in ("acme", "svc"):
                # never more often than the floor (1 s) per profile, whatever the lifetime
                assert st[name]["idp_requests"] <= elapsed + 2, (name, st[name], elapsed)
                assert st[name]["expires_in"] is None or st[name]["expires_in"] <= 366 * 86400
        finally:
            assert stop(broker) == 0


def test_login_and_logout_of_a_client_credentials_profile(tmp_path: Path) -> None:
    sock = str(tmp_path / "run" / "b.sock")
    with dev_idp() as base:
        broker = start_run(write_config(tmp_path, base), sock, SECRETS)
        try:
            assert dc_token(sock, "svc").returncode == 0
            login = run([DC_BROKER, "login", "--socket", sock, "svc"])
            assert login.returncode == 0 and "nothing to log in" in login.stdout, login.stderr
            out = run([DC_BROKER, "logout", "--socket", sock, "svc"])
            assert out.returncode == 0 and "its login revoked at the identity provider" in out.stdout, out.stdout
            assert "client secret forgotten" in out.stdout
            gone = dc_token(sock, "svc")
            assert gone.returncode == 5 and "no client secret stored" in gone.stderr
            acme = run([DC_BROKER, "logout", "--socket", sock, "acme"])
            assert acme.returncode == 0 and "the client secret stays" in acme.stdout, acme.stdout
        finally:
            assert stop(broker) == 0
