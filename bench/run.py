"""`make bench`: run every benchmark, print the figures, write bench/results/*.json."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ["roundtrip", "startup", "client", "lifecycle", "coldstart", "vault", "scale", "crash", "fuzz"]

if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    only = sys.argv[1:] or BENCHES
    for name in only:
        print(f"\n### {name}")
        runpy.run_path(str(HERE / f"{name}.py"), run_name="__main__")
