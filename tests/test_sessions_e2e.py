# ruff: noqa: F811 - the home fixture comes from tests.test_cli
"""The session lifecycle end to end (real broker, real dev IdP processes, real sockets): an OP that never
rotates, changes a person makes while refreshes are at a slow IdP, and an IdP that stops dead for 30 s
while refreshes are in flight (SIGSTOP/SIGCONT)."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e import (
    DC_BROKER,
    dc_token,
    dev_idp,
    dev_idp_process,
    device_login,
    idp_stats,
    run,
    start_run,
    stop,
    wait_for,
    wait_for_socket,
)
from tests.test_cli import add_demo, cli, home, init_keyfile  # noqa: F401 - the home fixture

pytestmark = pytest.mark.e2e
API = "/dp/api/v1/aiconnections/types"


def status(sock: str) -> dict[str, dict[str, Any]]:
    out = run([DC_BROKER, "status", "--socket", sock, "--json"])
    assert out.returncode == 0, out.stderr
    return {p["profile"]: p for p in json.loads(out.stdout)["profiles"]}


def jwt_exp(token: str) -> float:
    payload = token.split(".")[1]
    return float(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"])


def profiles(base: str, *names: str, extra: str = "") -> str:
    return "".join(
        f'[profiles.{n}]\nserver = "{base}"\ntenant = "demo"\nclient_id = "dc-cli"\nusername = "demo"\n{extra}\n'
        for n in names
    )


@pytest.mark.slow
@pytest.mark.parametrize("answer", ["none", "same"])
def test_a_device_login_survives_twenty_refreshes_of_an_op_that_never_rotates(tmp_path: Path, answer: str) -> None:
    """RFC 6749 section 6: the OP answers every refresh without a refresh token (LemonLDAP::NG, Google),
    or with the same one again (Okta without rotation); the broker keeps the one it has, so a person's
    login outlives 20 access tokens, and the password profile beside it never sends its password again."""
    flags = ("--refresh-token-answer", answer, "--no-refresh-expires-in", "--access-lifespan", "3")
    with dev_idp(*flags, "--device-interval", "1") as base:
        cfg = tmp_path / "config.toml"
        device = f'[profiles.dev]\nserver = "{base}"\ntenant = "demo"\nclient_id = "dc-public"\n'
        cfg.write_text(profiles(base, "acme") + device + 'grant = "device"\nauth_method = "none"\n')
        sock = str(tmp_path / "broker.sock")
        broker = start_run(cfg, sock, '[acme]\npassword = "demo"\nclient_secret = "dc-cli-secret"\n')
        try:
            device_login(base, sock)
            wait_for(lambda: status(sock)["dev"]["refreshes"] >= 21, 120, "20 refreshes of the device login")
            shown = status(sock)
            assert shown["dev"]["state"] == "fresh" and shown["acme"]["state"] == "fresh"
            token = dc_token(sock, "dev")
            assert token.returncode == 0, token.stderr
            api = httpx.get(base + API, headers={"Authorization": f"Bearer {token.stdout.strip()}"}, timeout=30)
            assert api.status_code == 200
        finally:
            assert stop(broker) == 0
        stats = idp_stats(base)
    assert stats["token_requests"].get("password", 0) == 1  # acme's first login, never again
    assert stats["token_requests"]["refresh_token"] >= 20
    assert stats["refresh_reuse"] == 0


#: what a person does, as commands (argv, stdin)
CHANGES: dict[str, list[tuple[list[str], str]]] = {
    "lock+unlock": [(["lock"], ""), (["unlock"], "")],
    "rotate": [(["rotate", "acme", "--password-stdin"], "demo\n")],
    "set": [(["set", "acme", "scope=openid"], "")],
    "logout+login": [(["logout", "acme"], ""), (["login", "acme", "--password-stdin"], "demo\n")],
}


@pytest.mark.slow
@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_fired_during_a_slow_refresh_leaves_the_broker_serving(
    home: dict[str, str], tmp_path: Path, change: str
) -> None:
    """Each change lands while a refresh is at an IdP that takes 3 s to answer: the broker keeps
    running, no refresh token is presented twice, and the profile serves again within two token
    lifetimes (the first finding of the issue ended the daemon with a LifecycleError)."""
    lifetime = 8.0
    with dev_idp("--latency", "3", "--access-lifespan", str(int(lifetime)), "--rotate") as base:
        init_keyfile(home, tmp_path)
        assert add_demo(home, base).returncode == 0
        sock = home["DC_BROKER_SOCKET"]
        daemon = subprocess.Popen(
            [DC_BROKER, "run"], env=home, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            wait_for_socket(sock, daemon)
            assert dc_token(sock, "acme").returncode == 0
            for _ in range(2):  # twice, at two refreshes
                wait_for(
                    lambda: status(sock)["acme"]["refreshing"], 3 * lifetime, "a refresh at the IdP", process=daemon
                )
                for argv, stdin in CHANGES[change]:
                    done = cli(home, *argv, stdin=stdin)
                    assert done.returncode == 0, (argv, done.stderr)
                assert daemon.poll() is None
                served = wait_for(
                    lambda: dc_token(sock, "acme").returncode == 0, 2 * lifetime, "a token again", process=daemon
                )
                assert served
            assert daemon.poll() is None
        finally:
            assert stop(daemon) == 0
            assert daemon.stderr is not None
            log = daemon.stderr.read()
        assert "LifecycleError" not in log and "Traceback" not in log
        assert idp_stats(base)["refresh_reuse"] == 0


@pytest.mark.slow
def test_a_30_second_stall_of_a_rotating_idp_costs_no_session(tmp_path: Path) -> None:
    """The IdP stops dead (SIGSTOP) while refreshes are in flight and resumes 30 s later: every
    refresh it then answers is read (no answer walked away from, no refresh token presented twice),
    no password is sent again, and no token is served past its own exp meanwhile."""
    names = [f"p{i}" for i in range(5)]
    with dev_idp_process("--rotate", "--access-lifespan", "20", "--latency", "0.5") as (base, idp):
        cfg = tmp_path / "config.toml"
        cfg.write_text(profiles(base, *names))
        secrets = "".join(f'[{n}]\npassword = "demo"\nclient_secret = "dc-cli-secret"\n' for n in names)
        sock = str(tmp_path / "broker.sock")
        broker = start_run(cfg, sock, secrets)
        late: list[str] = []
        stop_readers = threading.Event()

        def reader(name: str) -> None:
            while not stop_readers.is_set():
                got = dc_token(sock, name, "--json")
                if got.returncode == 0:
                    doc = json.loads(got.stdout)
                    if jwt_exp(doc["token"]) < time.time():
                        late.append(f"{name}: served {time.time() - jwt_exp(doc['token']):.2f} s past its exp")
                time.sleep(0.2)

        try:
            wait_for(lambda: all(p["state"] == "fresh" for p in status(sock).values()), 60, "every profile fresh")
            readers = [threading.Thread(target=reader, args=(n,), daemon=True) for n in names]
            for t in readers:
                t.start()
            wait_for(
                lambda: any(p["refreshing"] for p in status(sock).values()), 60, "a refresh at the IdP", every=0.02
            )
            idp.send_signal(signal.SIGSTOP)
            time.sleep(30)
            idp.send_signal(signal.SIGCONT)
            wait_for(lambda: all(p["state"] == "fresh" for p in status(sock).values()), 90, "every profile back")
            time.sleep(25)  # a full token lifetime more of refreshes after the stall
            assert all(p["state"] == "fresh" for p in status(sock).values())
        finally:
            stop_readers.set()
            assert stop(broker) == 0
        stats = idp_stats(base)
    assert stats["refresh_reuse"] == 0
    assert stats["token_requests"].get("password", 0) == len(names)  # each profile's first login only
    assert not late, late
