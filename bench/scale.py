"""A broker with 10,000 profiles (issues 4 and 23): start-up, unlock, every profile served, memory.

Builds a passphrase vault (production Argon2id: 64 MiB) holding 10,000 profiles, each with a secret
and a stored, still-valid token set, and a config.toml naming them (their IdP is an unused loopback
port: nothing needs refreshing for 22 minutes). Then a real `dc-broker run`:
  start-up     process start until the socket answers (vault locked)
  unlock       the `unlock` request's round trip (Argon2id + unwrapping)
  served       unlock sent until every one of the profiles has answered a `token` request from
               memory (pipelined on one connection; target <= 1 s)
  RSS, peak    the daemon's resident memory then (VmRSS) and its high-water mark (VmHWM, which
               includes Argon2id's 64 MiB during the unlock); target <= 120 MiB, locked RSS beside

    python bench/scale.py [PROFILES]             the daemon figures
    python bench/scale.py --profile [PROFILES]   where the memory goes: the same config, vault and
                                                 `run_broker` in this process under tracemalloc;
                                                 per profile, by source line and by object type,
                                                 at each phase (config loaded, sessions made,
                                                 unlocked and served)
"""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common

from dc_broker.cli.talk import ask
from dc_broker.secret import Secret
from dc_broker.tokens import Credentials, TokenSet
from dc_broker.vault import Passphrase, Vault
from dc_token.protocol import Request, encode
from tests.e2e import DC_BROKER, wait_for_socket

PASSPHRASE = "bench passphrase"
TARGETS = {"served_after_unlock_s": 1.0, "rss_mib": 120, "peak_rss_mib": 120}


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


