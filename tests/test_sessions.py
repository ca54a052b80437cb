"""Token lifecycle on trio's autojump clock: hours of 30-minute tokens simulated in milliseconds."""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import pytest
import trio

from dc_broker.secret import Secret
from dc_broker.sessions import policy
from dc_broker.sessions.session import Session, shift_times
from dc_broker.sessions.states import State
from dc_broker.tokens import Credentials, TokenSet
from dc_token.errors import CredentialsRejected, LoginRequired, UpstreamError, UpstreamUnavailable
from tests.conftest import make_session, running, trio_wall_clock

T = 1800.0


class Recorder:
    """Wraps a session's store to record every token set it saves (= every successful grant)."""

    def __init__(self, session: Session) -> None:
        self.saved: list[TokenSet] = []
        inner = session.store.save_tokens

        async def save(profile: str, tokens: TokenSet) -> None:
            await inner(profile, tokens)
            # stores get wall-clock times; record them on the session's clock
            self.saved.append(shift_times(tokens, session.clock() - session.wall_clock()))

        session.store.save_tokens = save  # type: ignore[method-assign]


def token_requests(idp: Any) -> int:
    return int(idp.stats.total)


async def test_refreshes_land_in_their_window_and_min_ttl_always_holds(make_idp, autojump_clock) -> None:
    idp = make_idp(access_lifespan=T, sso_idle=T, sso_max=36000)
    session = make_session(idp)
    rec = Recorder(session)
    served: list[float] = []
    async with running(session.run):
        for _ in range(int(9 * 3600 / 7)):  # a reader every 7 s for 9 simulated hours
            tok = await session.get(min_ttl=60)
            remaining = tok.expires_at - trio.current_time()
            assert remaining >= 60
            served.append(remaining)
            await trio.sleep(7)
    assert len(rec.saved) >= 9 * 3600 / (0.8 * T) - 1
    for prev, nxt in zip(rec.saved, rec.saved[1:], strict=False):
        lo, hi = policy.refresh_window(policy.DEFAULT_POLICY, obtained_at=prev.obtained_at, expires_at=prev.expires_at)
        assert lo - 0.01 <= nxt.obtained_at <= hi + 0.01, (prev.obtained_at, nxt.obtained_at)
    # reads never waited: the background task refreshed before anyone needed it
    assert min(served) > 0.15 * T


async def test_steady_state_request_rate(make_idp, autojump_clock) -> None:
    # 24 simulated hours across two SSO Session Max boundaries (10 h): re-logins included
    idp = make_idp(access_lifespan=T, sso_idle=T, sso_max=10 * 3600)
    session = make_session(idp)
    async with running(session.run):
        await trio.sleep(24 * 3600)
    per_hour = token_requests(idp) / 24
    assert per_hour <= 1.1 * 3600 / (0.75 * T)


async def test_thousand_callers_on_an_expired_token_make_one_idp_request(make_idp, autojump_clock) -> None:
    idp = make_idp(access_lifespan=T)
    session = make_session(idp)
    idp.faults.latency = 1.0
    results: list[str] = []

    async def caller() -> None:
        tok = await session.get(min_ttl=10)
        results.append(tok.access_token.reveal())

    async with running(partial(session.run, first_attempt_delay=math.inf)) as nursery:
        await trio.sleep(0)
        for _ in range(1000):
            nursery.start_soon(caller)
        await trio.sleep(5)
    assert len(results) == 1000 and len(set(results)) == 1
    assert token_requests(idp) == 1


async def test_a_slow_answer_s_lifetime_counts_from_the_request(make_idp, autojump_clock) -> None:
    """An IdP that takes 15 s to answer a 60 s token issued it somewhere in those 15 s: the broker
    counts the 60 s from when it asked, so it never serves a token past its real expiry."""
    idp = make_idp(access_lifespan=60)
    session = make_session(idp)
    idp.faults.latency = 15.0
    async with running(partial(session.run, first_attempt_delay=math.inf)):
        asked = trio.current_time()
        tok = await session.get()
        assert trio.current_time() == pytest.approx(asked + 15.0, abs=0.01)
    assert tok.obtained_at == pytest.approx(asked, abs=0.01)
    # 60 s from the send, less the second Keycloak's whole-second iat may hide (oidc.expiry)
    assert tok.expires_at == pytest.approx(asked + 59.0, abs=0.01)


