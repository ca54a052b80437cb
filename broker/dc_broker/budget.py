"""Budgets: how much of something one caller may make the broker do per unit of time. Pure: ``now``
is a parameter, nothing here reads a clock or does I/O.

A ``Budget`` is a token bucket: ``burst`` units at once, refilled at ``per_minute`` units a minute.
``spend`` takes units if there are that many and returns 0, else takes nothing and returns the
seconds until there will be (what an ``overloaded`` reply's ``retry_after`` says). The shared broker
keeps one per (profile, caller) for the IdP grants per-request scopes cause, and one per caller for
the bytes of programs it has to hash (``exe-sha256`` rules).

A ``LogGate`` lets ``per_minute`` log lines through in each minute and holds back the rest; the
first line it lets through after holding some back says how many (``held_back``). One per (profile,
caller), so one consumer's flood of failures is a few lines, not one per request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(slots=True)
class Budget:
    """A token bucket; full when made."""

    burst: float
    per_minute: float
    level: float = math.nan
    at: float = -math.inf

    def __post_init__(self) -> None:
        if math.isnan(self.level):
            self.level = self.burst

    def _refill(self, now: float) -> None:
        if now > self.at:
            if math.isfinite(self.at):
                self.level = min(self.burst, self.level + (now - self.at) * self.per_minute / 60.0)
            self.at = now

    def spend(self, now: float, units: float = 1.0) -> float:
        """Take ``units``: 0.0 when taken, else the seconds until that many are there (nothing taken).
        More than ``burst`` at once is never there: it is treated as a whole burst."""
        self._refill(now)
        units = min(units, self.burst)
        if self.level >= units:
            self.level -= units
            return 0.0
        if self.per_minute <= 0:
            return math.inf
        return (units - self.level) * 60.0 / self.per_minute

    def full(self, now: float) -> bool:
        """Whether nothing has been spent that has not come back (the budget can be forgotten)."""
        self._refill(now)
        return self.level >= self.burst


@dataclass(slots=True)
class LogGate:
    """At most ``per_minute`` lines in each minute; the rest are held back and counted."""

    per_minute: int
    window: float = -math.inf
    lines: int = 0
    held: int = 0

    def admit(self, now: float) -> tuple[bool, int]:
        """(whether this line goes out, how many were held back before it: say so when > 0)."""
        if now >= self.window + 60.0:
            self.window, self.lines = now, 0
        if self.lines >= self.per_minute:
            self.held += 1
            return False, 0
        self.lines += 1
        held, self.held = self.held, 0
        return True, held
