"""A broker with 10,000 profiles (issue 4): start-up to ready, unlock, ready after unlock, RSS.

Builds a passphrase vault (production Argon2id: 64 MiB) holding 10,000 profiles, each with a secret
and a stored, still-valid token set, and a config.toml naming them (their IdP is an unused loopback
port: nothing needs refreshing for 22 minutes). Then a real `dc-broker run`:
  start-up     process start until the socket answers (vault locked)
  unlock       `unlock` request round trip (Argon2id + unwrapping)
  ready        unlock sent until every profile is served from its stored token (target <= 2 s)
  RSS          the daemon's resident memory when all 10,000 are ready (target <= 150 MiB)

    python bench/scale.py [PROFILES]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common

from dc_broker.cli.talk import ask
from dc_broker.secret import Secret
from dc_broker.tokens import Credentials, TokenSet
from dc_broker.vault import Passphrase, Vault
from tests.e2e import DC_BROKER, DC_TOKEN, wait_for_socket

PASSPHRASE = "bench passphrase"


async def fill(vault: Vault, n: int) -> None:
    now = time.time()
    for i in range(n):
        name = f"p{i:05d}"
        vault.set_credentials(name, Credentials(client_secret=Secret(f"secret-{i}")))
        tokens = TokenSet(
            access_token=Secret(f"access-{i}"),
            obtained_at=now,
            expires_at=now + 1800,
            refresh_token=None,
        )
        await vault.save_tokens(name, tokens)


def rss_kb(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    with tempfile.TemporaryDirectory(prefix="dc-scale-") as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DC_BROKER_")}
        env.update(XDG_CONFIG_HOME=f"{tmp}/config", XDG_DATA_HOME=f"{tmp}/data", DC_BROKER_SOCKET=f"{tmp}/run/b.sock")
        vault_path = f"{tmp}/data/dc-broker/vault.db"
        t0 = time.perf_counter()
        vault = Vault.create(vault_path, Passphrase(), passphrase=Secret(PASSPHRASE))
        trio.run(fill, vault, n)
        vault.close()
        cfg = Path(f"{tmp}/config/dc-broker/config.toml")
        cfg.parent.mkdir(parents=True)
        cfg.write_text(
            "".join(
                f'[profiles.p{i:05d}]\nserver = "http://127.0.0.1:9"\ntenant = "t"\nclient_id = "c"\n'
                'grant = "client_credentials"\n'
                for i in range(n)
            )
        )
        build = time.perf_counter() - t0
        sock = env["DC_BROKER_SOCKET"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [DC_BROKER, "run"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        try:
            wait_for_socket(sock, proc, timeout=120)
            startup = time.perf_counter() - t0
            t1 = time.perf_counter()
            ask(sock, "unlock", passphrase=PASSPHRASE)
            unlock = time.perf_counter() - t1
            while ask(sock, "status")["broker"]["states"].get("fresh", 0) < n:
                time.sleep(0.01)
            ready = time.perf_counter() - t1
            last = subprocess.run([DC_TOKEN, f"p{n - 1:05d}"], env=env, capture_output=True, text=True)
            assert last.stdout.strip() == f"access-{n - 1}", last.stderr
            mem = rss_kb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(60)
    result = {
        "profiles": n,
        "build_seconds": build,
        "startup_to_ready_s": startup,
        "unlock_request_s": unlock,
        "ready_after_unlock_s": ready,
        "rss_mib": mem["VmRSS"] / 1024,
        "peak_rss_mib": mem["VmHWM"] / 1024,
        "targets": {"ready_after_unlock_s": 2.0, "rss_mib": 150},
    }
    print(
        f"{n:,} profiles: start-up to ready (locked) {startup:.2f} s; unlock {unlock:.2f} s;\n"
        f"  every profile served from its stored token {ready:.2f} s after unlock (target <= 2 s)\n"
        f"  daemon RSS {result['rss_mib']:.0f} MiB, peak {result['peak_rss_mib']:.0f} MiB (target <= 150 MiB)"
    )
    print(f"  -> {common.write('scale', result)}")


if __name__ == "__main__":
    main()
