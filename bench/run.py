"""`make bench`: run every benchmark, print the figures, write bench/results/*.json."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = [
    "roundtrip",
    "startup",
    "broker_cli",
    "client",
    "lifecycle",
    "coldstart",
    "vault",
    "scale",
    "crash",
    "fuzz",
    "proxy",
]

if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    only = sys.argv[1:] or BENCHES
    failed: list[str] = []
    for name in only:
        print(f"\n### {name}", flush=True)
        sys.argv = [str(HERE / f"{name}.py")]  # each bench with its defaults, not our arguments
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
        except SystemExit as exc:  # a bench's own exit status must not end the others
            if exc.code not in (0, None):
                failed.append(name)
    if failed:
        sys.exit(f"benchmarks that failed: {', '.join(failed)}")
