"""Keycloak's real answers end to end (a real broker, the dev IdP as a process set to answer as Keycloak
does in each case): a brute-force lock-out that lifts by itself, client and realm settings that refuse
(each named, every token kept), scopes never wider than asked against RH-SSO 7.6, and a logout that
ends the browser's SSO session so the next login asks for the password again."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from dc_token import TokenClient
from tests.e2e import (
    DC_BROKER,
    dc_token,
    dev_idp,
    device_login,
    idp_stats,
    run,
    start_run,
    stop,
    wait_for,
)
from tests.test_browser_login_e2e import FormFields, start_login

pytestmark = pytest.mark.e2e
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
SECRETS = '[acme]\npassword = "demo"\nclient_secret = "dc-cli-secret"\n'


def profile(name: str, base: str, **settings: str) -> str:
    """Profile ``name`` at the dev IdP: user demo's password login at client dc-cli, unless ``settings``
    say otherwise."""
    return _section(name, base, {"client_id": "dc-cli", "username": "demo", **settings})


def device_profile(base: str, **settings: str) -> str:
    """Profile ``dev``: a device login at the dev IdP's public client dc-public, with ``settings``."""
    return _section("dev", base, {"client_id": "dc-public", "grant": "device", "auth_method": "none", **settings})


def _section(name: str, base: str, settings: dict[str, str]) -> str:
    lines = [f"[profiles.{name}]", f'server = "{base}"', 'tenant = "demo"']
    lines += [f'{k} = "{v}"' for k, v in settings.items()]
    return "\n".join(lines) + "\n\n"


def status(sock: str) -> dict[str, dict[str, object]]:
    out = run([DC_BROKER, "status", "--socket", sock, "--json"])
    assert out.returncode == 0, out.stderr
    return {p["profile"]: p for p in json.loads(out.stdout)["profiles"]}


def scope_of(token: str) -> set[str]:
    payload = token.split(".")[1]
    return set(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["scope"].split())


def dc_token_refused(sock: str, broker: subprocess.Popen[str], when: str) -> subprocess.CompletedProcess[str]:
    """`dc-token dev`'s first refusal (polled: the broker finds out at its next refresh)."""
    return wait_for(
        lambda: (got := dc_token(sock, "dev")).returncode != 0 and got,
        30,
        f"dc-token dev refused {when}",
        process=broker,
        every=0.2,
    )


@pytest.mark.slow
def test_a_locked_out_user_recovers_by_itself_once_the_lock_lifts(tmp_path: Path) -> None:
    """Brute-force detection on: a wrong password elsewhere locks user demo for 60 s, and Keycloak
    answers even the right password 'Invalid user credentials' meanwhile. The broker, whose stored
    password the IdP accepted before, waits the lock out (says so in status) instead of taking it for
    wrong, and is back within the lock-out window plus one retry, with at most 3 password attempts."""
    lock = ("--set", "brute_force=true", "--set", "failure_factor=1", "--set", "wait_increment=60")
    with dev_idp(*lock, "--access-lifespan", "300") as base:
        cfg = tmp_path / "config.toml"
        cfg.write_text(profile("acme", base))
        sock = str(tmp_path / "broker.sock")
        broker = start_run(cfg, sock, SECRETS)
        try:
            first = dc_token(sock, "acme")
            assert first.returncode == 0
            token_url = f"{base}/realms/demo/protocol/openid-connect/token"
            wrong = {"grant_type": "password", "username": "demo", "password": "not-it", "client_id": "dc-public"}
            assert httpx.post(token_url, data=wrong, timeout=30).status_code == 401  # someone else, mistyping
            locked_at = time.monotonic()
            httpx.post(f"{base}/_dev/logout-all", timeout=30)  # the refresh token dies: a password grant is next
            with TokenClient(sock) as client:
                assert client.invalidate("acme", first.stdout.strip())
            said = wait_for(
                lambda: "brute-force" in str(status(sock)["acme"]["last_error"]) and status(sock)["acme"],
                30,
                "status saying the account may be locked",
                process=broker,
            )
            assert "asking again in 60 s (1 of 3)" in str(said["last_error"])
            wait_for(lambda: dc_token(sock, "acme").returncode == 0, 60 + 30, "a token once the lock lifted")
            assert time.monotonic() - locked_at >= 59
            assert status(sock)["acme"]["state"] == "fresh"
        finally:
            assert stop(broker) == 0
        grants = idp_stats(base)["token_requests"]["password"]
    assert 3 <= grants <= 2 + 3  # the first login, the wrong one elsewhere, at most 3 of ours meanwhile


