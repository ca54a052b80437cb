"""dc-token's printed forms for every lifetime a broker may report: no overflow, no expiry in the past,
and a min_ttl shortfall is said on stderr. (Pure: the printing helpers, no broker.)"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import pytest

from dc_token import cli
from dc_token.protocol import MAX_MIN_TTL, min_ttl_problem


def _stamp(doc: dict[str, object]) -> float:
    status = doc["status"]
    assert isinstance(status, dict)
    return datetime.strptime(status["expirationTimestamp"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


@pytest.mark.parametrize("left", [0.0, 0.4, 1.0, 5.0, 59.0, 61.0, 119.0, 300.0, 1e7])
def test_exec_credential_never_reports_an_expiry_in_the_past(left: float) -> None:
    now = time.time()
    doc = cli.exec_credential("t", now + left, now)
    stamp = _stamp(doc)
    assert now <= stamp <= max(now + left, now) + 1
    if left >= 2 * cli.EXEC_CREDENTIAL_MARGIN:
        assert stamp == pytest.approx(now + left - cli.EXEC_CREDENTIAL_MARGIN, abs=1)


@pytest.mark.parametrize("expires_at", [float("inf"), float("nan"), 1e18, 1e300])
def test_absurd_expiries_are_bounded_before_printing(expires_at: float) -> None:
    now = time.time()
    bounded = cli._bounded(expires_at, now)
    assert now <= bounded <= now + cli.MAX_PRINTED_LIFETIME
    json.dumps(cli.exec_credential("t", bounded, now))  # no OverflowError in gmtime
    int(bounded)


def test_one_min_ttl_bound_for_the_broker_and_dc_token() -> None:
    assert min_ttl_problem(MAX_MIN_TTL) is None and min_ttl_problem(0) is None
    for bad in (MAX_MIN_TTL + 1, -1, float("nan"), float("inf"), True, "60"):
        assert min_ttl_problem(bad) is not None
    with pytest.raises(cli._Usage, match="between 0 and 86400"):
        cli._seconds("100000")


def test_a_shortfall_is_said_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    cli._warn_short(150.0, 1000.0)
    assert "less than --min-ttl 1000" in capsys.readouterr().err
    cli._warn_short(150.0, 100.0)
    assert capsys.readouterr().err == ""


def test_help_documents_the_min_ttl_contract() -> None:
    text = cli._help()
    assert "min_ttl_shortfall" in text and f"at most {MAX_MIN_TTL:g}" in text
