"""`make bench`: run every benchmark, print the figures, write bench/results/*.json.

A benchmark that fails (an exception, a non-zero exit, a missing tool) does not stop the others: its
error is printed where it happened, the rest run, and the run ends with the list of the failed ones
and a non-zero exit status.

    python bench/run.py [NAME...]      (default: all of them, in this order)
"""

from __future__ import annotations

import runpy
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = [
    "compare",
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


def run_one(name: str) -> str | None:
    """Run bench/NAME.py as a script with its defaults; why it failed, or None."""
    sys.argv = [str(HERE / f"{name}.py")]  # each bench with its defaults, not our arguments
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as exc:  # a bench's own exit status must not end the others
        if exc.code not in (0, None):
            return f"exit status {exc.code}" if isinstance(exc.code, int) else str(exc.code)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # any failure of one bench is reported, and the run goes on
        traceback.print_exc()
        return f"{type(exc).__name__}: {exc}"
    return None


def main(names: list[str]) -> int:
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    sys.path.insert(0, str(HERE))
    failed: dict[str, str] = {}
    for name in names:
        print(f"\n### {name}", flush=True)
        t0 = time.monotonic()
        why = run_one(name)
        if why is not None:
            failed[name] = why
            print(f"### {name} FAILED after {time.monotonic() - t0:.0f} s: {why}", flush=True)
    if failed:
        print(f"\n{len(failed)} of {len(names)} benchmark(s) failed:", file=sys.stderr)
        for name, why in failed.items():
            print(f"  {name}: {why}", file=sys.stderr)
        return 1
    print(f"\nall {len(names)} benchmark(s) ran", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or BENCHES))
