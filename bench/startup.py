"""dc-token whole-process wall time beside the interpreter floor (`python -S -c pass`, the same
interpreter; issue 2's floor, `python -c 'import socket, msgpack'`, beside it).

Target (issues 2 and 23): dc-token <= 1.5 x the floor. All are measured in the same run,
interleaved, so machine noise hits them alike. (bench/compare.py has the same figure beside
oidc-token and, with --baseline, another checkout's dc-token.)
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

RUNS = 40


def wall(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> dict[str, object]:
    # an installed package has its bytecode; this environment may set PYTHONDONTWRITEBYTECODE, which
    # would make every dc-token run compile client/ again and measure the compiler, not dc-token
    compileall.compile_dir(str(Path(__file__).resolve().parent.parent / "client"), quiet=1)
    py = str(Path(sys.executable))
    dc_token = str(Path(sys.executable).parent / "dc-token")
    with common.dev() as (sock, _):
        env = {**os.environ, "DC_BROKER_SOCKET": sock}
        floor, old_floor, tok = [], [], []
        for _ in range(5):
            wall([py, "-S", "-c", "pass"], env)
            wall([dc_token, "demo"], env)
        for _ in range(RUNS):
            floor.append(wall([py, "-S", "-c", "pass"], env))
            old_floor.append(wall([py, "-c", "import socket, msgpack"], env))
            tok.append(wall([dc_token, "demo"], env))
    f, o, t = (statistics.median(xs) * 1e3 for xs in (floor, old_floor, tok))
    result = {
        "python_floor_ms": f,
        "issue2_floor_ms": o,
        "dc_token_ms": t,
        "ratio": t / f,
        "runs": RUNS,
        "target_ratio": 1.5,
    }
    print(
        f"whole-process wall time, median of {RUNS}:\n"
        f"  python -S -c pass:                   {f:.1f} ms\n"
        f"  python -c 'import socket, msgpack':  {o:.1f} ms\n"
        f"  dc-token demo:                       {t:.1f} ms   ratio {t / f:.2f} (target <= 1.5)"
    )
    print(f"  -> {common.write('startup', result)}")
    return result


if __name__ == "__main__":
    main()
