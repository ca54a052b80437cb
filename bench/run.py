"""`make bench`: run every benchmark, print the figures, write bench/results/*.json.

A benchmark that fails (an exception, a non-zero exit, a missing tool) does not stop the others: its
error is printed where it happened, the rest run, and the run ends with the list of the failed ones
and a non-zero exit status. Before that list comes every target the run measured, met or MISSED, in
one place: the ``verdicts`` of each benchmark's JSON written by this run. A missed target is a
figure, not a failure; ``--strict`` makes it one (exit status 1).

    python bench/run.py [--strict] [NAME...]      (default: all of them, in this order)
"""

from __future__ import annotations

import json
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


def verdicts_since(started: float) -> list[dict[str, object]]:
    """The verdicts of every results/*.json written since ``started`` (a time.time()), in BENCHES order."""
    found: list[dict[str, object]] = []
    for name in BENCHES:
        path = HERE / "results" / f"{name}.json"
        try:
            if path.stat().st_mtime < started:
                continue
            verdicts = json.loads(path.read_text()).get("verdicts", {})
        except (OSError, ValueError):
            continue
        found += verdicts.values()
    return found


def main(names: list[str], strict: bool = False) -> int:
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    sys.path.insert(0, str(HERE))
    started = time.time()
    failed: dict[str, str] = {}
    for name in names:
        print(f"\n### {name}", flush=True)
        t0 = time.monotonic()
        why = run_one(name)
        if why is not None:
            failed[name] = why
            print(f"### {name} FAILED after {time.monotonic() - t0:.0f} s: {why}", flush=True)
    verdicts = verdicts_since(started)
    missed = [v for v in verdicts if v["met"] is False]
    if verdicts:
        met = sum(v["met"] is True for v in verdicts)
        print(f"\ntargets of this run ({met} of {len(verdicts)} met):", flush=True)
        for verdict in verdicts:
            print(f"  {verdict['line']}", flush=True)
    if failed:
        print(f"\n{len(failed)} of {len(names)} benchmark(s) failed:", file=sys.stderr)
        for name, why in failed.items():
            print(f"  {name}: {why}", file=sys.stderr)
        return 1
    print(f"\nall {len(names)} benchmark(s) ran", flush=True)
    if strict and missed:
        print(f"{len(missed)} target(s) missed (--strict)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    strict = "--strict" in args
    sys.exit(main([a for a in args if a != "--strict"] or BENCHES, strict))
