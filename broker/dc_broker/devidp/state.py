"""``IdPState``: everything one dev IdP knows (realms, key, sessions, device codes, faults, counters).

No HTTP here: ``grants.py`` and ``endpoints.py`` read and change this state; ``idp.DevIdP`` wraps it
for tests. All time comes from ``clock`` (unix seconds, possibly a fake one).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from dc_broker.devidp.authcode import AuthCodeStore
from dc_broker.devidp.bruteforce import BruteForce
from dc_broker.devidp.device import DeviceStore
from dc_broker.devidp.faults import Faults
from dc_broker.devidp.keys import SigningKey
from dc_broker.devidp.realm import DevRealm
from dc_broker.devidp.sessions import SessionStore


@dataclass
class Stats:
    """Request counters. ``token_requests[(realm, client_id, grant_type)]`` counts every token-endpoint
    request that named a realm (also failed and faulted ones; client_id "" when none was sent).
    ``refresh_reuse`` counts refreshes presenting an already-used refresh token while rotation is on.
    ``requests[endpoint]`` counts every request by endpoint name ("token", "device", "api", ...).
    """

    token_requests: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    refresh_reuse: int = 0
    requests: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.token_requests.values())

    def reset(self) -> None:
        self.token_requests.clear()
        self.requests.clear()
        self.refresh_reuse = 0


#: accepted client assertions kept for tests to replay
KEPT_ASSERTIONS: Final = 64


@dataclass
class AssertionLedger:
    """Used ``jti``s (until their ``exp``) and the accepted assertions tests may replay."""

    used: dict[str, float] = field(default_factory=dict)
    accepted: list[str] = field(default_factory=list)

    def spend(self, key: str, until: float, now: float) -> bool:
        """Record ``key``; False if it was already used (and has not expired)."""
        for old in [k for k, t in self.used.items() if t < now]:
            del self.used[old]
        if key in self.used:
            return False
        self.used[key] = until
        return True

    def keep(self, assertion: str) -> None:
        self.accepted.append(assertion)
        del self.accepted[:-KEPT_ASSERTIONS]


@dataclass
class IdPState:
    realms: dict[str, DevRealm]
    clock: Callable[[], float]
    api_role: str
    key: SigningKey = field(default_factory=SigningKey)
    sessions: SessionStore = field(default_factory=SessionStore)
    devices: DeviceStore = field(default_factory=DeviceStore)
    codes: AuthCodeStore = field(default_factory=AuthCodeStore)
    faults: Faults = field(default_factory=Faults)
    stats: Stats = field(default_factory=Stats)
    brute_force: BruteForce = field(default_factory=BruteForce)
    assertions: AssertionLedger = field(default_factory=AssertionLedger)

    def now(self) -> float:
        return float(self.clock())