def test_a_refresh_token_keycloak_says_is_dead_needs_a_person_or_the_stored_password(tmp_path: Path) -> None:
    """An administrator's "log out all sessions": Keycloak answers the next refresh 400 invalid_grant
    "Session not active", the one kind of answer that may cost a refresh token. The device login has
    nothing to fall back on (`dc-token` exits 5 naming the command that logs it in again); the
    password profile logs in again by itself with exactly one password grant."""
    with dev_idp("--device-interval", "1") as base:
        cfg = tmp_path / "config.toml"
        cfg.write_text(profile("acme", base) + device_profile(base))
        sock = str(tmp_path / "broker.sock")
        broker = start_run(cfg, sock, SECRETS)
        try:
            device_login(base, sock)
            held = {name: dc_token(sock, name) for name in ("acme", "dev")}
            assert all(got.returncode == 0 for got in held.values()), [got.stderr for got in held.values()]
            before = idp_stats(base)["token_requests"]
            assert httpx.post(f"{base}/_dev/logout-all", timeout=30).json()["killed"] == 2
            with TokenClient(sock) as client:  # what a caller does when the API answers 401
                for name, got in held.items():
                    client.invalidate(name, got.stdout.strip())
            dead = dc_token_refused(sock, broker, "once its login was found dead")
            assert dead.returncode == 5 and dead.stdout == "", dead.stderr  # login_required: a person acts
            assert dead.stderr == "dc-token: profile 'dev': no valid login; run `dc-broker login dev`\n"
            assert status(sock)["dev"]["state"] == "login_required"
            again = wait_for(
                lambda: (got := dc_token(sock, "acme")).returncode == 0 and got.stdout != held["acme"].stdout and got,
                30,
                "a new token for acme from its stored password",
                process=broker,
                every=0.2,
            )
            assert again.stdout.strip()
            assert status(sock)["acme"]["state"] == "fresh"
        finally:
            assert stop(broker) == 0
        after = idp_stats(base)["token_requests"]
    assert after["password"] == before["password"] + 1  # one password grant, no retries
    assert after.get("refresh_token", 0) - before.get("refresh_token", 0) >= 1  # the refresh that was refused


@pytest.mark.parametrize(
    ("settings", "profile_settings", "fix"),
    [
        (["--set", "ssl_required=all"], {}, "Require SSL"),
        (["--set", "enabled=false"], {}, "Realm settings -> Enabled"),
        (["--client-set", "dc-cli.dpop=required"], {}, "DPoP Bound Access Tokens"),
        (["--client-set", "dc-cli.offline_allowed=false"], {"scope": "openid offline_access"}, "offline_access role"),
        (["--client-set", "dc-cli.direct_grants=false"], {}, "'Direct access grants'"),
    ],
    ids=["https-required", "realm-disabled", "dpop", "offline-not-allowed", "direct-grants-off"],
)
def test_a_client_or_realm_setting_that_refuses_is_named_with_its_fix(
    tmp_path: Path, settings: list[str], profile_settings: dict[str, str], fix: str
) -> None:
    with dev_idp(*settings) as base:
        cfg = tmp_path / "config.toml"
        cfg.write_text(profile("acme", base, **profile_settings))
        sock = str(tmp_path / "broker.sock")
        broker = start_run(cfg, sock, SECRETS)
        try:
            got = dc_token(sock, "acme")
            assert got.returncode == 10, got.stderr  # upstream_error: the IdP's answer, not a credential
            assert fix in got.stderr and "Traceback" not in got.stderr
            shown = status(sock)["acme"]
            assert shown["state"] == "unavailable" and fix in str(shown["last_error"])
            assert shown["next_refresh_in"] is not None and float(str(shown["next_refresh_in"])) > 60  # slowly
        finally:
            assert stop(broker) == 0