async def test_rotation_never_reuses_a_refresh_token(make_idp, autojump_clock) -> None:
    idp = make_idp(access_lifespan=300, sso_idle=300, sso_max=36000, rotate_refresh_tokens=True)
    session = make_session(idp)
    rec = Recorder(session)

    async def storm() -> None:
        # bursts of callers with large min_ttl keep pushing for refreshes while rotation is on
        for _ in range(200):
            async with trio.open_nursery() as n:
                for _ in range(20):
                    n.start_soon(session.get, 200)
            await trio.sleep(53)

    async with running(session.run):
        await storm()
    refresh_tokens = [t.refresh_token.reveal() for t in rec.saved if t.refresh_token]
    assert len(refresh_tokens) == len(set(refresh_tokens)) > 20
    assert idp.stats.refresh_reuse == 0
    assert session.state is State.FRESH


async def test_session_max_leads_to_relogin_with_stored_password(make_idp, autojump_clock) -> None:
    idp = make_idp(access_lifespan=T, sso_idle=T, sso_max=3600)
    session = make_session(idp)
    async with running(session.run):
        for _ in range(5 * 60):
            tok = await session.get(min_ttl=30)
            assert tok.expires_at - trio.current_time() >= 30
            await trio.sleep(60)
    grants = idp.stats.token_requests
    assert grants[("demo", "dc-cli", "password")] >= 2  # the first login and at least one re-login
    assert session.state is State.FRESH


async def test_device_login_expires_to_login_required(make_idp, autojump_clock) -> None:
    idp = make_idp(access_lifespan=300, sso_idle=300, sso_max=900)
    # a device login that already happened: the store holds the refresh token it produced
    from dc_broker.idp import oidc
    from tests.conftest import idp_transport

    t = idp_transport(idp)
    idp.faults.clear()
    login = await t.send(
        oidc.build_password(
            "http://127.0.0.1:1/auth/realms/demo/protocol/openid-connect/token",
            oidc.ClientCredentials("dc-public", "none"),
            "demo",
            Secret("demo"),
        )
    )
    first = oidc.parse_token_response(login, trio.current_time())
    session = make_session(idp, "device", credentials=Credentials(refresh_token=first.refresh_token))
    async with running(session.run):
        tok = await session.get()
        assert tok.access_token != first.access_token
        await trio.sleep(1200)  # past SSO Session Max
        with pytest.raises(LoginRequired, match="dc-broker login device"):
            await session.get(min_ttl=10)
        assert session.state is State.LOGIN_REQUIRED


async def test_outage_serves_valid_token_backs_off_and_recovers(make_idp, autojump_clock) -> None:
    idp = make_idp(access_lifespan=T)
    session = make_session(idp)
    async with running(session.run):
        first = await session.get()
        idp.faults.fail_next(10_000, status=503)
        before = token_requests(idp)
        # until expiry the valid token keeps being served
        await trio.sleep(0.8 * T + 1)
        assert (await session.get()).access_token == first.access_token
        assert session.state is State.STALE
        await trio.sleep(0.2 * T)
        with pytest.raises(UpstreamUnavailable) as info:
            await session.get()
        assert info.value.retry_after is not None and info.value.retry_after > 0
        assert session.effective_state(trio.current_time()) is State.UNAVAILABLE
        attempts = token_requests(idp) - before
        # backoff: a 10-minute outage window costs far fewer than one attempt per second
        assert 3 <= attempts <= 30
        idp.faults.clear()
        await trio.sleep(policy.DEFAULT_POLICY.backoff_cap + 1)
        tok = await session.get(min_ttl=60)
        assert tok.access_token != first.access_token and session.state is State.FRESH


