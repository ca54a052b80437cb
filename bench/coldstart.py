"""Socket-activated cold start: first connect on a socket nobody serves yet -> first token served.

Target (systemd issue): <= 0.5 s. Two figures:

* ``systemd-socket-activate`` holds the listening socket, as the user's ``dc-broker.socket`` would;
  the clock starts at the client's first ``connect`` (which is what starts the daemon) and stops when
  the token reply arrives. That span includes Python start-up, imports, config load, and the first
  token request to the dev IdP (a real HTTP round trip; secrets from stdin, nothing stored).
* under a real systemd (tests/systemd/harness.py boots one in a container, where root can run
  systemd-nspawn): the installed wheel in /opt/dc-broker, alice's ``dc-broker.socket`` with the
  service stopped before each run; the clock runs inside the container from the client's connect to
  the token. The user manager starts the unit, so this adds systemd's fork/exec and the keyfile
  vault's open; the token itself comes from the vault (a restart restores the stored login) when
  still fresh, as it does for a person's next cold start.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

from dc_token.sync import TokenClient

RUNS = 15
ACTIVATE = shutil.which("systemd-socket-activate")
DC_BROKER = str(Path(sys.executable).parent / "dc-broker")


def start_idp() -> tuple[subprocess.Popen[str], str]:
    idp = subprocess.Popen(
        [sys.executable, "-m", "dc_broker.devserver"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert idp.stdout is not None
    return idp, idp.stdout.readline().strip()


def one_cold_start(tmp: Path, cfg: Path, n: int) -> float:
    assert ACTIVATE is not None
    sock = str(tmp / f"cold-{n}.sock")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "DC_BROKER"))}
    proc = subprocess.Popen(
        [ACTIVATE, "-l", sock, "--", DC_BROKER, "run", "--config", str(cfg), "--secrets-stdin"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdin is not None
    proc.stdin.write('[demo]\npassword = "demo"\nclient_secret = "dc-cli-secret"\n')
    proc.stdin.close()
    assert proc.stderr is not None
    assert proc.stderr.readline().startswith("Listening on")  # listening; the daemon is not started yet
    t0 = time.perf_counter()
    with TokenClient(sock, timeout=30) as client:
        client.token("demo")
    elapsed = time.perf_counter() - t0
    proc.terminate()
    proc.wait(10)
    proc.stderr.close()
    return elapsed


REAL_RUNS = 10
#: run inside the container as alice: one cold start, timed from connect to the token reply
_CLIENT = (
    "import time; from dc_token.sync import TokenClient; t0 = time.perf_counter(); "
    "c = TokenClient('/run/user/{uid}/dc-broker/broker.sock', timeout=30); c.token('demo'); "
    "print(time.perf_counter() - t0); c.close()"
)


def real_systemd() -> dict[str, object]:
    """Socket-activated cold start to first token under a booted systemd (see the module docstring)."""
    from tests.systemd import harness

    reason = harness.skip_reason()
    if reason is not None:
        print(f"real systemd: skipped ({reason})")
        return {}
    with tempfile.TemporaryDirectory(prefix="dc-bench-sd-") as tmp:
        wheelhouse = harness.build_wheelhouse(Path(tmp) / "wheels")
        with harness.Machine.boot(f"dcb-bench-{os.getpid()}", wheelhouse, Path(tmp)) as m:
            m.install()
            base = m.start_idp()
            m.add_user("alice")
            m.run("dc-broker", "init", "--key-source", "keyfile", user="alice")
            add = ["dc-broker", "add", "demo", "--server", base, "--tenant", "demo", "--client-id", "dc-cli"]
            m.run(
                *add,
                "--username",
                "demo",
                "--password-stdin",
                "--secret-stdin",
                user="alice",
                input="demo\ndc-cli-secret\n",
            )
            m.run("dc-broker", "systemd", "install", "--user", user="alice")
            m.run("systemctl", "--user", "daemon-reload", user="alice")
            m.run("systemctl", "--user", "start", "dc-broker.socket", user="alice")
            samples = []
            for n in range(REAL_RUNS + 1):
                m.run("systemctl", "--user", "stop", "dc-broker.service", user="alice")
                # eleven starts in a row would hit StartLimitBurst= (5 in 10 s): not what is measured
                m.run("systemctl", "--user", "reset-failed", "dc-broker.service", user="alice")
                elapsed = float(
                    m.run(f"{harness.VENV}/bin/python", "-c", _CLIENT.format(uid=m.uid("alice")), user="alice").stdout
                )
                if n:  # the first run warms the page cache, as above
                    samples.append(elapsed)
            version = m.version
    result = {
        "runs": REAL_RUNS,
        "median_ms": statistics.median(samples) * 1e3,
        "max_ms": max(samples) * 1e3,
        "min_ms": min(samples) * 1e3,
        "systemd": version,
    }
    print(
        f"socket-activated cold start to first token under {version} (user unit, {REAL_RUNS} runs):\n"
        f"  median {result['median_ms']:.0f} ms   max {result['max_ms']:.0f} ms   (target <= 500 ms)"
    )
    return result


def main() -> dict[str, object]:
    if ACTIVATE is None:
        print("systemd-socket-activate is not installed; skipped")
        real = real_systemd()
        result = {"real_systemd": real, "verdicts": verdicts(None, real.get("median_ms"))}
        print(f"  -> {common.write('coldstart', result)}")
        return result
    idp, base = start_idp()
    try:
        with tempfile.TemporaryDirectory(prefix="dc-bench-") as tmp:
            cfg = Path(tmp) / "config.toml"
            cfg.write_text(
                f'[profiles.demo]\nserver = "{base}"\ntenant = "demo"\nclient_id = "dc-cli"\nusername = "demo"\n'
            )
            one_cold_start(Path(tmp), cfg, -1)  # warm the page cache, as a logged-in machine has it
            samples = [one_cold_start(Path(tmp), cfg, n) for n in range(RUNS)]
    finally:
        idp.terminate()
        idp.wait(10)
    median_ms = statistics.median(samples) * 1e3
    worst_ms = max(samples) * 1e3
    result: dict[str, object] = {
        "runs": RUNS,
        "median_ms": median_ms,
        "max_ms": worst_ms,
        "min_ms": min(samples) * 1e3,
        "target_ms": 500,
    }
    print(
        f"socket-activated cold start to first token (systemd-socket-activate), {RUNS} runs:\n"
        f"  median {median_ms:.0f} ms   max {worst_ms:.0f} ms   (target <= 500 ms)"
    )
    result["real_systemd"] = real = real_systemd()
    result["verdicts"] = verdicts(median_ms, real.get("median_ms"))
    common.show_verdicts(result["verdicts"])
    print(f"  -> {common.write('coldstart', result)}")
    return result


def verdicts(activate_ms: float | None, real_ms: object) -> dict[str, dict[str, object]]:
    """The cold start's target for each way it was measured (a way not measured here: neither)."""
    real = float(real_ms) if isinstance(real_ms, int | float) else None
    return {
        "median_ms": common.verdict("cold start to first token, systemd-socket-activate", activate_ms, "<=", 500, "ms"),
        "real_systemd_median_ms": common.verdict("cold start to first token, booted systemd", real, "<=", 500, "ms"),
    }


if __name__ == "__main__":
    main()
