"""The suite's own rules: under ``CI=true`` a test that skips fails, saying why it skipped
(tests/conftest.py), so CI never passes by not running a test; on a developer's machine it skips
with its reason."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("ci", "outcome"), [("true", "failed"), ("", "skipped")])
def test_a_skip_fails_under_ci_and_says_why(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str, outcome: str
) -> None:
    monkeypatch.setenv("CI", ci)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makepyfile(
        test_needs="""
import pytest

def test_needs_a_widget():
    pytest.skip("no widget here (apt-get install widget)")

@pytest.mark.xfail(reason="a known bug", strict=True)
def test_known_bug():
    assert False
"""
    )
    result = pytester.runpytest_subprocess("-p", "tests.conftest", "-p", "no:cacheprovider", "-rsf")
    result.assert_outcomes(**{outcome: 1, "xfailed": 1})
    if ci:
        result.stdout.fnmatch_lines(["*CI=true: this test must run in CI, but it skipped: *no widget here*"])
    else:
        result.stdout.fnmatch_lines(["*SKIPPED*no widget here*"])
