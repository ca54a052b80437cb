"""Per-request scopes (``Sessions.scoped``): slots are least-recently-used (issue 13, finding 8), a
scope only narrows the profile's, and what one caller's scopes cost is that caller's (issue 22,
findings 3 and 5): an IdP grant budget per (profile, caller), a caller's own slots, refusals
remembered, log lines rate-limited. The real users' side of it: tests/test_shared_attacks.py."""

from __future__ import annotations

import logging
from collections.abc import Callable
from urllib.parse import parse_qs

import httpx
import pytest
import trio

from dc_broker.devserver import DevIdP
from dc_broker.idp.transport import IdpTransport
from dc_broker.sessions import registry
from dc_broker.sessions.registry import (
    MAX_SCOPES_PER_CALLER,
    MAX_SCOPES_PER_PROFILE,
    REFUSED_SCOPE_MEMORY,
    SCOPED_GRANTS_BURST,
    SCOPED_GRANTS_PER_MINUTE,
    ScopeNotKnownYet,
    Sessions,
)
from dc_broker.store import MemoryStore
from dc_token.errors import BadRequest, CredentialsRejected, Overloaded
from tests.conftest import CREDENTIALS, idp_transport, profile, running

ETL, OTHER = 1001, 1002


def plain(idp: DevIdP) -> DevIdP:
    """The dev IdP with a service client that has no default client scopes (Keycloak allows that):
    a narrowing gets exactly what it asks, so budgets and slots are what is tested, not the
    never-wider rule (tests/test_flows.py and test_sessions.py have that)."""
    client = idp.realm("demo").client("dc-service")
    assert client is not None
    client.default_scopes = ""
    return idp


def sessions_for(idp: DevIdP | httpx.AsyncBaseTransport, **settings: object) -> Sessions:
    transport = idp_transport(idp) if isinstance(idp, DevIdP) else IdpTransport(transport=idp)
    store = MemoryStore({"service": CREDENTIALS["service"], "demo": CREDENTIALS["demo"]})
    return Sessions({"service": profile("service", **settings), "demo": profile("demo")}, store, transport)


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


def test_one_callers_scopes_never_evict_anothers(make_idp: Callable[..., DevIdP]) -> None:
    """A caller holds at most MAX_SCOPES_PER_CALLER slots: cycling through scopes replaces its own
    oldest, so another caller's scopes (not used meanwhile) keep their sessions."""
    sessions = sessions_for(make_idp())
    base = sessions.lookup("demo")
    theirs = {scope: sessions.lookup_scoped(base, scope, owner=OTHER) for scope in ("a", "b", "c", "d")}
    for i in range(5 * MAX_SCOPES_PER_PROFILE):
        sessions.lookup_scoped(base, f"mine{i}", owner=ETL)
    assert all(sessions.lookup_scoped(base, scope, owner=OTHER) is child for scope, child in theirs.items())
    mine = [scope for name, scope in sessions._scoped if scope.startswith("mine")]
    assert len(mine) == MAX_SCOPES_PER_CALLER


async def test_a_per_request_scope_only_narrows_the_profiles_scope(make_idp: Callable[..., DevIdP]) -> None:
    """Finding 5: client credentials grants afresh with the secret, so nothing at the IdP would
    stop `openid phone address roles` on a profile whose scope is `openid`: the broker refuses it,
    naming what is extra. Its own scope, or a part of it, is served."""
    sessions = sessions_for(make_idp(), scope="openid phone")
    base = sessions.lookup("service")
    with pytest.raises(BadRequest) as caught:
        sessions.scoped(base, "openid phone address roles", ETL)
    assert str(caught.value) == (
        "profile 'service': scope 'openid phone address roles' asks for more than the profile's own scope "
        "'openid phone': address roles; a per-request scope may only narrow the profile's"
    )
    assert sessions.scoped(base, "openid phone", ETL) is base
    assert sessions.scoped(base, "phone openid", ETL).parent is base  # the same set: a narrowing
    assert sessions.scoped(base, "openid", ETL).parent is base
    assert sessions._scoped.keys() == {("service", "phone openid"), ("service", "openid")}