async def test_retry_after_is_honoured(make_idp, autojump_clock) -> None:
    idp = make_idp(access_lifespan=T)
    session = make_session(idp)
    idp.faults.fail_next(1, status=503, retry_after=120)
    async with running(session.run):
        with pytest.raises(UpstreamUnavailable) as info:
            await session.get()
        assert info.value.retry_after == pytest.approx(120, abs=1)
        await trio.sleep(119)
        assert token_requests(idp) == 1
        await trio.sleep(2)
        assert token_requests(idp) == 2 and session.state is State.FRESH


@pytest.mark.parametrize(
    ("kind", "match"), [("truncated", "not a JSON object"), ("no_access_token", "without an access_token")]
)
async def test_garbage_from_the_idp_is_upstream_error(make_idp, autojump_clock, kind: str, match: str) -> None:
    idp = make_idp()
    session = make_session(idp)
    idp.faults.malformed(kind, count=1)
    async with running(session.run):
        with pytest.raises(UpstreamError, match=match) as info:
            await session.get()
        assert info.value.retry_after is not None
        await trio.sleep(10)
        assert (await session.get()).access_token  # recovers by itself
        assert session.state is State.FRESH


async def test_hung_idp_gives_callers_an_answer_not_a_hang(make_idp, autojump_clock) -> None:
    idp = make_idp()
    session = make_session(idp)
    idp.faults.hang = True
    async with running(session.run):
        start = trio.current_time()
        with pytest.raises(UpstreamUnavailable):
            await session.get()
        assert trio.current_time() - start <= 31


@pytest.mark.parametrize(
    ("name", "credentials", "match"),
    [
        (
            "demo",
            Credentials(password=Secret("wrong"), client_secret=Secret("dc-cli-secret")),
            "Invalid user credentials",
        ),
        ("demo", Credentials(password=Secret("demo"), client_secret=Secret("bad")), "Invalid client"),
        ("service", Credentials(client_secret=Secret("bad")), "Invalid client"),
    ],
)
async def test_rejected_credentials_stop_retries_until_changed(
    make_idp, autojump_clock, name: str, credentials: Credentials, match: str
) -> None:
    idp = make_idp()
    session = make_session(idp, name, credentials=credentials)
    async with running(session.run):
        with pytest.raises(CredentialsRejected, match=match):
            await session.get()
        assert session.state is State.REJECTED
        await trio.sleep(3600)
        with pytest.raises(CredentialsRejected):
            await session.get()
        assert token_requests(idp) == 1  # no retry storm against a bad secret
        # the person fixes the secret: the session tries again at once
        from tests.conftest import CREDENTIALS

        session.store.set_credentials(name, CREDENTIALS[name])  # type: ignore[attr-defined]
        session.credentials_changed()
        assert (await session.get()).access_token


async def test_no_credentials_means_login_required(make_idp, autojump_clock) -> None:
    idp = make_idp()
    session = make_session(idp, credentials=Credentials())
    async with running(session.run):
        with pytest.raises(LoginRequired, match="dc-broker login demo"):
            await session.get()
    assert token_requests(idp) == 0


async def test_invalidate_forces_one_refresh_rate_limited(make_idp, autojump_clock) -> None:
    idp = make_idp()
    session = make_session(idp)
    async with running(session.run):
        first = (await session.get()).access_token.reveal()
        assert not session.invalidate("some-other-token")
        assert session.invalidate(first)
        second = (await session.get()).access_token.reveal()
        assert second != first
        assert not session.invalidate(second)  # within invalidate_interval: no second forced refresh
        await trio.sleep(11)
        assert session.invalidate(second)
        assert (await session.get()).access_token.reveal() != second
    assert token_requests(idp) == 3


