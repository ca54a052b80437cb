"""End to end against the dev IdP in each standing fault mode (real processes, real sockets): body-less
refusals, an IdP restart that forgets every session, odd token lifetimes, echoed secrets; and what
`dc-broker login`, `logout` and `rotate` say when the IdP is down or refuses, next to what dc-token says."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from dc_token.errors import UpstreamUnavailable, hint_for
from tests.e2e import DC_BROKER, dc_token, dev_idp, run, start_run, stop, wait_for
from tests.test_sessions_e2e import jwt_exp

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


def test_a_jwt_without_expires_in_lives_by_its_exp_and_is_noted_once_per_profile(tmp_path: Path) -> None:
    """An OP that answers without ``expires_in``: the access token's own ``exp`` gives its lifetime (not
    the 300 s default, which the note would name), dc-token says so, and the broker notes the odd
    answer once per profile, however many such answers come (acme's login brings a second one)."""
    lifespan = 120
    sock = str(tmp_path / "run" / "b.sock")
    with dev_idp("--no-expires-in", "--access-lifespan", str(lifespan)) as base:
        broker = start_run(write_config(tmp_path, base), sock, SECRETS)
        try:
            wait_for(lambda: status(sock)["acme"]["state"] == "fresh", 20, "a fresh acme token", every=0.1)
            again = run([DC_BROKER, "login", "--socket", sock, "acme", "--password-stdin"], input="demo\n")
            assert again.returncode == 0, again.stderr
            for name in ("acme", "svc"):
                out = dc_token(sock, name, "--json")
                assert out.returncode == 0, out.stderr
                doc = json.loads(out.stdout)
                left = jwt_exp(doc["token"]) - time.time()
                assert 0 < doc["expires_in"] <= lifespan, doc
                # the broker's expiry never outlasts the JWT's (whole-second iat: up to 1 s sooner)
                assert left - 2 <= doc["expires_in"] <= left + 0.5, (doc["expires_in"], left)
                assert 0 < status(sock)[name]["expires_in"] <= lifespan
        finally:
            assert stop(broker) == 0
    assert broker.stderr is not None
    log = broker.stderr.read()
    for name in ("acme", "svc"):
        said = f"profile {name}: the identity provider's answer is odd: "
        noted = [line.split(said, 1)[1] for line in log.splitlines() if said in line]
        assert noted == [f"expires_in absent: the access token's own exp gives {lifespan} s"], log


# ---------------------------------------------------------------- login, logout, rotate: IdP down or refusing

#: what no command may say about an IdP that is down: it is not a bug of ours
NOT_A_BUG = ("bug in dc-broker", "UpstreamTransient", "Traceback")


@contextmanager
def answering_503() -> Iterator[str]:
    """The front of an IdP that is down (a reverse proxy with no backend): 503 and an HTML page to
    every request, as nginx says it. Yields its base URL."""

    class Down(BaseHTTPRequestHandler):
        def answer(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = b"<html><body><h1>503 Service Temporarily Unavailable</h1></body></html>"
            self.send_response(503)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = answer

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Down)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@contextmanager
def idp_down(how: str) -> Iterator[tuple[str, str]]:
    """(base URL, HOST:PORT) of an IdP that is down: a front answering 503, or nothing listening."""
    if how == "503":
        with answering_503() as base:
            yield base, base.removeprefix("http://")
    else:
        port = free_port()
        yield f"http://127.0.0.1:{port}", f"127.0.0.1:{port}"


def with_devices(cfg: Path, base: str) -> Path:
    cfg.write_text(
        cfg.read_text()
        + f'\n[profiles.dev]\nserver = "{base}"\ntenant = "demo"\nclient_id = "dc-public"\n'
        + 'grant = "device"\nauth_method = "none"\n'
    )
    return cfg


def error_lines(message: str, profile: str) -> str:
    """What `dc-broker` prints for an ``UpstreamUnavailable`` with ``message`` (the boundary's form)."""
    hint = hint_for(UpstreamUnavailable(message), profile)
    return f"Error: {message}\n" + (f"  {hint}\n" if hint else "")


@pytest.mark.parametrize("how", ["503", "refused"])
def test_login_and_rotate_while_the_idp_is_down_say_what_dc_token_says(tmp_path: Path, how: str) -> None:
    """`dc-broker login` (a password from stdin, a device login) and `rotate` while the IdP is down:
    exit 7 (unavailable, retry), the message dc-token gives for the same outage, and the same hint
    after it; never "a bug in dc-broker" (issue 19, Build 8). Down as a front that answers 503, or as
    nothing listening at its port."""
    sock = str(tmp_path / "run" / "b.sock")
    with idp_down(how) as (base, where):
        cfg = with_devices(write_config(tmp_path, base), base)
        broker = start_run(cfg, sock, SECRETS)
        try:
            token = dc_token(sock, "acme")
            assert token.returncode == 7, token.stderr
            said = "dc-token: profile 'acme': "
            assert token.stderr.startswith(said) and token.stderr.endswith("\n"), token.stderr
            cause = token.stderr[len(said) : -1].removesuffix(f"; {UpstreamUnavailable.hint}")
            hint = hint_for(UpstreamUnavailable(f"profile 'acme': {cause}"), "acme")
            if how == "503":
                assert (cause, hint) == ("identity provider answered HTTP 503", UpstreamUnavailable.hint)
            else:  # the message says where nothing answers (and may then say what to check instead of a hint)
                assert where in cause, token.stderr
            assert token.stderr == f"{said}{cause}" + (f"; {hint}" if hint else "") + "\n"

            login = run([DC_BROKER, "login", "--socket", sock, "acme", "--password-stdin"], input="demo\n")
            device = run([DC_BROKER, "login", "--socket", sock, "dev"])
            rotate = run(
                [DC_BROKER, "rotate", "--config", str(cfg), "--socket", sock, "acme", "--password-stdin"],
                input="Rotated-pw-3\n",
            )
            assert (login.returncode, login.stdout) == (7, ""), login.stderr
            assert login.stderr == error_lines(f"profile 'acme': {cause}", "acme")
            assert (device.returncode, device.stdout) == (7, ""), device.stderr
            assert device.stderr == error_lines(f"profile 'dev': {cause}", "dev")
            assert (rotate.returncode, rotate.stdout) == (7, ""), rotate.stderr
            # an IdP that is down refused nothing: no "again with the right one", and the hint follows
            assert rotate.stderr == error_lines(
                f"could not check the new credentials of profile 'acme': {cause}; nothing changed "
                "(--no-verify stores it without the check)",
                "acme",
            )
            if how == "503":
                assert rotate.stderr.endswith(f"\n  {UpstreamUnavailable.hint}\n")
            for out in (token, login, device, rotate):
                assert not any(bad in out.stderr for bad in NOT_A_BUG), out.stderr
            assert status(sock)["acme"]["state"] == "unavailable"
            if how == "refused":  # the IdP comes back: the rotate stored nothing, the old password logs in
                with dev_idp(port=int(where.rsplit(":", 1)[1])):
                    wait_for(lambda: dc_token(sock, "acme").returncode == 0, 60, "acme served again", every=0.5)
                    assert status(sock)["acme"]["state"] == "fresh"
        finally:
            assert stop(broker) == 0
    assert broker.stderr is not None
    log = broker.stderr.read()
    assert "Traceback" not in log and " ERROR " not in log, log


def test_a_logout_while_the_idp_is_down_changes_nothing_and_ends_the_login_once_it_answers(tmp_path: Path) -> None:
    """`dc-broker logout` of a live login while nothing answers at the IdP's port: exit 7 with the
    message dc-token gives for the outage (issue 19, Build 8; docs/architecture.md), and nothing
    changed: the login is kept, still served, so that the logout can end it at the IdP once it is
    back (forgetting it here would leave its IdP session alive with nobody holding what ends it).
    Then the same command ends the IdP session and forgets it. No bug, no traceback, in the command's
    output or the broker's log."""
    port = free_port()
    sock = str(tmp_path / "run" / "b.sock")
    with dev_idp(port=port) as base:
        broker = start_run(write_config(tmp_path, base), sock, SECRETS)
        wait_for(lambda: status(sock)["acme"]["state"] == "fresh", 20, "a fresh acme token", every=0.1)
        served = dc_token(sock, "acme").stdout
    try:  # the IdP is gone: nothing listens at its port any more
        out = run([DC_BROKER, "logout", "--socket", sock, "acme"])
        assert not any(bad in out.stderr + out.stdout for bad in NOT_A_BUG), out.stderr
        assert (out.returncode, out.stdout) == (7, ""), out.stderr
        said = "Error: profile 'acme': the identity provider could not end the login: "
        assert out.stderr.startswith(said) and f"127.0.0.1:{port}" in out.stderr, out.stderr
        cause = out.stderr[len(said) :].split("; nothing changed: ")[0]
        assert out.stderr == error_lines(
            f"profile 'acme': the identity provider could not end the login: {cause}; nothing changed: the "
            "login is kept for `dc-broker logout acme` to end once it answers (`dc-broker remove acme` forgets "
            "it here regardless)",
            "acme",
        )
        assert status(sock)["acme"]["state"] == "fresh"
        again = dc_token(sock, "acme")
        assert (again.returncode, again.stdout) == (0, served), again.stderr  # the same login, still served
        # back (a new dev IdP process, which keeps no sessions: a real IdP would end the session; this
        # one says there is nothing left to revoke): the logout now asks it, and forgets the login here
        with dev_idp(port=port) as base:
            out = run([DC_BROKER, "logout", "--socket", sock, "acme"])
            assert (out.returncode, out.stderr) == (0, ""), out.stderr
            assert out.stdout == (
                "Logged out of profile acme: its login already over at the identity provider (nothing to revoke), "
                "its password forgotten (the client secret stays: `dc-broker login` uses it).\n"
            )
            assert status(sock)["acme"]["state"] == "login_required"
            assert dc_token(sock, "acme").returncode == 5
    finally:
        assert stop(broker) == 0
    assert broker.stderr is not None
    log = broker.stderr.read()
    assert "Traceback" not in log and " ERROR " not in log, log
    assert "could not end the login at the identity provider" not in log  # nothing was forgotten unended


def test_a_refused_password_at_login_and_rotate_exits_8_and_changes_nothing(tmp_path: Path) -> None:
    """The IdP refuses the new password: `dc-broker login` and `rotate` exit 8 as dc-token does for a
    stored password it refuses, each saying what the IdP said and what to do; the login the broker
    holds goes on serving."""
    sock = str(tmp_path / "run" / "b.sock")
    with dev_idp() as base:
        cfg = write_config(tmp_path, base)
        cfg.write_text(
            cfg.read_text()
            + f'\n[profiles.bad]\nserver = "{base}"\ntenant = "demo"\nclient_id = "dc-cli"\nusername = "demo"\n'
        )
        broker = start_run(
            cfg, sock, SECRETS + '[bad]\npassword = "Wr0ng-stored-pw"\nclient_secret = "dc-cli-secret"\n'
        )
        try:
            wait_for(lambda: status(sock)["acme"]["state"] == "fresh", 20, "a fresh acme token", every=0.1)
            refused = (
                "the identity provider refused the password of user 'demo' (HTTP 401: invalid_grant: Invalid user "
                "credentials)"
            )
            stored = dc_token(sock, "bad")
            assert stored.returncode == 8 and f"dc-token: profile 'bad': {refused}" in stored.stderr, stored.stderr
            login = run([DC_BROKER, "login", "--socket", sock, "acme", "--password-stdin"], input="Wr0ng-login-pw\n")
            assert (login.returncode, login.stdout) == (8, ""), login.stderr
            assert login.stderr == (
                f"Error: profile 'acme': {refused}; store the right one with `dc-broker login acme` (if the password "
                "is right, the account may be locked for a while by the identity provider's brute-force detection "
                "after failed logins: the lock lifts by itself)\n"
            )
            rotate = run(
                [DC_BROKER, "rotate", "--config", str(cfg), "--socket", sock, "acme", "--password-stdin"],
                input="Wr0ng-rotate-pw\n",
            )
            assert (rotate.returncode, rotate.stdout) == (8, ""), rotate.stderr
            assert rotate.stderr == (
                f"Error: profile 'acme': {refused}; nothing changed: run `dc-broker rotate acme --password` again "
                "with the right one\n"
            )
            for out in (stored, login, rotate):
                assert "Wr0ng-" not in out.stderr and "Traceback" not in out.stderr
            # refused new credentials take nothing away: acme's login goes on
            assert status(sock)["acme"]["state"] == "fresh"
            assert dc_token(sock, "acme").returncode == 0
        finally:
            assert stop(broker) == 0
    assert broker.stderr is not None
    assert "Wr0ng-" not in broker.stderr.read()
