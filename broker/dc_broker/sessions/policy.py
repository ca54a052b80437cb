"""When to refresh, how long to back off, what satisfies a caller. Pure: ``now`` and randomness are
parameters, never read from a clock or a global RNG here, so every rule is testable with plain numbers.

Rules (docs/architecture.md repeats them for users):

* **Refresh ahead.** A token obtained at ``t0`` that expires at ``t0 + T`` is refreshed at
  ``t0 + T * (0.75 ± 0.05)`` (uniform jitter so that many profiles and many brokers do not
  synchronise), and in any case ``refresh_margin`` of the refresh token's own lifetime before the
  refresh token dies (``refresh_expires_in``; 0 = never). With Keycloak's 30/30 defaults the refresh
  token dies with the access token, so refreshing at 75% is also what keeps the login alive.
* **min_ttl.** A read is served from memory when ``expires_at - now >= min_ttl``. A min_ttl larger
  than half the token lifetime the IdP grants is capped at half that lifetime: such a caller gets a
  token at least half fresh and causes at most one extra refresh per half lifetime, instead of one
  refresh per call for a request the IdP can never satisfy.
* **Backoff.** After the n-th consecutive failure wait ``uniform(0, min(cap, base * 2**n))``
  ("full jitter"), never less than ``floor``, and never less than the IdP's Retry-After.
* **Floor.** No profile starts two attempts at the IdP less than ``refresh_floor`` (1 s) apart,
  whatever its tokens' lifetimes or its callers ask.
* **Demand probes.** During backoff, a caller that needs a token may start one attempt (a probe)
  once ``demand_probe_interval`` (5 s) has passed since the last failure; the background task itself
  keeps the exponential backoff. An IdP's Retry-After holds for probes too. So callers see the IdP's
  recovery within seconds, and a crowd of callers still makes at most one request per profile per
  probe interval.
* **Start-up.** First refreshes are staggered over ``startup_spread`` (5 s) so N profiles do not hit
  the IdP at once; a refresh that is already due is delayed by at most ``startup_cap_fraction``
  (10%) of its token's remaining life, so the stagger never makes a token expire unrefreshed.
* **Lock-outs.** Keycloak's brute-force detection answers the right password "Invalid user
  credentials" while it locks an account. A stored password the IdP accepted before and now refuses
  so is asked again after ``lockout_waits`` (60 s, 5 min, 15 min: never faster than the lock can
  lift), then taken for a wrong one.
* **Forced refresh** (``invalidate``: the API said 401 to a token) happens at most once per
  ``invalidate_interval`` per profile, and only if the rejected token is still the current one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RefreshPolicy:
    refresh_fraction: float = 0.75
    jitter_fraction: float = 0.05
    refresh_margin: float = 0.15
    min_ttl_cap_fraction: float = 0.5
    backoff_base: float = 1.0
    backoff_cap: float = 300.0
    backoff_floor: float = 0.05
    invalidate_interval: float = 10.0
    startup_spread: float = 5.0
    #: the start-up stagger never delays a due refresh by more than this share of the token's life left
    startup_cap_fraction: float = 0.1
    #: a password the IdP accepted before, now refused as a brute-force lock would be: asked again after
    #: these waits (Keycloak locks 60 s at first, up to 15 min), then taken for a wrong one
    lockout_waits: tuple[float, ...] = (60.0, 300.0, 900.0)
    refresh_floor: float = 1.0
    demand_probe_interval: float = 5.0

    def __post_init__(self) -> None:
        if not 0 < self.refresh_fraction - self.jitter_fraction < self.refresh_fraction + self.jitter_fraction < 1:
            raise ValueError("refresh_fraction +- jitter_fraction must stay inside (0, 1)")


DEFAULT_POLICY = RefreshPolicy()


def refresh_at(
    policy: RefreshPolicy,
    *,
    obtained_at: float,
    expires_at: float,
    refresh_expires_at: float | None,
    rand: float,
) -> float:
    """The moment to refresh a token. ``rand`` is uniform in [0, 1)."""
    lifetime = max(0.0, expires_at - obtained_at)
    fraction = policy.refresh_fraction + policy.jitter_fraction * (2.0 * rand - 1.0)
    at = obtained_at + lifetime * fraction
    if refresh_expires_at is not None:
        refresh_life = max(0.0, refresh_expires_at - obtained_at)
        at = min(at, refresh_expires_at - refresh_life * policy.refresh_margin)
    return max(at, obtained_at)


def refresh_window(policy: RefreshPolicy, *, obtained_at: float, expires_at: float) -> tuple[float, float]:
    """The earliest and latest refresh moment ``refresh_at`` can pick for an access token alone."""
    lifetime = max(0.0, expires_at - obtained_at)
    return (
        obtained_at + lifetime * (policy.refresh_fraction - policy.jitter_fraction),
        obtained_at + lifetime * (policy.refresh_fraction + policy.jitter_fraction),
    )


def effective_min_ttl(policy: RefreshPolicy, min_ttl: float, lifetime: float) -> float:
    """min_ttl capped so that a request the IdP can never satisfy does not refresh on every call."""
    if lifetime <= 0:
        return max(0.0, min_ttl)
    return max(0.0, min(min_ttl, lifetime * policy.min_ttl_cap_fraction))


def satisfies(*, expires_at: float, now: float, min_ttl: float) -> bool:
    """A token with more than min_ttl left (strictly: a token at its expiry instant satisfies nobody)."""
    return expires_at - now > min_ttl


def backoff_delay(policy: RefreshPolicy, failures: int, rand: float, retry_after: float | None = None) -> float:
    """Seconds to wait after ``failures`` consecutive failures (1 = the first). ``rand`` in [0, 1)."""
    exponent = min(max(failures - 1, 0), 32)
    ceiling = min(policy.backoff_cap, policy.backoff_base * (2.0**exponent))
    delay = max(policy.backoff_floor, rand * ceiling)
    if retry_after is not None and retry_after > 0:
        delay = max(delay, min(retry_after, policy.backoff_cap))
    return delay


def may_force_refresh(policy: RefreshPolicy, *, last_forced_at: float | None, now: float) -> bool:
    return last_forced_at is None or now - last_forced_at >= policy.invalidate_interval


def startup_delay(policy: RefreshPolicy, rand: float) -> float:
    """Stagger for a profile's first background refresh after start-up, so N profiles spread out."""
    return policy.startup_spread * rand


