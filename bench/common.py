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
