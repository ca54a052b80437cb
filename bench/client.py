"""The client side: an in-process cached ``TokenClient.token()``, and every dc-token form's whole-process
wall time beside the interpreter floor (`python -S -c pass`, the same interpreter: issue 23's floor;
issue 2's, `python -c 'import socket, msgpack'`, is shown beside it).

Targets (issue 1/2/23): a cache hit <= 5 us; each dc-token form <= 1.5 x the floor. The forms and the
floors are measured interleaved in one run, so machine noise hits all alike. client/*.py are
byte-compiled first, as an installed package would be (this matters when PYTHONDONTWRITEBYTECODE is set).
"""

from __future__ import annotations

import compileall
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common

from dc_token.sync import TokenClient

RUNS = 30
HIT_CALLS = 100_000
GIT_INPUT = "protocol=https\nhost=dc.example.com\n\n"


def cache_hit(sock: str) -> dict[str, float]:
    """Median per-call time of token() served from the in-process cache, over batches."""
    with TokenClient(sock) as broker:
        broker.token("demo", min_ttl=60)
        batches = []
        for _ in range(20):
            t0 = time.perf_counter()
            for _ in range(HIT_CALLS // 20):
                broker.token("demo", min_ttl=60)
            batches.append((time.perf_counter() - t0) / (HIT_CALLS // 20))
        miss = []
        for _ in range(2000):  # the same request without the cache: one broker round trip each
            t0 = time.perf_counter()
            broker.request("token", profile="demo")
            miss.append(time.perf_counter() - t0)
    return {"hit_median_us": statistics.median(batches) * 1e6, "miss_median_us": statistics.median(miss) * 1e6}


def wall(cmd: list[str], env: dict[str, str], stdin: str | None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, input=stdin, text=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> dict[str, object]:
    compileall.compile_dir(str(Path(__file__).resolve().parent.parent / "client"), quiet=1)
    py = str(Path(sys.executable))
    dc_token = str(Path(sys.executable).parent / "dc-token")
    forms: dict[str, tuple[list[str], str | None]] = {
        "floor": ([py, "-S", "-c", "pass"], None),
        "issue 2's floor": ([py, "-c", "import socket, msgpack"], None),
        "token": ([dc_token, "demo"], None),
        "header": ([dc_token, "demo", "--header"], None),
        "json": ([dc_token, "demo", "--json"], None),
        "exec-credential": ([dc_token, "demo", "--exec-credential"], None),
        "git-credential": ([dc_token, "git-credential", "--profile", "demo", "get"], GIT_INPUT),
        "exec": ([dc_token, "exec", "demo", "--", "/bin/true"], None),
        "true": (["/bin/true"], None),
    }
    with common.dev() as (sock, _):
        hit = cache_hit(sock)
        env = {**os.environ, "DC_BROKER_SOCKET": sock}
        samples: dict[str, list[float]] = {name: [] for name in forms}
        for i in range(RUNS + 3):
            for name, (cmd, stdin) in forms.items():
                t = wall(cmd, env, stdin)
                if i >= 3:  # warm-up
                    samples[name].append(t)
    ms = {name: statistics.median(xs) * 1e3 for name, xs in samples.items()}
    floor = ms["floor"]
    # `exec` runs /bin/true after dc-token: its cost is charged to the command, not to dc-token
    ms["exec"] -= ms.pop("true")
    ratios = {name: ms[name] / floor for name in ms if name != "floor"}
    result = {
        "cache_hit_us": hit["hit_median_us"],
        "cache_miss_roundtrip_us": hit["miss_median_us"],
        "python_floor_ms": floor,
        "dc_token_ms": {name: ms[name] for name in ratios},
        "ratio": ratios,
        "runs": RUNS,
        "targets": {"cache_hit_us": 5, "ratio": 1.5},
    }
    print(
        f"TokenClient.token() cache hit: {hit['hit_median_us']:.2f} us   (target <= 5; a broker round trip: "
        f"{hit['miss_median_us']:.0f} us)"
    )
    print(f"whole-process wall time, median of {RUNS}:")
    print(f"  python -S -c pass:                   {floor:6.1f} ms")
    for name, ratio in ratios.items():
        print(f"  dc-token {name:<28} {ms[name]:6.1f} ms   ratio {ratio:.2f} (target <= 1.5)")
    print(f"  -> {common.write('client', result)}")
    return result


if __name__ == "__main__":
    main()
