"""`dc-broker` start-up: whole-process wall time of `dc-broker --help` and of one shell-completion
call (what bash runs on TAB: `_DC_BROKER_COMPLETE=bash_complete`), beside the Python floor
(`python -c pass`). Interleaved in one run, so machine noise hits all three alike.

No broker is needed: neither command talks to the socket. The completion call completes a
profile name of `dc-broker status`, so it reads a (small, temporary) config.toml as a user's would.
"""

from __future__ import annotations

import compileall
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import common
from startup import wall

RUNS = 20


def main() -> dict[str, object]:
    # an installed package has its bytecode (see startup.py): measure the imports, not the compiler
    root = Path(__file__).resolve().parent.parent
    for tree in ("broker", "client"):
        compileall.compile_dir(str(root / tree), quiet=1)
    py = str(Path(sys.executable))
    dc_broker = str(Path(sys.executable).parent / "dc-broker")
    with tempfile.TemporaryDirectory(prefix="dc-bench-cli-") as tmp:
        config = Path(tmp) / "config.toml"
        profile = '[profiles.p{}]\nserver = "https://idp.example"\ntenant = "t"\n'
        profile += 'client_id = "c"\ngrant = "client_credentials"\n'
        config.write_text("".join(profile.format(i) for i in range(5)))
        config.chmod(0o600)
        env = {**os.environ, "DC_BROKER_CONFIG": str(config)}
        complete_env = {
            **env,
            "_DC_BROKER_COMPLETE": "bash_complete",
            "COMP_WORDS": "dc-broker status p",
            "COMP_CWORD": "2",
        }
        out = subprocess.run([dc_broker], env=complete_env, check=True, capture_output=True, text=True).stdout
        assert "p0" in out, f"completion did not complete the profiles: {out!r}"
        floor, helps, completes = [], [], []
        for i in range(RUNS + 3):
            f = wall([py, "-c", "pass"], env)
            h = wall([dc_broker, "--help"], env)
            c = wall([dc_broker], complete_env)
            if i >= 3:  # warm-up runs fill the page cache
                floor.append(f)
                helps.append(h)
                completes.append(c)
    f_ms, h_ms, c_ms = (statistics.median(xs) * 1e3 for xs in (floor, helps, completes))
    result = {"python_floor_ms": f_ms, "help_ms": h_ms, "complete_ms": c_ms, "runs": RUNS}
    print(
        f"whole-process wall time, median of {RUNS}:\n"
        f"  python -c pass:                   {f_ms:.1f} ms\n"
        f"  dc-broker --help:                 {h_ms:.1f} ms\n"
        f"  dc-broker completion (one TAB):   {c_ms:.1f} ms"
    )
    print(f"  -> {common.write('broker_cli', result)}")
    return result


if __name__ == "__main__":
    main()
