"""`make bench` runs every benchmark: one that fails is reported at the end, not the end of the run."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import run as bench_run


def test_a_failing_benchmark_does_not_stop_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ran = tmp_path / "ran"
    for name, body in {
        "raises": "raise RuntimeError('the real systemd is not there')",
        "exits": "import sys; sys.exit(3)",
        "fine": "",
        "quits": "import sys; sys.exit(0)",
    }.items():
        (tmp_path / f"{name}.py").write_text(f"open({str(ran)!r}, 'a').write('{name} ')\n{body}\n")
    monkeypatch.setattr(bench_run, "HERE", tmp_path)
    monkeypatch.setattr(bench_run, "BENCHES", ["raises", "exits", "fine", "quits"])
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    assert bench_run.main(["raises", "exits", "fine", "quits"]) == 1
    assert ran.read_text().split() == ["raises", "exits", "fine", "quits"]  # every one ran
    err = capsys.readouterr().err
    assert "2 of 4 benchmark(s) failed" in err
    assert "raises: RuntimeError: the real systemd is not there" in err and "exits: exit status 3" in err
    assert "fine" not in err.split("failed:")[1] and "quits" not in err.split("failed:")[1]
    assert bench_run.main(["fine", "quits"]) == 0
    assert bench_run.main(["nope"]) == 2


def test_the_run_ends_with_every_target_it_measured_and_strict_makes_a_miss_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import common

    results = tmp_path / "results"
    results.mkdir()
    # a result left by an earlier run is not this run's: its verdict is not repeated
    (results / "old.json").write_text(json.dumps({"verdicts": {"x": common.verdict("stale figure", 9.0, "<=", 1.0)}}))
    os.utime(results / "old.json", (1, 1))
    lines = {
        "fast": 'common.verdict("fast thing", 0.5, "<=", 1.0, "ms")',
        "slow": 'common.verdict("slow thing", 2.0, ">=", 3.0)',
        "absent": 'common.verdict("absent thing", None, "<=", 1.0)',
    }
    for name, verdict in lines.items():
        (tmp_path / f"{name}.py").write_text(
            "import json, pathlib, common\n"
            f"path = pathlib.Path({str(results)!r}) / '{name}.json'\n"
            f"path.write_text(json.dumps({{'verdicts': {{'v': {verdict}}}}}))\n"
        )
    monkeypatch.setattr(bench_run, "HERE", tmp_path)
    monkeypatch.setattr(bench_run, "BENCHES", ["old", "fast", "slow", "absent"])
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    assert bench_run.main(["fast", "slow", "absent"]) == 0  # a missed target is a figure, not a failure
    out = capsys.readouterr().out
    summary = out.split("targets of this run")[1].splitlines()
    assert summary[:4] == [
        " (1 of 3 met):",
        "  fast thing: 0.5 ms (target <= 1 ms) met",
        "  slow thing: 2x (target >= 3x) MISSED",
        "  absent thing: not measured here",
    ]
    assert "stale figure" not in out
    assert bench_run.main(["fast", "slow", "absent"], strict=True) == 1
    assert "1 target(s) missed (--strict)" in capsys.readouterr().err
    assert bench_run.main(["fast", "absent"], strict=True) == 0


def test_a_verdict_is_met_missed_or_not_measured() -> None:
    import common

    assert common.verdict("a", 1.1, "<=", 1.1)["met"] is True
    assert common.verdict("a", 1.11, "<=", 1.1)["met"] is False
    assert common.verdict("a", 0.9, ">=", 0.9)["met"] is True
    assert common.verdict("a", 0.89, ">=", 0.9)["met"] is False
    assert common.verdict("a", float("nan"), ">=", 0.9)["met"] is None
    assert common.verdict("rss", 74.25, "<=", 120, "MiB")["line"] == "rss: 74.25 MiB (target <= 120 MiB) met"
    assert common.verdict("p99", 2142.4, "<=", 5000, "us")["line"] == "p99: 2,142 us (target <= 5,000 us) met"
    assert common.verdict("lost logins", 2, "<=", 0, "")["line"] == "lost logins: 2 (target <= 0) MISSED"
    with pytest.raises(ValueError, match="sense"):
        common.verdict("a", 1.0, "<", 1.0)


def test_the_cold_start_is_judged_both_ways_it_is_measured() -> None:
    """What made a 5.3 s socket-activated start under systemd (a check that knocked on its own socket)
    a figure in a JSON file nobody read: the cold start now says met or MISSED for each way it runs,
    and ``make bench`` lists it with the others."""
    import coldstart

    judged = coldstart.verdicts(246.0, 5262.0)
    assert judged["median_ms"]["met"] is True
    assert judged["real_systemd_median_ms"]["line"] == (
        "cold start to first token, booted systemd: 5,262 ms (target <= 500 ms) MISSED"
    )
    assert coldstart.verdicts(None, None)["real_systemd_median_ms"]["met"] is None  # no systemd-nspawn here


def test_compare_judges_its_four_ratios_from_the_medians() -> None:
    import compare

    figures = compare.Figures()
    me = "this tree"
    figures.add("persistent", me, [1.2e-4] * 3)
    figures.add("persistent", compare.ECHO, [1.0e-4] * 3)
    figures.add("rps_64", me, [9_500.0])
    figures.add("rps_64", compare.ECHO, [10_000.0])
    figures.add("wall", f"dc-token ({me})", [0.021])
    figures.add("wall", "python -S -c pass", [0.015])
    verdicts = compare._verdicts(figures)
    assert [v["line"] for v in verdicts.values()] == [
        "persistent round trip / trio echo: 1.2x (target <= 1.1x) MISSED",
        "new connection per request / oidc-agent: not measured here",  # no oidc-agent on this machine
        "64-client throughput / trio echo: 0.95x (target >= 0.9x) met",
        "dc-token whole process / python -S -c pass: 1.4x (target <= 1.5x) met",
    ]
