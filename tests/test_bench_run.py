"""`make bench` runs every benchmark: one that fails is reported at the end, not the end of the run."""

from __future__ import annotations

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