def grants(idp: DevIdP) -> int:
    return sum(idp.stats.token_requests.values())


async def test_a_profile_without_a_scope_narrows_what_its_login_was_granted(make_idp, autojump_clock) -> None:
    """No scope set: the profile's login has the IdP's default scopes (Keycloak's default client
    scopes; the dev IdP's `profile email`), and a request may ask for part of those only. Before
    there is a login, it is made first (``ScopeNotKnownYet``)."""
    idp = make_idp()
    sessions = sessions_for(idp)
    async with running(sessions.run):
        demo = sessions.lookup("demo")
        with pytest.raises(ScopeNotKnownYet):
            sessions.scoped(demo, "email", ETL)
        await demo.get()
        assert demo.token is not None and demo.token.scope == "profile email"
        # defaults are always granted (Keycloak, the dev IdP): "email" alone would be wider than asked
        with pytest.raises(CredentialsRejected, match=r'more than asked \(profile\).*--scope "email profile"'):
            await sessions.scoped(demo, "email", ETL).get()
        asked = grants(idp)
        narrowed = await sessions.scoped(demo, "email profile", ETL).get()
        assert narrowed.scope == "profile email" and grants(idp) == asked + 1  # one refresh, no password grant
        with pytest.raises(
            BadRequest, match=r"'openid email' asks for more than what its login was granted.*: openid;"
        ):
            sessions.scoped(demo, "openid email", ETL)


async def test_a_caller_over_its_grant_budget_is_overloaded_and_the_others_are_not(make_idp, autojump_clock) -> None:
    """Every request that sends a scope's session to the IdP costs its caller one grant: a burst of
    SCOPED_GRANTS_BURST, then one per 60/SCOPED_GRANTS_PER_MINUTE s. Over it: `overloaded` with
    `retry_after`. Scopes it holds with a token cost nothing; another caller has its own budget."""
    idp = RefusingIdp(plain(make_idp()), "none-refused")
    sessions = sessions_for(idp, scope="openid phone address email profile")
    base = sessions.lookup("service")
    scopes = ["openid", "phone", "address", "email", "profile", "openid phone", "openid address"]
    scopes += ["openid email", "phone address", "phone email", "address email", "openid profile"]
    async with running(sessions.run):
        await base.get()
        for scope in scopes[:SCOPED_GRANTS_BURST]:
            await sessions.scoped(base, scope, ETL).get()
        with pytest.raises(Overloaded) as caught:
            sessions.scoped(base, scopes[SCOPED_GRANTS_BURST], ETL)
        assert caught.value.retry_after == pytest.approx(60 / SCOPED_GRANTS_PER_MINUTE)
        assert "uid 1001 has asked for more per-request scopes" in str(caught.value)
        requests = idp.requests
        for _ in range(100):  # held scopes with a token: served from memory, free
            for scope in scopes[MAX_SCOPES_PER_CALLER:SCOPED_GRANTS_BURST]:
                assert sessions.scoped(base, scope, ETL).peek(0, trio.current_time()) is not None
        assert idp.requests == requests
        await sessions.scoped(base, scopes[SCOPED_GRANTS_BURST], OTHER).get()  # its own budget
        await trio.sleep(60 / SCOPED_GRANTS_PER_MINUTE)
        await sessions.scoped(base, scopes[SCOPED_GRANTS_BURST + 1], ETL).get()  # one more came back


class RefusingIdp(httpx.AsyncBaseTransport):
    """The dev IdP, except that a token request for a scope with ``refused`` in it is refused as
    Keycloak refuses a scope not assigned to the client (400 invalid_scope). Counts every request."""

    def __init__(self, idp: DevIdP, refused: str) -> None:
        self.inner = httpx.ASGITransport(app=idp.app)
        self.refused = refused
        self.requests = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        body = await request.aread()
        scope = parse_qs(body.decode()).get("scope", [""])[0]
        if self.refused in scope.split():
            return httpx.Response(400, json={"error": "invalid_scope", "error_description": f"Invalid scopes: {scope}"})
        return await self.inner.handle_async_request(request)