def first_attempt_at(policy: RefreshPolicy, *, now: float, planned_at: float, expires_at: float, delay: float) -> float:
    """A profile's first attempt after start-up. Its token's own plan holds; the start-up stagger
    (``delay``) only delays attempts that are due, and by at most ``startup_cap_fraction`` of the
    token's remaining life, so a refresh that was already due at a restart (kill -9, reboot) is
    never pushed past the token's expiry by the spread."""
    remaining = expires_at - now
    if remaining > 0:
        delay = min(delay, remaining * policy.startup_cap_fraction)
    return max(planned_at, now + delay)


def probe_at(policy: RefreshPolicy, *, failed_at: float, backoff_until: float, told_until: float) -> float:
    """When a waiting caller may start an attempt during backoff: ``demand_probe_interval`` after
    the last failure, but never before the IdP's own Retry-After (``told_until``) has passed."""
    return min(backoff_until, max(failed_at + policy.demand_probe_interval, told_until))


def attempt_allowed_at(
    policy: RefreshPolicy,
    *,
    last_attempt_at: float,
    failed_at: float,
    backoff_until: float,
    told_until: float,
    demanded: bool,
) -> float:
    """The earliest moment the next attempt may start: never within ``refresh_floor`` of the last
    one; during backoff not before it ends, unless a caller is waiting (then ``probe_at``)."""
    floor = last_attempt_at + policy.refresh_floor
    if demanded:
        probe = probe_at(policy, failed_at=failed_at, backoff_until=backoff_until, told_until=told_until)
        return max(floor, probe)
    return max(floor, backoff_until)
