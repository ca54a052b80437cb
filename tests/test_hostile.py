"""Hostile and careless clients against a live broker: fuzzed frames, idle half-open connections,
half-sent frames, and what reaches the logs. (The long fuzz run is bench/fuzz.py: >= 100,000 frames.)"""

from __future__ import annotations

import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import trio

from dc_broker import devserver
from dc_broker.devserver import DevIdP, demo_realm
from dc_token.protocol import Request, encode
from dc_token.sync import TokenClient
from tests.e2e import DC_BROKER, dc_token, dev_broker, run, start_run, stop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import fuzz

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory):
    with dev_broker(tmp_path_factory.mktemp("hostile")) as env:
        yield env


def test_fuzzed_frames_never_hurt_the_broker(dev) -> None:
    sock, _, _ = dev
    pid = TokenClient(sock, cache=False).hello()["pid"]
    result = fuzz.run(sock, pid, frames=4000, workers=2, seed=7)
    assert result["frames"] >= 4000
    assert TokenClient(sock, cache=False).token("demo")
    well = result["well_behaved"]
    assert isinstance(well, dict) and well["n"] > 0  # every one of them got a token (asserted inside)
    assert int(result["rss_after_kb"]) - int(result["rss_before_kb"]) < 50 * 1024


def test_a_thousand_idle_half_open_connections_do_not_block_a_new_client(dev) -> None:
    sock, _, _ = dev
    idle = []
    try:
        for i in range(1000):
            s = socket.socket(socket.AF_UNIX)
            s.connect(sock)
            if i % 2:
                s.sendall(encode(Request(1, "token", {"profile": "demo"}))[:3])  # a frame begun, never finished
            idle.append(s)
        assert dc_token(sock, "demo").returncode == 0
        with TokenClient(sock, cache=False) as c:
            assert all(c.token("demo") for _ in range(50))
    finally:
        for s in idle:
            s.close()


def test_half_sent_frame_is_cut_off_after_the_deadline(dev, tmp_path: Path) -> None:
    _, base, _ = dev
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f'[daemon]\npartial_frame_timeout = 0.3\n[profiles.acme]\nserver = "{base}"\ntenant = "demo"\n'
        'client_id = "dc-service"\ngrant = "client_credentials"\n'
    )
    sock = str(tmp_path / "r" / "b.sock")
    proc = start_run(cfg, sock, '[acme]\nclient_secret = "dc-service-secret"\n', stderr=subprocess.DEVNULL)
    try:
        slow = socket.socket(socket.AF_UNIX)
        slow.connect(sock)
        slow.sendall(encode(Request(1, "hello"))[:6])
        slow.settimeout(5)
        t0 = time.monotonic()
        assert slow.recv(100) == b""  # closed by the broker
        assert time.monotonic() - t0 < 3
        idle = socket.socket(socket.AF_UNIX)
        idle.connect(sock)  # an idle connection with no partial frame is left alone
        time.sleep(0.6)  # the window under test: longer than partial_frame_timeout, and nothing must happen
        idle.sendall(encode(Request(2, "hello")))
        idle.settimeout(5)
        assert idle.recv(65536)
    finally:
        assert stop(proc) == 0


@contextmanager
def idp_in_this_process(**realm: object) -> Iterator[tuple[DevIdP, str]]:
    """The dev IdP served from a thread of the test process, so the test can read every refresh token
    it ever minted (its session store), opaque ones included."""
    idp = DevIdP([demo_realm(**realm)])  # type: ignore[arg-type]
    started: queue.Queue[str] = queue.Queue()
    done = threading.Event()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            started.put(await nursery.start(lambda task_status: devserver.serve(idp, task_status=task_status)))
            await trio.to_thread.run_sync(done.wait)
            nursery.cancel_scope.cancel()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    try:
        yield idp, started.get(timeout=30)
    finally:
        done.set()
        thread.join(30)


def test_no_secret_or_token_reaches_the_logs(tmp_path: Path) -> None:
    """A busy broker at debug level: logins, rotations, refreshes, invalidations, a wrong password,
    lock attempts. Its whole log must hold no token, secret or password: every access token a client
    saw, and every refresh token the IdP minted (opaque, so no pattern would find them)."""
    seen: set[str] = set()
    with idp_in_this_process(access_lifespan=2, rotate_refresh_tokens=True) as (idp, base):
        cfg = tmp_path / "config.toml"
        cfg.write_text(
            f'[profiles.demo]\nserver = "{base}"\ntenant = "demo"\nclient_id = "dc-cli"\nusername = "demo"\n'
            f'[profiles.demo-service]\nserver = "{base}"\ntenant = "demo"\nclient_id = "dc-service"\n'
            'grant = "client_credentials"\n'
        )
        sock = str(tmp_path / "r" / "b.sock")
        secrets = '[demo]\npassword = "demo"\nclient_secret = "dc-cli-secret"\n[demo-service]\nclient_secret = "dc-service-secret"\n'
        proc = start_run(cfg, sock, secrets, "-v")
        for _ in range(8):
            for profile in ("demo", "demo-service"):
                out = dc_token(sock, profile)
                assert out.returncode == 0, out.stderr
                seen.add(out.stdout.strip())
            time.sleep(0.4)  # a client's pace over 2-second tokens: the broker rotates and refreshes meanwhile
        with TokenClient(sock, cache=False) as c:
            tok = c.token("demo")
            seen.add(tok)
            c.invalidate("demo", tok)
            seen.add(c.token("demo", min_ttl=1))
        wrong = run([DC_BROKER, "login", "--socket", sock, "--password-stdin", "demo"], input="Wr0ng-pa55-xyzzy\n")
        assert wrong.returncode == 8
        good = run([DC_BROKER, "login", "--socket", sock, "--password-stdin", "demo"], input="demo\n")
        assert good.returncode == 0
        seen.add(dc_token(sock, "demo").stdout.strip())
        httpx.get(base + "/dp/api/v1/aiconnections/types", headers={"Authorization": f"Bearer {tok}"})
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
        log = proc.stderr.read() if proc.stderr else ""
        refresh_tokens = set(idp._state.sessions.refresh_tokens)  # every one it minted, rotated ones too
    assert "dc-broker ready" in log and "dc_broker.audit" in log  # the log did record the activity
    assert len(refresh_tokens) >= 5, "the broker was meant to rotate refresh tokens several times"
    assert not any(t.startswith("ey") for t in refresh_tokens)  # opaque: only their values can find them
    for token in seen:
        for piece in (token, token.split(".")[-1]):  # the whole JWT, and its signature alone
            assert piece not in log
    for token in refresh_tokens:
        assert token not in log and token[-16:] not in log
    for secret in ("dc-cli-secret", "dc-service-secret", "Wr0ng-pa55-xyzzy", "password=demo"):
        assert secret not in log
    assert not re.search(r"Bearer\s+ey", log)
    assert "Traceback" not in log
