"""Keycloak's brute-force detection (Realm settings -> Security defenses), as the dev IdP plays it. Pure:
``now`` is a parameter.

After every ``failure_factor`` wrong passwords a user is locked for ``wait_increment`` seconds times
the number of such rounds, at most ``max_failure_wait``. While the lock lasts, *every* password, the
right one too, gets ``400 invalid_grant "Invalid user credentials"``: a client cannot tell a lock from
a wrong password by the answer. The lock lifts by itself; a right password afterwards clears the
count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dc_broker.devidp.realm import DevRealm


@dataclass
class Failures:
    count: int = 0
    locked_until: float = -math.inf


@dataclass
class BruteForce:
    """Failures per (realm, username), case-insensitive as Keycloak's usernames."""

    users: dict[tuple[str, str], Failures] = field(default_factory=dict)

    def _of(self, realm: DevRealm, username: str) -> Failures:
        return self.users.setdefault((realm.name, username.lower()), Failures())

    def locked(self, realm: DevRealm, username: str, now: float) -> bool:
        return realm.brute_force and now < self._of(realm, username).locked_until

    def failed(self, realm: DevRealm, username: str, now: float) -> None:
        if not realm.brute_force:
            return
        f = self._of(realm, username)
        f.count += 1
        if f.count % max(1, realm.failure_factor) == 0:
            rounds = f.count // max(1, realm.failure_factor)
            f.locked_until = now + min(realm.max_failure_wait, realm.wait_increment * rounds)

    def succeeded(self, realm: DevRealm, username: str) -> None:
        self.users.pop((realm.name, username.lower()), None)
