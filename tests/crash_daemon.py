"""kill -9 the real daemon at random moments while refresh tokens rotate, and count lost logins.

The profile is a device login: it has no password or secret to fall back on, so the only way to keep
it alive across kills is the newest rotated refresh token, stored in the vault before the old one is
forgotten. After each kill the daemon restarts on the same vault; ``dc-token`` exiting 5
(login_required) means the login was lost. Used by tests/test_crash.py (short) and bench/crash.py.

The one window no client can close: the IdP has rotated the token and the answer is on its way when
the kill lands; the new token then exists only at the IdP. Keycloak's "Refresh Token Max Reuse" >= 1
covers it (the restarted broker may present the previous token once); with 0 such a kill is a lost
login, which is why ``max_reuse`` is a parameter and the bench reports both.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.e2e import DC_BROKER, DC_TOKEN, approve_device, device_code, wait_for_socket


@dataclass
class CrashResult:
    kills: int
    lost_logins: int
    seconds: float
    #: restarts after which the broker served a token it could only have got with the stored refresh
    #: token (the access token it had stored had expired by then): each one a rotation that survived
    refreshed_after_restart: int = 0


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DC_BROKER_")}
    env.update(
        XDG_CONFIG_HOME=str(tmp / "config"),
        XDG_DATA_HOME=str(tmp / "data"),
        DC_BROKER_SOCKET=str(tmp / "run" / "b.sock"),
    )
    return env


def run_crash_loop(kills: int, *, max_reuse: int = 1, access_lifespan: int = 1, seed: int = 1) -> CrashResult:
    rng = random.Random(seed)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dc-crash-") as tmpdir:
        tmp = Path(tmpdir)
        env = _env(tmp)
        sock = env["DC_BROKER_SOCKET"]
        idp = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dc_broker.devserver",
                "--rotate",
                "--max-reuse",
                str(max_reuse),
                "--access-lifespan",
                str(access_lifespan),
                "--device-interval",  # each device login ends a second after its approval, not five
                "1",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert idp.stdout is not None
        base = idp.stdout.readline().strip()
        daemon: subprocess.Popen[str] | None = None
        try:

            def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
                return subprocess.run(
                    [DC_BROKER, *args], input=stdin, capture_output=True, text=True, env=env, timeout=60
                )

            def start() -> subprocess.Popen[str]:
                proc = subprocess.Popen(
                    [DC_BROKER, "run"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
                wait_for_socket(sock, proc)  # type: ignore[arg-type]
                return proc  # type: ignore[return-value]

            assert cli("init", "--key-source", "keyfile", "--key-file", str(tmp / "key")).returncode == 0
            added = cli(
                "add", "dev", "--server", base, "--tenant", "demo", "--client-id", "dc-public", "--grant", "device"
            )
            assert added.returncode == 0, added.stderr
            daemon = start()
            login = subprocess.Popen([DC_BROKER, "login", "dev"], env=env, stdout=subprocess.PIPE, text=True)
            approve_device(base, device_code(login))
            assert login.wait(30) == 0
            lost = refreshed = 0
            seen: set[str] = set()
            for _ in range(kills):
                # a random moment to kill at (no event to wait for); refreshes come every ~0.75 lifetimes
                time.sleep(rng.uniform(0.0, 1.5 * access_lifespan))
                daemon.send_signal(signal.SIGKILL)
                daemon.wait()
                killed_at = time.monotonic()
                daemon = start()
                # every access token the broker stored before the kill has expired by now (the broker
                # counts a lifetime from when it sent the request, before the kill): a token served
                # from here on was got after the restart, and a device login has no credential but
                # its refresh token to get one with
                time.sleep(max(0.0, killed_at + access_lifespan + 0.1 - time.monotonic()))
                check = subprocess.run([DC_TOKEN, "dev"], capture_output=True, text=True, env=env, timeout=30)
                if check.returncode != 0:
                    lost += 1
                    assert check.returncode == 5, check.stderr  # anything but login_required is another bug
                    # log in again so the loop can go on counting
                    relog = subprocess.Popen([DC_BROKER, "login", "dev"], env=env, stdout=subprocess.PIPE, text=True)
                    approve_device(base, device_code(relog))
                    assert relog.wait(30) == 0, "the login after a lost one failed: the count would stop meaning"
                else:
                    token = check.stdout.strip()
                    assert token not in seen, "a token served twice across a restart and its expiry"
                    seen.add(token)
                    refreshed += 1
        finally:
            if daemon is not None:
                daemon.kill()
                daemon.wait()
            idp.terminate()
            idp.wait(10)
    return CrashResult(kills=kills, lost_logins=lost, seconds=time.monotonic() - t0, refreshed_after_restart=refreshed)