async def test_min_ttl_beyond_lifetime_does_not_refresh_every_call(make_idp, autojump_clock) -> None:
    idp = make_idp(access_lifespan=300)
    session = make_session(idp)
    async with running(session.run):
        for _ in range(600):
            await session.get(min_ttl=3600)
            await trio.sleep(1)
    # 10 minutes of calls at 1/s: bounded by one refresh per half lifetime, not 600
    assert token_requests(idp) <= 600 / 150 + 2


async def test_reload_adds_changes_and_removes_without_dropping_tokens(make_idp, autojump_clock) -> None:
    from dc_broker.sessions.registry import Sessions
    from dc_broker.store import MemoryStore
    from tests.conftest import CREDENTIALS, idp_transport, profile

    idp = make_idp()
    store = MemoryStore(dict(CREDENTIALS))
    sessions = Sessions({"demo": profile("demo"), "service": profile("service")}, store, idp_transport(idp))
    async with running(sessions.run):
        demo_token = (await sessions.lookup("demo").get()).access_token
        added, changed, removed = sessions.reload({"demo": profile("demo"), "device": profile("device")})
        assert (added, changed, removed) == (["device"], [], ["service"])
        assert sessions.names() == ["demo", "device"]
        assert (await sessions.lookup("demo").get()).access_token == demo_token  # unchanged: token kept
        # a change of how the IdP is reached keeps the login: still served while it refreshes
        _, changed, _ = sessions.reload({"demo": profile("demo", proxy="direct"), "device": profile("device")})
        assert changed == ["demo"]
        assert sessions.lookup("demo").peek(0, trio.current_time()) is not None
        # a change of whom the tokens are for (here: the scope) drops the login: the old scope is never
        # served again, and the next token has the new one
        _, changed, _ = sessions.reload({"demo": profile("demo", scope="email"), "device": profile("device")})
        assert changed == ["demo"]
        assert sessions.lookup("demo").peek(0, trio.current_time()) is None
        tok = await sessions.lookup("demo").get()
        assert tok.access_token != demo_token and tok.scope is not None and "email" in tok.scope.split()


async def test_reload_of_access_rules_or_token_files_keeps_the_login(make_idp, autojump_clock, tmp_path) -> None:
    """Changing only `allow`, `admin` or a profile's sinks applies at once and costs no IdP request:
    the token, its schedule and the per-scope children stay; the IdP, user or scope changing does not."""
    from dc_broker.config import Sink
    from dc_broker.sessions.registry import Sessions
    from dc_broker.store import MemoryStore
    from tests.conftest import CREDENTIALS, idp_transport, profile

    idp = make_idp()
    sessions = Sessions({"demo": profile("demo")}, MemoryStore(dict(CREDENTIALS)), idp_transport(idp))
    async with running(sessions.run):
        demo = sessions.lookup("demo")
        await demo.get()
        narrowed = await sessions.lookup_scoped(demo, "email profile").get()
        tok, due, before = demo.token, demo.next_attempt_at, token_requests(idp)
        woken = demo.token_changed
        sink = Sink(path=str(tmp_path / "demo.token"))
        edited = profile("demo", allow=("user:etl",), admin=("user:ops",), sinks=(sink,))
        assert sessions.reload({"demo": edited}) == ([], ["demo"], [])
        assert demo.profile == edited and demo.profile.allow == ("user:etl",)
        assert woken.is_set()  # the token files' task looks at the new sinks now
        await trio.sleep(1)
        assert token_requests(idp) == before and demo.token is tok and demo.next_attempt_at == due
        assert demo.state is State.FRESH
        assert sessions.lookup_scoped(demo, "email profile").token is narrowed  # the narrowed login stays too
        sessions.reload({"demo": profile("demo", allow=("user:etl",), sinks=(sink,), scope="openid")})
        await trio.sleep(1)
        assert token_requests(idp) > before  # another scope: whom the login is for changed, a new login at once
        assert sessions.lookup_scoped(demo, "email profile").token is not narrowed