def test_a_device_login_refused_by_a_client_setting_keeps_its_refresh_token(tmp_path: Path) -> None:
    """The headline case of issue 20, point 3: a device login (no password to fall back on) whose
    client an administrator switches to DPoP-required. Its refreshes are refused in words that do not
    say the token is dead: `dc-token` exits 10 naming the setting, and the login (its refresh token,
    with its deadline) is kept for when the setting is undone; no person is asked to log in again.
    (That it then refreshes with no person: tests/test_generations.py, in-process, where the broker's
    5-minute wait before asking again costs nothing.)"""
    with dev_idp("--device-interval", "1") as base:
        cfg = tmp_path / "config.toml"
        cfg.write_text(device_profile(base))
        sock = str(tmp_path / "broker.sock")
        broker = start_run(cfg, sock, "")
        admin = f"{base}/_dev/realms/demo/clients"
        try:
            device_login(base, sock)
            first = dc_token(sock, "dev")
            assert first.returncode == 0, first.stderr
            before = idp_stats(base)["token_requests"]
            assert httpx.post(admin, json={"client_id": "dc-public", "dpop": "required"}, timeout=30).status_code == 200
            with TokenClient(sock) as client:
                client.invalidate("dev", first.stdout.strip())
            refused = dc_token_refused(sock, broker, "by the setting")
            assert refused.returncode == 10 and "DPoP Bound Access Tokens" in refused.stderr, refused.stderr
            shown = status(sock)["dev"]
            assert shown["state"] != "login_required" and "DPoP" in str(shown["last_error"])
            assert shown["login_ends_in"] is not None and float(str(shown["login_ends_in"])) > 60  # the token kept
            assert float(str(shown["next_refresh_in"])) > 60  # asked again slowly, not in a loop
        finally:
            assert stop(broker) == 0
        after = idp_stats(base)["token_requests"]
    assert after[DEVICE_GRANT] == before[DEVICE_GRANT]  # no new device login was started: no person was asked
    assert after["refresh_token"] - before.get("refresh_token", 0) == 1  # one refused refresh, not a loop


def test_a_disabled_service_account_and_a_disabled_device_grant_name_the_client_setting(tmp_path: Path) -> None:
    off = ("--client-set", "dc-service.service_account_enabled=false", "--client-set", "dc-public.device_grant=false")
    with dev_idp(*off) as base:
        cfg = tmp_path / "config.toml"
        cfg.write_text(profile("svc", base, client_id="dc-service", grant="client_credentials") + device_profile(base))
        sock = str(tmp_path / "broker.sock")
        broker = start_run(cfg, sock, '[svc]\nclient_secret = "dc-service-secret"\n')
        try:
            got = dc_token(sock, "svc")
            assert got.returncode == 10 and "service-account-dc-service -> Enabled" in got.stderr, got.stderr
            login = run([DC_BROKER, "login", "dev", "--socket", sock])
            assert login.returncode == 10, login.stderr
            assert "OAuth 2.0 Device Authorization Grant" in login.stderr and "Capability config" in login.stderr
        finally:
            assert stop(broker) == 0


def test_dc_token_scope_against_rh_sso_never_prints_a_token_wider_than_asked(tmp_path: Path) -> None:
    """RH-SSO 7.6 ignores scope on a refresh: the password profile gets exactly the scope from a
    password grant; a device login cannot be narrowed there and says why."""
    with dev_idp("--refresh-scope", "ignore", "--device-interval", "1") as base:
        cfg = tmp_path / "config.toml"
        cfg.write_text(
            profile("acme", base, scope="openid phone profile email")
            + device_profile(base, scope="openid phone profile email")
        )
        sock = str(tmp_path / "broker.sock")
        broker = start_run(cfg, sock, SECRETS)
        try:
            device_login(base, sock)
            for asked in ("openid profile email", "profile email"):
                got = dc_token(sock, "--scope", asked, "acme")
                assert got.returncode == 0, got.stderr
                assert scope_of(got.stdout.strip()) <= set(asked.split())
                refused = dc_token(sock, "--scope", asked, "dev")
                assert refused.returncode == 8 and refused.stdout == "", refused.stderr
                assert "ignores scope on a refresh" in refused.stderr
            whole = dc_token(sock, "acme")
            assert "phone" in scope_of(whole.stdout.strip())  # the profile's own token keeps its scope
        finally:
            assert stop(broker) == 0


