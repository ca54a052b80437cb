"""``Schedule``: when a session's next attempt at the IdP may start and when it should, as one value.

SPIRE's rotator is the model: one pure value, pure transitions, and one comparison that says whether
it is time (``due_at``), with the clock injected. The rules themselves (refresh ahead, floor,
backoff, demand probes, Retry-After) are ``policy``'s; this module only keeps the numbers they need
and says how each event changes them:

    event                              transition
    a new token was accepted           ``granted(plan)``     plan = policy.refresh_at(...); failures reset
    an attempt starts                  ``started(now)``      the floor counts from here
    an attempt failed for now          ``failed(...)``       backoff (full jitter, Retry-After honoured)
    credentials or settings changed    ``retry(now)``        failures and backoff forgotten; due now
    the API said 401 (``invalidate``)  ``forced(now)``       due now (backoff and floor still hold)
    a person must act                  ``stopped()``         nothing planned until they do

Invariants:

* ``due_at`` never lies within ``refresh_floor`` of the last attempt, whoever asks;
* during backoff nothing starts before it ends, except one probe for a waiting caller once
  ``demand_probe_interval`` has passed since the failure, and never before the IdP's Retry-After;
* ``retry`` is the only transition that forgets failures without a new token.

Must never: read a clock, draw randomness (``rand`` is a parameter), or know about trio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from dc_broker.sessions import policy
from dc_broker.sessions.policy import RefreshPolicy


@dataclass(frozen=True, slots=True)
class Schedule:
    #: when the token's own schedule wants the next attempt (inf: nothing planned, -inf: at once)
    planned_at: float = -math.inf
    #: when the last attempt started (the floor counts from here)
    last_attempt_at: float = -math.inf
    #: consecutive failed attempts since the last success or change
    failures: int = 0
    #: when the last failure happened (demand probes count from here)
    failed_at: float = -math.inf
    #: the end of the current backoff
    backoff_until: float = -math.inf
    #: the IdP's Retry-After: not even a caller's probe goes before it
    told_until: float = -math.inf

    # ------------------------------------------------------------ questions

    def due_at(self, p: RefreshPolicy, *, demanded: bool) -> float:
        """The moment the next attempt starts: for a waiting caller as soon as the floor and the
        backoff (or a probe) allow; otherwise also not before the plan."""
        allowed = policy.attempt_allowed_at(
            p,
            last_attempt_at=self.last_attempt_at,
            failed_at=self.failed_at,
            backoff_until=self.backoff_until,
            told_until=self.told_until,
            demanded=demanded,
        )
        return allowed if demanded else max(self.planned_at, allowed)

    def probe_at(self, p: RefreshPolicy) -> float:
        """When a waiting caller may start an attempt (before this, it is told to retry later)."""
        return policy.probe_at(
            p, failed_at=self.failed_at, backoff_until=self.backoff_until, told_until=self.told_until
        )

    # ------------------------------------------------------------ transitions

    def started(self, now: float) -> Schedule:
        return replace(self, last_attempt_at=now)

    def granted(self, plan: float) -> Schedule:
        """A new token was accepted; its refresh is planned at ``plan``."""
        return Schedule(planned_at=plan, last_attempt_at=self.last_attempt_at)

    def failed(
        self, p: RefreshPolicy, *, now: float, rand: float, retry_after: float | None, wait: float = 0.0
    ) -> Schedule:
        """An attempt failed for now: back off (full jitter), never less than the IdP's Retry-After
        (capped, as any backoff), nor than ``wait`` (uncapped: a lock-out's own window, which holds
        callers' probes off too)."""
        failures = self.failures + 1
        delay = max(wait, policy.backoff_delay(p, failures, rand, retry_after))
        told = now + min(retry_after, p.backoff_cap) if retry_after else -math.inf
        if wait:  # like a Retry-After: not even a waiting caller's probe goes before it
            told = max(told, now + wait)
        return replace(
            self,
            planned_at=now + delay,
            failures=failures,
            failed_at=now,
            backoff_until=now + delay,
            told_until=told,
        )

    def retry(self, now: float) -> Schedule:
        """Credentials or settings changed: what failed before says nothing now; try at once."""
        return Schedule(planned_at=now, last_attempt_at=self.last_attempt_at)

    def forced(self, now: float) -> Schedule:
        """The current token must be replaced now (the floor and any backoff still apply)."""
        return replace(self, planned_at=now)

    def stopped(self) -> Schedule:
        """Nothing is planned until a person acts (or a login is adopted)."""
        return replace(self, planned_at=math.inf)

    def planned(self, at: float) -> Schedule:
        """The token's own schedule, as at a restart or unlock (failures kept)."""
        return replace(self, planned_at=at)
