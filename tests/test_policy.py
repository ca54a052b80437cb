"""Refresh timing, backoff and min_ttl rules: pure functions, plain numbers."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dc_broker.sessions import policy
from dc_broker.sessions.policy import DEFAULT_POLICY as P

T = 1800.0


@given(st.floats(0, 1, exclude_max=True), st.floats(0, 1e9))
def test_refresh_lands_in_the_window(rand: float, t0: float) -> None:
    at = policy.refresh_at(P, obtained_at=t0, expires_at=t0 + T, refresh_expires_at=None, rand=rand)
    lo, hi = policy.refresh_window(P, obtained_at=t0, expires_at=t0 + T)
    assert lo - 1e-6 <= at <= hi + 1e-6
    assert lo == pytest.approx(t0 + 0.70 * T) and hi == pytest.approx(t0 + 0.80 * T)


def test_refresh_comes_before_the_refresh_tokens_deadline() -> None:
    # access 30 min but the session idles out after 10 min: refresh before the refresh token dies
    at = policy.refresh_at(P, obtained_at=0, expires_at=T, refresh_expires_at=600, rand=0.99)
    assert at == pytest.approx(600 - 0.15 * 600)
    # Keycloak's 30/30: the refresh token dies with the access token; 75% still comes first
    at = policy.refresh_at(P, obtained_at=0, expires_at=T, refresh_expires_at=T, rand=0.5)
    assert at == pytest.approx(0.75 * T)


def test_refresh_never_scheduled_before_obtained() -> None:
    assert policy.refresh_at(P, obtained_at=100, expires_at=100, refresh_expires_at=100, rand=0.0) == 100


@pytest.mark.parametrize(
    ("min_ttl", "lifetime", "expected"),
    [(0, 1800, 0), (60, 1800, 60), (900, 1800, 900), (3600, 1800, 900), (10, 0, 10), (-5, 100, 0)],
)
def test_min_ttl_is_capped_at_half_the_lifetime(min_ttl: float, lifetime: float, expected: float) -> None:
    assert policy.effective_min_ttl(P, min_ttl, lifetime) == expected


def test_backoff_full_jitter_grows_and_caps() -> None:
    assert policy.backoff_delay(P, 1, 0.999) == pytest.approx(0.999)
    assert policy.backoff_delay(P, 4, 0.999) == pytest.approx(8 * 0.999)
    assert policy.backoff_delay(P, 40, 0.999) == pytest.approx(300 * 0.999)
    assert policy.backoff_delay(P, 3, 0.0) == P.backoff_floor


def test_backoff_honours_retry_after_but_bounded_by_cap() -> None:
    assert policy.backoff_delay(P, 1, 0.1, retry_after=30) == 30
    assert policy.backoff_delay(P, 1, 0.1, retry_after=10_000) == P.backoff_cap


@given(st.integers(1, 1000), st.floats(0, 1, exclude_max=True))
def test_backoff_always_within_bounds(failures: int, rand: float) -> None:
    d = policy.backoff_delay(P, failures, rand)
    assert P.backoff_floor <= d <= P.backoff_cap


def test_forced_refresh_is_rate_limited() -> None:
    assert policy.may_force_refresh(P, last_forced_at=None, now=5)
    assert not policy.may_force_refresh(P, last_forced_at=0, now=9.9)
    assert policy.may_force_refresh(P, last_forced_at=0, now=10)


def test_policy_rejects_impossible_fractions() -> None:
    with pytest.raises(ValueError):
        policy.RefreshPolicy(refresh_fraction=0.98, jitter_fraction=0.05)


def test_no_attempt_within_the_floor_of_the_last_one() -> None:
    p = P
    for demanded in (False, True):
        at = policy.attempt_allowed_at(
            p,
            last_attempt_at=100.0,
            failed_at=-math.inf,
            backoff_until=-math.inf,
            told_until=-math.inf,
            demanded=demanded,
        )
        assert at == 100.0 + p.refresh_floor


def test_backoff_holds_the_background_task_but_a_caller_may_probe() -> None:
    p = P
    common = dict(last_attempt_at=90.0, failed_at=100.0, backoff_until=400.0, told_until=-math.inf)
    assert policy.attempt_allowed_at(p, **common, demanded=False) == 400.0
    assert policy.attempt_allowed_at(p, **common, demanded=True) == 100.0 + p.demand_probe_interval
    # a short backoff ends before the probe interval: the backoff's end is the earlier moment
    short = dict(common, backoff_until=101.0)
    assert policy.attempt_allowed_at(p, **short, demanded=True) == 101.0


def test_the_idps_retry_after_holds_for_probes_too() -> None:
    p = P
    at = policy.probe_at(p, failed_at=100.0, backoff_until=400.0, told_until=220.0)
    assert at == 220.0