def test_after_logout_of_a_browser_login_the_next_login_asks_for_the_password_again(tmp_path: Path) -> None:
    """Keycloak's end-session endpoint ends the browser's SSO session; revoking the refresh token (what
    the broker did before) only detached the client, and the next browser login went through without
    a password. The browser here keeps its cookies, as a person's does."""
    with dev_idp() as base:
        cfg = tmp_path / "config.toml"
        cfg.write_text(
            f'[profiles.web]\nserver = "{base}"\ntenant = "demo"\nclient_id = "dc-public"\n'
            'grant = "browser"\nauth_method = "none"\n'
        )
        sock = str(tmp_path / "run" / "b.sock")
        broker = start_run(cfg, sock, "")
        browser = httpx.Client(follow_redirects=False, timeout=30)
        try:

            def log_in(*, password_asked: bool) -> None:
                proc, url = start_login(sock)
                page = browser.get(url)
                if password_asked:
                    assert page.status_code == 200 and "Sign in to demo" in page.text
                    form = FormFields()
                    form.feed(page.text)
                    page = browser.post(url.split("?")[0], data={**form.fields, "username": "demo", "password": "demo"})
                assert page.status_code == 302, "the login page was shown: the SSO session had ended"
                assert httpx.get(page.headers["location"], timeout=30).status_code == 200
                _, err = proc.communicate(timeout=30)
                assert proc.returncode == 0, err

            log_in(password_asked=True)
            log_in(password_asked=False)  # the SSO session lives: this is what a skipped page looks like
            out = run([DC_BROKER, "logout", "web", "--socket", sock])
            assert out.returncode == 0 and "its session at the identity provider ended" in out.stdout, out.stdout
            log_in(password_asked=True)  # the login page again
            assert dc_token(sock, "web").returncode == 0
        finally:
            browser.close()
            assert stop(broker) == 0


def one_token_broker(sock: Path, scope: str | None) -> threading.Thread:
    """A broker that answers one token request, with this granted scope (as one after an IdP that
    dropped what the login never had)."""
    from dc_token.protocol import FrameDecoder, reply_frame

    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        decoder = FrameDecoder()
        decoder.receive_data(conn.recv(65536))
        request = decoder.next_frame()
        assert isinstance(request, dict)
        result = {"profile": "acme", "token": "T0K3N", "type": "Bearer", "expires_in": 300.0,
                  "expires_at": time.time() + 300, "scope": scope, "refresh_in": 200.0}  # fmt: skip
        conn.sendall(reply_frame(request["id"], result))
        conn.close()
        listener.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(
    ("granted", "exit_code"),
    [("openid profile email", 0), ("profile email", 8), (None, 0)],
    ids=["all", "less", "unsaid"],
)
def test_dc_token_scope_fails_naming_the_scopes_the_idp_did_not_grant(
    tmp_path: Path, granted: str | None, exit_code: int
) -> None:
    sock = tmp_path / "b.sock"
    served = one_token_broker(sock, granted)
    got = dc_token(str(sock), "--scope", "openid profile email", "acme")
    served.join(10)
    assert got.returncode == exit_code, got.stderr
    if exit_code:
        assert got.stdout == "" and "without openid" in got.stderr and "`dc-broker set acme scope=...`" in got.stderr
    else:
        assert got.stdout == "T0K3N\n"


#: what the command `dc-token exec` runs prints: the token it was handed, from the environment or the file
SHOW_TOKEN = "import os; print(os.environ.get('DC_TOKEN') or open(os.environ['DC_TOKEN_FILE']).read().strip())"


@pytest.mark.parametrize("flags", [[], ["--token-file"], ["--restart"]], ids=["exec", "token-file", "restart"])
@pytest.mark.parametrize(
    ("granted", "exit_code"),
    [("openid profile email", 0), ("profile email", 8), (None, 0)],
    ids=["all", "less", "unsaid"],
)
def test_dc_token_exec_scope_fails_before_the_command_gets_a_token_without_them(
    tmp_path: Path, flags: list[str], granted: str | None, exit_code: int
) -> None:
    """As the printed token: `dc-token exec --scope` (replacing itself, or staying beside the command)
    hands no token lacking scopes it asked for; the command never runs, and the exit status and message
    are the printing path's."""
    import sys

    served = one_token_broker(tmp_path / "p.sock", granted)
    printed = dc_token(str(tmp_path / "p.sock"), "--scope", "openid profile email", "acme")
    served.join(10)
    served = one_token_broker(tmp_path / "e.sock", granted)
    got = dc_token(str(tmp_path / "e.sock"), "exec", "--scope", "openid profile email", *flags, "acme", "--",
                   sys.executable, "-c", SHOW_TOKEN)  # fmt: skip
    served.join(10)
    assert got.returncode == printed.returncode == exit_code, got.stderr
    if exit_code:
        assert got.stdout == "" and got.stderr == printed.stderr  # the command never ran; the same words
        assert "without openid" in got.stderr and "`dc-broker set acme scope=...`" in got.stderr
    else:
        assert got.stdout == "T0K3N\n"