async def test_a_refused_scope_is_remembered_after_its_session_is_gone(make_idp, autojump_clock) -> None:
    """The IdP refuses `phone`: that scope's session says so; once the caller's own cycling has
    pushed it out, asking again is answered from memory (no IdP request, no budget) until
    REFUSED_SCOPE_MEMORY has passed."""
    idp = RefusingIdp(plain(make_idp()), "phone")
    sessions = sessions_for(idp, scope="openid phone address email profile")
    base = sessions.lookup("service")
    async with running(sessions.run):
        with pytest.raises(CredentialsRejected, match="refuses scope 'phone'"):
            await sessions.scoped(base, "phone", ETL).get()
        for scope in ("openid", "address", "email", "profile", "openid email", "openid address", "email address"):
            await sessions.scoped(base, scope, ETL).get()
        sessions.scoped(base, "openid profile", ETL)  # the caller's ninth: its oldest, `phone`, goes
        assert ("service", "phone") not in sessions._scoped
        before = idp.requests
        for _ in range(20):
            with pytest.raises(CredentialsRejected, match="refuses scope 'phone'"):
                sessions.scoped(base, "phone", ETL)
        assert idp.requests == before and ("service", "phone") not in sessions._scoped
        await trio.sleep(REFUSED_SCOPE_MEMORY)
        assert sessions.scoped(base, "phone", OTHER).profile.scope == "phone"  # asked of the IdP again


async def test_log_lines_about_one_callers_scopes_are_rate_limited(make_idp, autojump_clock, caplog) -> None:
    """Ten scopes the IdP refuses, asked by one caller in a burst: five warnings in that minute; the
    first line of the next minute says how many were held back. Another caller's lines still go out."""
    idp = RefusingIdp(plain(make_idp()), "phone")
    sessions = sessions_for(idp, scope="openid phone address email profile roles")
    base = sessions.lookup("service")
    refused = ["phone", "phone openid", "phone email", "phone address", "phone profile", "phone roles"]
    refused += ["phone openid email", "phone openid address", "phone openid profile", "phone email address"]
    caplog.set_level(logging.WARNING, logger="dc_broker")
    async with running(sessions.run):
        for scope in refused:
            with pytest.raises(CredentialsRejected):
                await sessions.scoped(base, scope, ETL).get()
        lines = [r for r in caplog.records if "refuses scope" in r.getMessage()]
        assert len(lines) == registry.SCOPE_LOG_LINES_PER_MINUTE
        with pytest.raises(CredentialsRejected):
            await sessions.scoped(base, "phone openid roles", OTHER).get()
        assert "phone openid roles" in caplog.records[-1].getMessage()  # its own gate
        await trio.sleep(61)
        with pytest.raises(CredentialsRejected):
            await sessions.scoped(base, "phone email roles", ETL).get()
        last = caplog.records[-1].getMessage()
        assert "phone email roles" in last and "[5 more line(s) about uid 1001's per-request scopes held back]" in last


async def test_the_token_op_logs_in_first_for_a_scope_of_a_profile_without_one(make_idp, autojump_clock) -> None:
    """Over the wire: the first scoped request of a profile without a scope and without a login
    waits for the login (an awaitable reply), then narrows what it was granted; a wider one is
    `bad_request` at once."""
    from dc_broker.access.caller import Caller
    from dc_broker.serve.ops import HANDLERS, BrokerState

    sessions = sessions_for(make_idp())
    state = BrokerState(sessions=sessions, socket_path="-")
    caller = Caller(ETL, ETL, 1)
    async with running(sessions.run):
        pending = HANDLERS["token"](state, caller, {"profile": "demo", "scope": "email profile"}, trio.current_time())
        assert not isinstance(pending, dict)
        result = await pending  # type: ignore[misc]
        assert result["scope"] == "profile email" and result["profile"] == "demo"
        with pytest.raises(BadRequest, match=": openid;"):
            HANDLERS["token"](state, caller, {"profile": "demo", "scope": "openid email"}, trio.current_time())