async def test_restart_serves_stored_tokens_at_once(make_idp, autojump_clock) -> None:
    idp = make_idp()
    first = make_session(idp)
    async with running(first.run):
        tok = await first.get()
    await trio.sleep(100)
    # a new process: same store, a different monotonic clock origin
    second = Session(
        first.profile, first.store, first.idp, clock=lambda: trio.current_time() + 5000.0, wall_clock=trio_wall_clock
    )
    assert second.state is State.FRESH
    before = token_requests(idp)
    got = second.peek(60, second.clock())
    assert got is not None and got.access_token == tok.access_token
    assert got.expires_at - second.clock() == pytest.approx(tok.expires_at - trio.current_time(), abs=0.01)
    assert token_requests(idp) == before


async def test_scope_narrows_via_refresh_and_is_cached_per_scope(make_idp, autojump_clock) -> None:
    from dc_broker.sessions.registry import Sessions
    from dc_broker.store import MemoryStore
    from tests.conftest import CREDENTIALS, idp_transport, profile

    idp = make_idp(access_lifespan=300, sso_idle=1800, rotate_refresh_tokens=True)
    sessions = Sessions(
        {"demo": profile("demo", scope="openid phone")}, MemoryStore(dict(CREDENTIALS)), idp_transport(idp)
    )
    async with running(sessions.run):
        demo = sessions.lookup("demo")
        base = await demo.get()
        # Keycloak keeps its default scopes (profile email) in every token: a narrower scope names them
        narrowed = await sessions.lookup_scoped(demo, "openid profile email").get()
        assert "phone" not in (narrowed.scope or "").split() and "phone" in (base.scope or "").split()
        assert sessions.lookup_scoped(demo, "openid profile email") is sessions.lookup_scoped(
            sessions.lookup("demo"), "openid profile email"
        )
        assert sessions.lookup_scoped(demo, "openid phone") is sessions.lookup("demo")
        requests = token_requests(idp)
        assert (await sessions.lookup_scoped(demo, "openid profile email").get()).access_token == narrowed.access_token
        assert token_requests(idp) == requests  # cached
        grants = idp.stats.token_requests
        assert grants[("demo", "dc-cli", "password")] == 1  # narrowing rode on the one login
        # hours of both refreshing with rotation on: the single refresh-token chain never forks
        for _ in range(60):
            await sessions.lookup("demo").get(min_ttl=100)
            await sessions.lookup_scoped(demo, "openid profile email").get(min_ttl=100)
            await trio.sleep(120)
        assert idp.stats.refresh_reuse == 0
        assert sessions.lookup("demo").state is State.FRESH
        assert grants[("demo", "dc-cli", "password")] == 1


async def test_client_credentials_scope_asks_with_the_secret(make_idp, autojump_clock) -> None:
    from dc_broker.sessions.registry import Sessions
    from dc_broker.store import MemoryStore
    from tests.conftest import CREDENTIALS, idp_transport, profile

    idp = make_idp()
    sessions = Sessions(
        {"service": profile("service", scope="openid profile email phone")},
        MemoryStore(dict(CREDENTIALS)),
        idp_transport(idp),
    )
    async with running(sessions.run):
        tok = await sessions.lookup_scoped(sessions.lookup("service"), "openid profile email").get()
        assert "openid" in (tok.scope or "") and "phone" not in (tok.scope or "")
        with pytest.raises(CredentialsRejected, match=r"more than asked \(email profile\)"):
            await sessions.lookup_scoped(sessions.lookup("service"), "openid").get()  # never wider than asked


async def device_code(session: Session):
    flow = session.device_login()
    first = await flow.__anext__()
    return flow, first


