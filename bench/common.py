"""Shared pieces for the benchmarks: a `dc-broker dev` process, statistics, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.e2e import dev_broker

RESULTS = Path(__file__).resolve().parent / "results"


@contextmanager
def dev() -> Iterator[tuple[str, str]]:
    with tempfile.TemporaryDirectory(prefix="dc-bench-") as tmp, dev_broker(Path(tmp)) as (sock, base, _):
        yield sock, base


def summary_us(samples_s: list[float]) -> dict[str, float]:
    xs = sorted(samples_s)
    return {
        "n": len(xs),
        "median_us": statistics.median(xs) * 1e6,
        "p99_us": xs[min(len(xs) - 1, int(len(xs) * 0.99))] * 1e6,
        "min_us": xs[0] * 1e6,
    }


def verdict(what: str, value: float | None, sense: str, target: float, unit: str = "x") -> dict[str, object]:
    """One target's verdict, as every benchmark with a target writes it (``verdicts`` in its JSON).

    ``sense`` is ``"<="`` or ``">="``; a value that was not measured (None or NaN) is neither met nor
    missed. ``line`` is what is printed, and what ``bench/run.py`` repeats at the end of ``make bench``.
    """
    if sense not in ("<=", ">="):
        raise ValueError(f"sense must be <= or >=, not {sense!r}")
    if value is None or value != value:
        return {
            "what": what,
            "value": None,
            "sense": sense,
            "target": target,
            "met": None,
            "line": f"{what}: not measured here",
        }
    met = value <= target if sense == "<=" else value >= target
    shown, limit = (_number(v) + (unit if unit in ("x", "") else f" {unit}") for v in (value, target))
    return {
        "what": what,
        "value": value,
        "sense": sense,
        "target": target,
        "met": met,
        "line": f"{what}: {shown} (target {sense} {limit}) {'met' if met else 'MISSED'}",
    }


def show_verdicts(verdicts: dict[str, dict[str, object]]) -> None:
    """Print each verdict's line, indented under the figures it judges."""
    for verdict in verdicts.values():
        print(f"  {verdict['line']}")


def _number(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}".rstrip("0").rstrip(".")


def write(name: str, data: dict[str, object]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    data = {
        "bench": name,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        **data,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