def build(tmp: str, n: int) -> tuple[dict[str, str], float]:
    """The vault and config.toml of ``n`` profiles under ``tmp``; (environment, seconds it took)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DC_BROKER_")}
    env.update(XDG_CONFIG_HOME=f"{tmp}/config", XDG_DATA_HOME=f"{tmp}/data", DC_BROKER_SOCKET=f"{tmp}/run/b.sock")
    t0 = time.perf_counter()
    vault = Vault.create(f"{tmp}/data/dc-broker/vault.db", Passphrase(), passphrase=Secret(PASSPHRASE))
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
    return env, time.perf_counter() - t0


def memory_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def serve_all(sock_path: str, names: list[str], timeout: float = 60.0) -> int:
    """Ask for every profile's token, pipelined on one connection, until each has been served from
    memory (a profile that is not yet is asked again); returns how many passes it took."""
    deadline = time.monotonic() + timeout
    left = list(names)
    passes = 0
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock_path)
    try:
        while left:
            passes += 1
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(left)} profile(s) still not served after {timeout:g} s")
            failed = []
            for start in range(0, len(left), 500):
                chunk = left[start : start + 500]
                s.sendall(b"".join(encode(Request(i + 1, "token", {"profile": p})) for i, p in enumerate(chunk)))
                buf, got = b"", 0
                while got < len(chunk):
                    data = s.recv(1 << 20)
                    if not data:
                        raise ConnectionError("the broker closed the connection")
                    buf += data
                    while len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[:4], "big"):
                        size = int.from_bytes(buf[:4], "big")
                        reply = msgpack.unpackb(buf[4 : 4 + size], raw=False)
                        buf = buf[4 + size :]
                        got += 1
                        if not reply.get("ok"):
                            failed.append(chunk[reply["id"] - 1])
            left = failed
            if left:
                time.sleep(0.01)
    finally:
        s.close()
    return passes


def main(n: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="dc-scale-") as tmp:
        env, build_s = build(tmp, n)
        sock = env["DC_BROKER_SOCKET"]
        names = [f"p{i:05d}" for i in range(n)]
        t0 = time.perf_counter()
        with open(f"{tmp}/broker.log", "w") as log:  # a file, not a pipe nobody reads: 10,000 profiles log a lot
            proc = subprocess.Popen([DC_BROKER, "run"], env=env, stdout=subprocess.DEVNULL, stderr=log)
        try:
            wait_for_socket(sock, proc, timeout=120)
            startup = time.perf_counter() - t0
            locked = memory_kib(proc.pid)
            t1 = time.perf_counter()
            ask(sock, "unlock", passphrase=PASSPHRASE)
            unlock = time.perf_counter() - t1
            passes = serve_all(sock, names)
            served = time.perf_counter() - t1
            mem = memory_kib(proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                print("  (the broker took more than 60 s to stop; killed)", Path(tmp, "broker.log").read_text()[-800:])
                proc.kill()
                proc.wait()
    result: dict[str, Any] = {
        "profiles": n,
        "build_seconds": build_s,
        "startup_to_ready_s": startup,
        "unlock_request_s": unlock,
        "served_after_unlock_s": served,
        "serve_passes": passes,
        "locked_rss_mib": locked["VmRSS"] / 1024,
        "rss_mib": mem["VmRSS"] / 1024,
        "peak_rss_mib": mem["VmHWM"] / 1024,
        "targets": TARGETS,
    }
    result["verdicts"] = {
        key: common.verdict(f"{n:,} profiles: {what}", result[key], "<=", TARGETS[key], unit)
        for key, what, unit in (
            ("served_after_unlock_s", "every profile served after unlock", "s"),
            ("rss_mib", "daemon RSS", "MiB"),
            ("peak_rss_mib", "daemon peak RSS", "MiB"),
        )
    }
    print(
        f"{n:,} profiles: start-up to ready (locked) {startup:.2f} s; unlock request {unlock:.2f} s;\n"
        f"  every profile served a token from memory {served:.2f} s after unlock ({passes} pass(es))\n"
        f"  daemon RSS {result['rss_mib']:.0f} MiB, peak {result['peak_rss_mib']:.0f} MiB;"
        f" locked {result['locked_rss_mib']:.0f} MiB"
    )
    common.show_verdicts(result["verdicts"])
    print(f"  -> {common.write('scale', result)}")
    return result


# ---------------------------------------------------------------- where the memory goes


def _by_type() -> Counter[str]:
    sizes: Counter[str] = Counter()
    objects = gc.get_objects()
    for obj in objects:
        if obj is not objects:
            sizes[type(obj).__qualname__] += sys.getsizeof(obj)
    return sizes


def profile(n: int, top: int = 25) -> dict[str, Any]:
    """The daemon's own composition (``run_broker``) in this process under tracemalloc."""
    import tracemalloc

    from dc_broker.config.load import load_config
    from dc_broker.daemon import BrokerSettings, run_broker

    with tempfile.TemporaryDirectory(prefix="dc-scale-") as tmp:
        env, _ = build(tmp, n)
        sock = env["DC_BROKER_SOCKET"]
        names = [f"p{i:05d}" for i in range(n)]
        gc.collect()
        tracemalloc.start(1)
        phases: list[tuple[str, tracemalloc.Snapshot, Counter[str]]] = [
            ("start", tracemalloc.take_snapshot(), _by_type())
        ]

        def mark(phase: str) -> None:
            gc.collect()
            phases.append((phase, tracemalloc.take_snapshot(), _by_type()))

        async def run() -> None:
            config = load_config(f"{tmp}/config/dc-broker/config.toml", missing_ok=False)
            mark("config loaded")
            vault = Vault.open(f"{tmp}/data/dc-broker/vault.db")
            async with trio.open_nursery() as nursery:
                await nursery.start(run_broker, config.profiles, vault, BrokerSettings(socket_path=sock))
                mark("sessions made (locked)")
                await trio.to_thread.run_sync(lambda: ask(sock, "unlock", passphrase=PASSPHRASE))
                await trio.to_thread.run_sync(serve_all, sock, names)
                mark("unlocked, every profile served")
                nursery.cancel_scope.cancel()

        trio.run(run)
        tracemalloc.stop()
    report: dict[str, Any] = {"profiles": n, "phases": []}
    for (name, snap, types), (_, prev, prev_types) in zip(phases[1:], phases[:-1], strict=True):
        stats = snap.compare_to(prev, "lineno")
        total = sum(s.size_diff for s in stats)
        print(f"\n{name}: +{total / 2**20:.1f} MiB traced, {total / n:,.0f} bytes per profile")
        lines = []
        for s in stats[:top]:
            where = s.traceback[0]
            file = "/".join(Path(where.filename).parts[-3:])
            per = s.size_diff / n
            print(f"  {per:8,.0f} B/profile  {s.count_diff / n:6.1f} blocks/profile  {file}:{where.lineno}")
            lines.append({"where": f"{file}:{where.lineno}", "bytes_per_profile": per, "blocks": s.count_diff})
        grown = (types - prev_types).most_common(top)
        print("  by type (sys.getsizeof of gc-tracked objects, shallow):")
        for type_name, size in grown[:15]:
            print(f"  {size / n:8,.0f} B/profile  {type_name}")
        report["phases"].append(
            {
                "phase": name,
                "traced_bytes": total,
                "bytes_per_profile": total / n,
                "by_line": lines,
                "by_type": {t: s / n for t, s in grown},
            }
        )
    print(f"  -> {common.write('scale_memory', report)}")
    return report


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--profile"]:
        profile(int(args[1]) if len(args) > 1 else 10_000)
    else:
        main(int(args[0]) if args else 10_000)