async def test_device_login_approved(make_idp, autojump_clock) -> None:
    idp = make_idp()
    session = make_session(idp, "device")
    async with running(session.run) as nursery:
        with pytest.raises(LoginRequired, match="dc-broker login device"):
            await session.get()
        flow, shown = await device_code(session)
        assert shown["user_code"] and shown["verification_uri"].endswith("/device")
        polls_before = token_requests(idp)
        outcome: list[dict] = []

        async def consume() -> None:
            outcome.append(await flow.__anext__())

        nursery.start_soon(consume)
        await trio.sleep(12)
        assert token_requests(idp) - polls_before == 2  # every 5 s, as the IdP's interval says
        idp.approve_device(shown["user_code"], "demo")
        await trio.sleep(5)
        assert outcome and outcome[0]["logged_in"] is True
        with pytest.raises(StopAsyncIteration):
            await flow.__anext__()
        assert session.state is State.FRESH
        requests = token_requests(idp)
        assert (await session.get(min_ttl=60)).access_token
        assert token_requests(idp) == requests  # served from the adopted login
        await trio.sleep(3 * T)
        assert session.state is State.FRESH  # kept alive by refresh since


async def test_device_login_denied_and_expired(make_idp, autojump_clock) -> None:
    idp = make_idp()
    session = make_session(idp, "device")
    flow, shown = await device_code(session)
    idp.deny_device(shown["user_code"])
    with pytest.raises(CredentialsRejected, match="denied"):
        await flow.__anext__()
    flow, shown = await device_code(session)
    with pytest.raises(LoginRequired, match="expired"):
        await flow.__anext__()  # nobody approves within 600 s


async def test_device_login_honours_slow_down(make_idp, autojump_clock) -> None:
    idp = make_idp()
    session = make_session(idp, "device")
    idp.faults.fail_next(
        2, status=400, body='{"error": "slow_down", "error_description": "Slow down"}', content_type="application/json"
    )
    flow, shown = await device_code(session)
    t0 = trio.current_time()
    idp.approve_device(shown["user_code"], "demo")
    assert (await flow.__anext__())["logged_in"]
    # waits 5, then 10 (slowed), then 15 (slowed again) seconds between polls
    assert trio.current_time() - t0 == pytest.approx(5 + 10 + 15, abs=0.5)


async def test_a_caller_joining_a_round_leaves_no_stale_demand(make_idp, autojump_clock) -> None:
    idp = make_idp()
    session = make_session(idp)
    idp.faults.latency = 1.0
    async with running(session.run):
        await trio.sleep(0.5)  # the first login is in flight
        await session.get()  # joins that round
        assert token_requests(idp) == 1
        session.resume()  # anything that merely re-arms the timer must not cause a refresh
        await trio.sleep(60)
        assert token_requests(idp) == 1


async def test_auto_lock_after_idle(make_idp, autojump_clock) -> None:
    from dc_broker.serve.ops import BrokerState, auto_lock
    from dc_broker.sessions.registry import Sessions
    from tests.conftest import CREDENTIALS, LockableStore, idp_transport, profile

    store = LockableStore(dict(CREDENTIALS))
    idp = make_idp()
    sessions = Sessions({"demo": profile("demo")}, store, idp_transport(idp))
    state = BrokerState(sessions=sessions, socket_path="-")
    async with running(sessions.run, partial(auto_lock, state, 600.0)):
        for _ in range(10):  # in use: a token every 5 minutes keeps it open
            state.last_use = trio.current_time()
            await sessions.lookup("demo").get()
            await trio.sleep(300)
        assert not store.locked
        await trio.sleep(601)
        assert store.locked and sessions.lookup("demo").state is State.LOCKED
        assert sessions.lookup("demo").token is None  # no token left in memory


async def test_wrong_url_and_refused_scope_say_what_to_fix(make_idp, autojump_clock) -> None:
    idp = make_idp()
    wrong_tenant = make_session(idp, tenant="nope")
    async with running(wrong_tenant.run):
        with pytest.raises(
            CredentialsRejected, match=r"answers HTTP 404 Not Found \(Realm does not exist\); check server, tenant"
        ):
            await wrong_tenant.get()
    bad_scope = make_session(idp, scope="no-such-scope")
    async with running(bad_scope.run):
        with pytest.raises(CredentialsRejected, match=r"refuses scope 'no-such-scope'.*fix the profile's scope"):
            await bad_scope.get()
