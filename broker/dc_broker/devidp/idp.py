"""``DevIdP``: the object ``dc-broker dev`` and the tests hold. One instance = one fresh RSA key,
its realms, sessions, device codes, faults and counters, and the ASGI app that serves them.

All token and session time comes from ``clock`` (unix seconds); pass a fake one to warp time.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from starlette.applications import Starlette

from dc_broker.devidp import grants
from dc_broker.devidp.endpoints import build_app
from dc_broker.devidp.faults import Faults
from dc_broker.devidp.realm import DevRealm
from dc_broker.devidp.state import IdPState, Stats


class DevIdP:
    """A Keycloak-compatible development IdP plus the demo API, as one ASGI app (``app``)."""

    def __init__(
        self,
        realms: list[DevRealm],
        *,
        clock: Callable[[], float] = time.time,
        api_role: str = "dc-api",
    ) -> None:
        names = [r.name for r in realms]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate realm names: {names}")
        self._state = IdPState(realms={r.name: r for r in realms}, clock=clock, api_role=api_role)
        self.app: Starlette = build_app(self._state)

    # -- what tests read and tweak --------------------------------------------------------------
    @property
    def clock(self) -> Callable[[], float]:
        return self._state.clock

    @clock.setter
    def clock(self, clock: Callable[[], float]) -> None:
        self._state.clock = clock

    @property
    def api_role(self) -> str:
        return self._state.api_role

    @api_role.setter
    def api_role(self, role: str) -> None:
        self._state.api_role = role

    @property
    def stats(self) -> Stats:
        return self._state.stats

    @property
    def faults(self) -> Faults:
        return self._state.faults

    @property
    def kid(self) -> str:
        """The ``kid`` of this instance's signing key (also in the JWKS)."""
        return self._state.key.kid

    def realm(self, name: str) -> DevRealm:
        """The live realm object (KeyError if unknown): change it and the next request sees it."""
        return self._state.realms[name]

    # -- what a person or an admin does -----------------------------------------------------------
    def approve_device(self, user_code: str, username: str) -> None:
        """Approve a pending device login as ``username``. KeyError for an unknown/expired code or
        user, ValueError for a disabled user."""
        grants.approve_device(self._state, user_code, username)

    def deny_device(self, user_code: str) -> None:
        """The person said "No": the next poll answers access_denied."""
        grants.deny_device(self._state, user_code)

    def kill_sessions(self, realm: str, username: str | None = None) -> None:
        """Admin console "Sign out all sessions" (for one user, or everyone in the realm). Refresh
        tokens then answer "Session not active" and the demo API refuses their access tokens."""
        self.realm(realm)  # KeyError for an unknown realm
        self._state.sessions.kill_matching(realm, username)

    def active_sessions(self, realm: str, username: str | None = None) -> int:
        """How many sessions are alive right now (by ``clock``), optionally for one user."""
        live = self.realm(realm)
        now = self._state.now()
        return sum(
            1
            for s in self._state.sessions.sessions.values()
            if s.realm == realm and (username is None or s.username.lower() == username.lower()) and s.active(live, now)
        )
