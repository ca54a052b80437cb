"""Scope slots are least-recently-used (issue 13, finding 8): a consumer asking for many different
scopes evicts the oldest unused one instead of filling the profile's 16 slots for good."""

from __future__ import annotations

from collections.abc import Callable

from dc_broker.devserver import DevIdP
from dc_broker.sessions.registry import MAX_SCOPES_PER_PROFILE, Sessions
from dc_broker.store import MemoryStore
from tests.conftest import CREDENTIALS, idp_transport, profile


def test_new_scopes_evict_the_least_recently_used(make_idp: Callable[..., DevIdP]) -> None:
    sessions = Sessions(
        {"demo": profile("demo")}, MemoryStore({"demo": CREDENTIALS["demo"]}), idp_transport(make_idp())
    )
    base = sessions.lookup("demo")
    kept = sessions.lookup_scoped(base, "keep")
    for i in range(3 * MAX_SCOPES_PER_PROFILE):  # a consumer cycling through scopes of its own
        assert sessions.lookup_scoped(base, f"s{i}") is not base
        assert sessions.lookup_scoped(base, "keep") is kept  # in use all along: never the one evicted
    scoped = [scope for name, scope in sessions._scoped if name == "demo"]
    assert len(scoped) == MAX_SCOPES_PER_PROFILE and "keep" in scoped
    assert "s0" not in scoped and f"s{3 * MAX_SCOPES_PER_PROFILE - 1}" in scoped
    assert sessions.lookup_scoped(base, "s0") is not kept  # an evicted scope comes back as a new session
