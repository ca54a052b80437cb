"""Events that land while an attempt is at the IdP, OPs that answer as the RFC allows rather than as
Keycloak does, and the sent refresh that must not be walked away from. In-process dev IdP, trio's
autojump clock: a 3 s IdP is a 3 s IdP, in milliseconds."""

from __future__ import annotations

import contextlib
import logging
import math
import random
import re
from functools import partial
from typing import Any

import pytest
import trio

from dc_broker.devserver import DevIdP
from dc_broker.secret import Secret
from dc_broker.sessions import flows
from dc_broker.sessions import registry as registry_module
from dc_broker.sessions.registry import Sessions
from dc_broker.sessions.session import Session, shift_times
from dc_broker.sessions.states import State
from dc_broker.store import MemoryStore
from dc_broker.tokens import Credentials, TokenSet
from dc_token.errors import (
    CredentialsRejected,
    InternalError,
    LoginRequired,
    UnknownProfile,
    UpstreamError,
    UpstreamUnavailable,
)
from tests.conftest import (
    CREDENTIALS,
    LockableStore,
    idp_transport,
    make_session,
    outcome_of,
    password_login_at_a_slow_idp,
    profile,
    registry,
    running,
    trio_wall_clock,
)


def grants(idp: DevIdP, grant: str) -> int:
    return sum(n for (_, _, g), n in idp.stats.token_requests.items() if g == grant)


async def a_login_and_a_scope(sessions: Sessions, *, served: bool = True) -> tuple[Session, Session]:
    """The demo login, logged in, and its per-request scope "email profile" (``served``: with its
    narrowed token already fetched)."""
    demo = sessions.lookup("demo")
    await demo.get()
    scoped = sessions.lookup_scoped(demo, "email profile")
    if served:
        await scoped.get()
    return demo, scoped


async def in_flight(session: Session) -> None:
    """Force a refresh now and return once it is at the IdP (or, from a fast IdP, back already)."""
    tok = session.token
    assert tok is not None
    sent = session.idp_requests
    assert session.invalidate(tok.access_token.reveal())
    while session.attempt is None and session.idp_requests == sent:
        await trio.sleep(0.01)


# -- events while a refresh is at a slow IdP ---------------------------------------------------------------


async def test_lock_then_unlock_while_a_rotating_refresh_is_at_a_slow_idp(make_idp, autojump_clock) -> None:
    """The first finding of the issue: this ended the daemon with LifecycleError('granted' in
    'empty'). Now the outcome of the older generation is dropped, its rotated refresh token kept."""
    idp = make_idp(access_lifespan=60, rotate_refresh_tokens=True)
    store = LockableStore({"demo": CREDENTIALS["demo"]})
    sessions = registry(idp, "demo", store=store)
    async with running(sessions.run):
        demo = sessions.lookup("demo")
        await demo.get()
        idp.faults.latency = 3.0
        await in_flight(demo)
        with trio.move_on_after(1.0):
            await sessions.lock()  # waits for the refresh at the IdP before the store locks
        assert demo.state is State.LOCKED and demo.token is None and not store.locked
        sessions.unlocked()  # an unlock arriving while lock still waits: the store never locked
        assert demo.state is State.FRESH
        await trio.sleep(10)
        assert demo.peek(0, trio.current_time()) is not None and demo.state is State.FRESH
        idp.faults.latency = 0.0
        for _ in range(5):  # the chain of refresh tokens is intact: every later refresh works
            await in_flight(demo)
            await demo.settled()
            await trio.sleep(11)
    assert idp.stats.refresh_reuse == 0 and grants(idp, "password") == 1


async def test_a_lock_stores_a_rotation_that_lands_after_it_and_unlock_picks_it_up(make_idp, autojump_clock) -> None:
    idp = make_idp(access_lifespan=60, rotate_refresh_tokens=True)
    store = LockableStore({"demo": CREDENTIALS["demo"]})
    sessions = registry(idp, "demo", store=store)
    async with running(sessions.run):
        demo = sessions.lookup("demo")
        await demo.get()
        idp.faults.latency = 3.0
        await in_flight(demo)
        await sessions.lock()  # the refresh started at the floor (1 s) and took 3 s
        assert store.locked and demo.token is None and trio.current_time() == pytest.approx(4.0, abs=0.1)
        store.unlock()
        saved = store.saved_tokens("demo")
        assert saved is not None and demo.refreshes == 1  # the rotated tokens are stored, not served
        sessions.unlocked()
        assert demo.token is not None and demo.token.refresh_token == saved.refresh_token
        idp.faults.latency = 0.0
        await trio.sleep(10)  # invalidate forces at most one refresh per 10 s
        await in_flight(demo)
        await demo.settled()
        assert demo.state is State.FRESH and demo.refreshes == 2
    assert idp.stats.refresh_reuse == 0 and grants(idp, "password") == 1


@pytest.mark.parametrize("change", ["logout", "set_secrets", "reload", "adopt"])
async def test_a_change_during_a_slow_refresh_leaves_the_broker_running(make_idp, autojump_clock, change: str) -> None:
    idp = make_idp(access_lifespan=60, rotate_refresh_tokens=True)
    sessions = registry(idp, "demo")
    async with running(sessions.run):
        demo = sessions.lookup("demo")
        await demo.get()
        idp.faults.latency = 3.0
        await in_flight(demo)
        gen = demo.generation
        if change == "logout":
            await demo.logout()  # waits for the login lock: the refresh ends first, then is revoked
            assert demo.state is State.LOGIN_REQUIRED
            await demo.password_login(Secret("demo"))
        elif change == "set_secrets":
            demo.credentials_changed(relogin=True)
        elif change == "reload":
            sessions.reload({"demo": profile("demo", scope="openid")})
        else:
            fresh = await demo.password_login(Secret("demo"))  # waits for the refresh, then replaces it
            assert demo.token is fresh
        assert demo.generation > gen
        with trio.fail_after(2 * 60):  # serving again within two token lifetimes
            while demo.peek(0, trio.current_time()) is None:
                await trio.sleep(0.5)
        await trio.sleep(200)  # and it keeps refreshing
        assert demo.state is State.FRESH
    assert idp.stats.refresh_reuse == 0


async def test_a_device_login_landing_while_a_narrowing_holds_the_login(make_idp, autojump_clock) -> None:
    idp = make_idp(access_lifespan=60, rotate_refresh_tokens=True)
    sessions = registry(idp, "demo")
    async with running(sessions.run) as nursery:
        demo, child = await a_login_and_a_scope(sessions, served=False)
        idp.faults.latency = 3.0
        nursery.start_soon(child.get)
        while not demo.busy:
            await trio.sleep(0.01)
        login = await demo.password_login(Secret("demo"))  # a new login while the narrowing is at the IdP
        assert demo.token is login and demo.state is State.FRESH
        assert child.token is None  # narrowed from the login that was replaced
        await trio.sleep(10)
        assert (await child.get()).scope is not None
    assert idp.stats.refresh_reuse == 0


async def test_a_real_device_login_landing_while_a_narrowing_holds_the_login(make_idp, autojump_clock) -> None:
    """The issue's own case, with a person's device login (the test above adopts a password login): the
    finished device login lands while a per-scope request of the same profile holds the login at a
    slow IdP. It is adopted once the narrowing is done (no LifecycleError, no broker ended), the
    child's token narrowed from the replaced login is forgotten, and no refresh token is used twice."""
    idp = make_idp(access_lifespan=60, rotate_refresh_tokens=True)
    sessions = registry(idp, "device")
    async with running(sessions.run) as nursery:
        device = sessions.lookup("device")
        await approved_device_login(idp, device)
        first = device.token
        child = sessions.lookup_scoped(device, "email profile")
        idp.faults.hang = True  # the IdP holds every token request until released
        nursery.start_soon(child.get)
        while not device.busy:
            await trio.sleep(0.01)
        adopted = trio.Event()

        async def person() -> None:
            await approved_device_login(idp, device)
            adopted.set()

        nursery.start_soon(person)
        await trio.sleep(15)  # the person approved; the device login's poll (every 5 s) waits at the IdP too
        assert device.busy and not adopted.is_set() and device.token is first
        polls = sum(n for (_, _, grant), n in idp.stats.token_requests.items() if grant.endswith("device_code"))
        assert polls == 2  # the first login's one poll, and this one's, held at the IdP
        idp.faults.hang = False  # both answers come: the login's lands while the narrowing holds the login
        await adopted.wait()
        assert device.token is not first and device.state is State.FRESH
        assert child.token is None  # narrowed from the login that was replaced
        await trio.sleep(10)
        assert (await child.get()).access_token
    assert idp.stats.refresh_reuse == 0


async def test_an_outcome_of_an_old_generation_is_dropped_not_applied(make_idp, autojump_clock) -> None:
    idp = make_idp(access_lifespan=60)
    session = make_session(idp)
    async with running(session.run):
        await session.get()
        idp.realm("demo").user("demo").password = "changed"
        idp.faults.latency = 3.0
        session.credentials_changed(relogin=True)  # the attempt starts at the floor: t = 1
        await trio.sleep(1.5)
        assert session.attempt is not None
        session.credentials_changed()  # e.g. `dc-broker set` again: the refused attempt is not the answer
        await trio.sleep(3.0)  # t = 4.5: the first attempt was refused at 4 and dropped; the next is out
        assert session.effective_state(trio.current_time()) is State.EMPTY and session.attempt is not None
        await trio.sleep(5)
        assert session.state is State.REJECTED  # the new generation's own attempt decides


async def approved_device_login(idp: DevIdP, session: Session) -> None:
    """A person's device login, approved at the dev IdP as user demo."""
    login = session.device_login()
    shown = await login.__anext__()
    idp.approve_device(shown["user_code"], "demo")
    async for _ in login:
        pass


# -- RFC 6749 section 6 and other OPs ---------------------------------------------------------------------------


@pytest.mark.parametrize("answer", ["none", "same"])
async def test_an_op_that_never_rotates_keeps_a_device_login_for_twenty_refreshes(
    make_idp, autojump_clock, answer: str
) -> None:
    idp = make_idp(access_lifespan=60, sso_idle=90, refresh_token_answer=answer, send_refresh_expires_in=False)
    session = make_session(idp, "device")
    async with running(session.run):
        await approved_device_login(idp, session)
        first = session.token
        assert first is not None and first.refresh_token is not None
        await trio.sleep(20 * 60 * 0.8 + 5)
        assert session.refreshes >= 21 and session.state is State.FRESH
        assert session.token is not None and session.token.refresh_token == first.refresh_token
    assert grants(idp, "password") == 0 and grants(idp, "refresh_token") >= 20


async def test_a_password_profile_never_sends_the_password_while_its_refresh_token_lives(
    make_idp, autojump_clock
) -> None:
    idp = make_idp(access_lifespan=60, sso_idle=90, refresh_token_answer="none", send_refresh_expires_in=False)
    session = make_session(idp)
    async with running(session.run):
        await trio.sleep(30 * 60)
    assert grants(idp, "password") == 1 and grants(idp, "refresh_token") >= 35
    assert session.store.saved_tokens("demo").refresh_token is not None  # in the store too, for a restart


async def test_a_dead_refresh_token_said_with_invalid_request_falls_back_to_the_password(
    make_idp, autojump_clock
) -> None:
    idp = make_idp(access_lifespan=60, dead_refresh_error="invalid_request")
    session = make_session(idp)
    async with running(session.run):
        await session.get()
        idp._state.sessions.kill_matching("demo")  # an admin's "log out all sessions"
        await trio.sleep(120)
        assert session.state is State.FRESH
    assert grants(idp, "password") == 2


async def test_expires_in_absent_uses_the_jwts_exp_and_is_logged_once(make_idp, autojump_clock, caplog) -> None:
    idp = make_idp(access_lifespan=120, send_expires_in=False)
    session = make_session(idp)
    with caplog.at_level(logging.WARNING, logger="dc_broker.sessions"):
        async with running(session.run):
            tok = await session.get()
            assert tok.lifetime == pytest.approx(119.0)  # exp - iat, less the whole second
            await trio.sleep(20 * 60)
    odd = [r for r in caplog.records if "answer is odd" in r.getMessage()]
    assert len(odd) == 1 and "own exp gives 120 s" in odd[0].getMessage()
    assert session.refreshes <= 20 * 60 / (0.7 * 119) + 2


async def test_a_zero_expires_in_does_not_refresh_every_second(make_idp, autojump_clock) -> None:
    idp = make_idp(access_lifespan=600)
    idp.faults.expires_in = "0"
    session = make_session(idp)
    async with running(session.run):
        await trio.sleep(3600)
    assert session.refreshes <= 3600 / (0.7 * 599) + 2 and session.state is State.FRESH


async def test_an_idp_ignoring_scope_on_refresh_never_makes_a_wider_token_served(make_idp, autojump_clock) -> None:
    """RH-SSO 7.6 answers a narrowing refresh with the login's whole scope: a password profile gets the
    narrower token from a password grant with that scope; a device login's narrowing is refused."""
    idp = make_idp(refresh_scope="ignore")
    sessions = registry(idp, "demo", "device", scope="openid phone")
    async with running(sessions.run):
        demo = sessions.lookup("demo")
        assert "phone" in (await demo.get()).scope.split()
        child = sessions.lookup_scoped(demo, "openid profile email")
        tok = await child.get()
        assert tok.scope == "openid profile email"
        assert child.status(trio.current_time())["scope"] == tok.scope
        device = sessions.lookup("device")
        await approved_device_login(idp, device)
        with pytest.raises(CredentialsRejected, match="ignores scope on a refresh"):
            await sessions.lookup_scoped(device, "openid profile email").get()


# -- a sent refresh is precious ---------------------------------------------------------------------------------


async def test_a_refresh_at_a_stalled_idp_is_read_past_the_ordinary_timeout(make_idp, autojump_clock) -> None:
    """30 s is past the 20 s an ordinary request gets: the answer to a refresh is still read, so the
    rotated refresh token is not lost and never presented twice."""
    idp = make_idp(access_lifespan=60, rotate_refresh_tokens=True)
    session = make_session(idp)
    async with running(session.run):
        await session.get()
        idp.faults.latency = 30.0
        await in_flight(session)
        await session.settled()
        assert session.state is State.FRESH and session.refreshes == 2
    assert idp.stats.refresh_reuse == 0


async def test_after_a_lost_answer_the_refresh_token_waits_for_the_idp_to_answer_something(
    make_idp, autojump_clock
) -> None:
    idp = make_idp(access_lifespan=600, rotate_refresh_tokens=True)
    session = make_session(idp)
    async with running(session.run):
        await session.get()
        idp.faults.all_endpoints = True
        idp.faults.hang = True
        await in_flight(session)
        await trio.sleep(200)  # past the patient read: the answer is lost
        assert session.state is State.UNAVAILABLE  # (the token was invalidated: the API said 401)
        refreshes_sent = grants(idp, "refresh_token")
        await trio.sleep(600)
        assert grants(idp, "refresh_token") == refreshes_sent == 1  # nothing but probes while it hangs
        idp.faults.hang = False
        await trio.sleep(400)
        assert session.state is State.FRESH and grants(idp, "refresh_token") == 2
        assert idp.stats.requests["discovery"] >= 1
    assert idp.stats.refresh_reuse == 0  # the hung request was never processed: presenting it again was safe


@pytest.mark.parametrize(("max_reuse", "password_logins"), [(1, 1), (0, 2)])
async def test_refresh_token_max_reuse_1_closes_the_window_of_a_lost_rotation(
    make_idp, autojump_clock, max_reuse: int, password_logins: int
) -> None:
    """What docs/keycloak.md tells an administrator to set: the IdP rotates the refresh token and its
    answer never arrives (finished 200 s late, past the patient read). The broker waits for the IdP
    to answer a probe and presents the old refresh token once more. With Keycloak's "Refresh Token
    Max Reuse" 1 that is accepted and nothing is lost; with the default 0 it ends the session, and a
    password profile logs in again with its password (a device login would need its person)."""
    idp = make_idp(access_lifespan=600, rotate_refresh_tokens=True, refresh_token_max_reuse=max_reuse)
    session = make_session(idp)
    async with running(session.run):
        await session.get()
        idp.faults.late = 200.0  # rotated at once; the answer finished only after the broker gave up on it
        await in_flight(session)
        while session.last_error is None:  # the answer is given up on at 180 s
            await trio.sleep(0.1)
        assert "did not finish answering within 180 s" in session.last_error.message
        idp.faults.late = 0.0  # answers come at once again, before the broker asks again
        await trio.sleep(400)
        assert session.state is State.FRESH
        assert grants(idp, "refresh_token") == 2  # the lost one, then the same token presented once more
        assert grants(idp, "password") == password_logins
    assert idp.stats.refresh_reuse == 1  # the IdP saw the rotated-away token once more, and no more


# -- restarts, children, crashes, interactive errors -----------------------------------------------------------


async def test_a_due_refresh_after_a_restart_is_not_delayed_past_the_tokens_life(make_idp, autojump_clock) -> None:
    idp = make_idp(access_lifespan=60)
    first = make_session(idp)
    async with running(first.run):
        await first.get()
    await trio.sleep(55)  # the broker was down; the token has 5 s left and its refresh is due
    second = Session(first.profile, first.store, first.idp, rng=random.Random(5), wall_clock=trio_wall_clock)
    assert second.state is State.FRESH
    started = trio.current_time()
    async with running(partial(second.run, first_attempt_delay=4.9)):  # the 5 s start-up stagger
        while second.refreshes == 0:
            await trio.sleep(0.01)
    assert trio.current_time() - started <= 0.1 * 5 + 0.01


async def test_a_scoped_childs_failure_during_an_outage_is_the_parents_error(make_idp, autojump_clock, caplog) -> None:
    idp = make_idp(access_lifespan=60)
    sessions = registry(idp, "demo")
    async with running(sessions.run):
        _, child = await a_login_and_a_scope(sessions)
        idp.faults.fail_next(1000)
        with caplog.at_level(logging.WARNING):
            await trio.sleep(120)
            with pytest.raises(UpstreamUnavailable):
                await child.get()
    assert child.state in (State.UNAVAILABLE, State.STALE)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "inside the broker" not in caplog.text


async def test_a_childs_attempt_started_just_before_a_lock_does_not_go(make_idp, autojump_clock) -> None:
    """Found by the model (tests/test_session_model.py): the scheduler starts an attempt as a task of
    its own (``start_soon``), and `dc-broker lock` locks every session before that task runs; while
    the lock waits for the refreshes at the IdP, a person's login lands and the login is fresh again.
    A per-request scope's attempt then went anyway, and its token landed on a session that waits for
    unlock: ``LifecycleError`` (a crash, restarted by the supervisor). It must not go at all, as the
    login's own attempt does not."""
    idp = make_idp(access_lifespan=60)
    sessions = registry(idp, "demo")
    async with running(sessions.run):
        demo, child = await a_login_and_a_scope(sessions)
        sessions.locked()  # `dc-broker lock`'s first step; it then waits for the IdP before the store locks
        await demo.password_login(Secret("demo"))  # a person's login lands meanwhile: the login is fresh
        refreshes = grants(idp, "refresh_token")
        await child.step()  # the attempt the scheduler started just before the lock, running now
        assert child.state is State.LOCKED and child.token is None and child.crashes == 0
        assert grants(idp, "refresh_token") == refreshes  # nothing was narrowed for a locked session


async def test_a_crashing_session_shows_error_restarts_and_never_ends_the_broker(
    make_idp, autojump_clock, caplog, monkeypatch
) -> None:
    idp = make_idp(access_lifespan=60)
    sessions = registry(idp, "demo", "service")
    crash = {"on": True}
    real = Session._attempt

    async def buggy(self: Session) -> None:
        if crash["on"] and self.profile.name == "demo":
            raise KeyError("a bug")
        await real(self)

    monkeypatch.setattr(Session, "_attempt", buggy)
    with caplog.at_level(logging.ERROR):
        async with running(sessions.run):
            await trio.sleep(10)
            demo = sessions.lookup("demo")
            status = demo.status(trio.current_time())
            assert status["state"] == "error" and "KeyError" in status["last_error"]
            with pytest.raises(InternalError):
                await demo.get()
            assert (await sessions.lookup("service").get()).access_token  # the others are unaffected
            crash["on"] = False
            await trio.sleep(300)
            assert demo.state is State.FRESH
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1  # once with its traceback; repeats are one line


async def test_a_device_login_while_the_idp_is_down_is_unavailable_not_a_bug(autojump_clock) -> None:
    from dc_broker.idp.transport import IdpTransport

    session = Session(profile("device", server="http://127.0.0.1:9"), MemoryStore(), IdpTransport())
    with pytest.raises(UpstreamUnavailable, match=re.escape("nothing answers at 127.0.0.1:9 (connection refused)")):
        async for _ in session.device_login():
            pass
    with pytest.raises(UpstreamUnavailable):
        await Session(profile("demo", server="http://127.0.0.1:9"), MemoryStore(), IdpTransport()).password_login(
            Secret("pw")
        )


async def test_logout_forgets_the_narrowed_tokens_too(make_idp, autojump_clock) -> None:
    idp = make_idp()
    sessions = registry(idp, "demo")
    async with running(sessions.run):
        demo, child = await a_login_and_a_scope(sessions)
        await demo.logout()
        assert child.peek(0, trio.current_time()) is None
        with pytest.raises(LoginRequired):
            await child.get()


async def test_a_logout_the_idp_cannot_take_keeps_the_login_unless_it_is_a_remove(make_idp, autojump_clock) -> None:
    """`dc-broker logout` (``keep_unreached``) at an IdP that answers 503 everywhere ended nothing:
    ``UpstreamUnavailable`` naming the profile once, and the login kept and served; once the IdP is
    back the same logout ends its session. `remove`'s logout forgets it regardless."""
    idp = make_idp()
    sessions = registry(idp, "demo")
    async with running(sessions.run):
        demo = sessions.lookup("demo")
        token = await demo.get()
        idp.faults.all_endpoints = True
        idp.faults.fail_next(100)
        with pytest.raises(UpstreamUnavailable) as caught:
            await demo.logout(keep_unreached=True)
        assert caught.value.message == (
            "profile 'demo': the identity provider could not end the login: identity provider answered HTTP 503; "
            "nothing changed: the login is kept for `dc-broker logout demo` to end once it answers "
            "(`dc-broker remove demo` forgets it here regardless)"
        )
        assert demo.state is State.FRESH and (await demo.get()).access_token == token.access_token
        assert demo.store.credentials("demo").password is not None  # nothing forgotten either
        idp.faults.clear()
        assert await demo.logout(keep_unreached=True) is flows.Ended.SESSION
        assert demo.state is State.LOGIN_REQUIRED
        await demo.password_login(Secret("demo"))
        idp.faults.all_endpoints = True
        idp.faults.fail_next(100)
        assert await demo.logout() is flows.Ended.UNCONFIRMED  # remove's: forgotten here all the same
        assert demo.state is State.LOGIN_REQUIRED and demo.token is None


def test_restored_token_times_round_trip() -> None:
    tok = TokenSet(Secret("A"), 10.0, 70.0, refresh_token=Secret("R"), refresh_expires_at=100.0)
    assert shift_times(shift_times(tok, 5.0), -5.0) == tok
    assert math.isclose(shift_times(tok, 5.0).expires_at, 75.0)


@pytest.mark.parametrize(
    ("failure", "lost"),
    [("ReadTimeout", True), ("RemoteProtocolError", True), ("ConnectError", False), ("ConnectTimeout", False)],
)
async def test_a_lost_answer_to_a_sent_refresh_is_answer_lost_and_a_failed_connect_is_not(
    failure: str, lost: bool
) -> None:
    import httpx

    from dc_broker.errors import AnswerLost, UpstreamTransient
    from dc_broker.idp import oidc
    from dc_broker.idp.transport import IdpTransport

    def fail(request: httpx.Request) -> httpx.Response:
        raise getattr(httpx, failure)("no answer", request=request)

    transport = IdpTransport(transport=httpx.MockTransport(fail))
    client = oidc.ClientCredentials("cli", "none")
    refresh = oidc.build_refresh("http://127.0.0.1:1/t", client, Secret("RT"))
    with pytest.raises(UpstreamTransient) as info:
        await transport.send(refresh)
    assert isinstance(info.value, AnswerLost) is lost
    password = oidc.build_password("http://127.0.0.1:1/t", client, "alice", Secret("pw"))
    with pytest.raises(UpstreamTransient) as info:
        await transport.send(password)  # nothing single-use was spent: an ordinary failure
    assert not isinstance(info.value, AnswerLost)


async def test_a_brute_force_lock_is_waited_out_not_taken_for_a_wrong_password(make_idp, autojump_clock) -> None:
    """Keycloak answers the right password 'Invalid user credentials' while brute-force detection locks
    the account. A password the IdP accepted before is asked again after 60 s (callers' probes wait
    too), so the profile is back once the lock lifts, with at most 3 password attempts meanwhile."""
    idp = make_idp(access_lifespan=300, brute_force=True, failure_factor=1, wait_increment=60)
    session = make_session(idp)
    async with running(session.run) as nursery:
        first = await session.get()
        realm = idp.realm("demo")
        idp._state.brute_force.failed(realm, "demo", idp._state.now())  # a wrong password elsewhere: locked 60 s
        idp._state.sessions.kill_matching("demo")  # and the refresh token is dead: a password grant is next
        before = grants(idp, "password")
        session.invalidate(first.access_token.reveal())

        async def caller() -> None:  # a crowd that keeps asking meanwhile
            while True:
                with contextlib.suppress(UpstreamUnavailable, UpstreamError):
                    await session.get()
                await trio.sleep(0.5)

        nursery.start_soon(caller)
        await trio.sleep(5)
        assert session.effective_state(trio.current_time()) is State.UNAVAILABLE
        assert "brute-force detection" in (session.last_error.message if session.last_error else "")
        with trio.fail_after(60 + 10):
            while session.state is not State.FRESH:
                await trio.sleep(0.5)
        assert grants(idp, "password") - before <= 3
        nursery.cancel_scope.cancel()


async def test_a_password_never_accepted_is_wrong_at_once(make_idp, autojump_clock) -> None:
    idp = make_idp(brute_force=True, failure_factor=1)
    session = make_session(
        idp, credentials=Credentials(password=Secret("not-it"), client_secret=Secret("dc-cli-secret"))
    )
    async with running(session.run):
        with pytest.raises(CredentialsRejected, match="refused the password"):
            await session.get()
    assert session.state is State.REJECTED and grants(idp, "password") == 1


async def test_requests_to_one_idp_queue_beyond_a_limit(autojump_clock) -> None:
    """Hundreds of profiles refreshing against one IdP at once: at most MAX_PER_ORIGIN go out together,
    the rest wait their turn in order (httpx's pool re-scans every waiting request on each answer: with
    1,000 waiting it pinned the event loop), and every one is answered."""
    import httpx

    from dc_broker.idp import oidc
    from dc_broker.idp.transport import MAX_PER_ORIGIN, IdpTransport

    now_in_flight, most = 0, 0

    async def answer(request: httpx.Request) -> httpx.Response:
        nonlocal now_in_flight, most
        now_in_flight += 1
        most = max(most, now_in_flight)
        await trio.sleep(0.5)
        now_in_flight -= 1
        return httpx.Response(200, json={"access_token": "A", "expires_in": 60})

    class Slow(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            return await answer(request)

    transport = IdpTransport(transport=Slow())
    client = oidc.ClientCredentials("cli", "none")
    answered = 0

    async def one() -> None:
        nonlocal answered
        resp = await transport.send(oidc.build_password("http://127.0.0.1:1/t", client, "u", Secret("pw")))
        answered += resp.status == 200

    async with trio.open_nursery() as nursery:
        for _ in range(200):
            nursery.start_soon(one)
    assert answered == 200 and most == MAX_PER_ORIGIN
    assert trio.current_time() == pytest.approx(200 / MAX_PER_ORIGIN * 0.5, abs=0.6)


async def test_a_stop_waits_for_a_refresh_in_flight_and_not_for_a_grant_that_spends_nothing(
    make_idp, autojump_clock
) -> None:
    """What the daemon waits for on SIGTERM (``settled(spending_only=True)``): a refresh at a slow
    IdP holds the only copy of the next refresh token, so the stop waits and stores it; a
    client-credentials grant at the same IdP loses nothing when cut short, so the stop does not wait
    for it (50 such profiles at an unreachable IdP kept a broker from stopping for its 20 s drain)."""
    idp = make_idp(access_lifespan=60, rotate_refresh_tokens=True)
    store = MemoryStore({n: CREDENTIALS[n] for n in ("demo", "service")})
    profiles = {"demo": profile("demo"), "service": profile("service")}
    sessions = Sessions(profiles, store, idp_transport(idp), rng=random.Random(3), wall_clock=trio_wall_clock)
    async with running(sessions.run):
        demo, service = sessions.lookup("demo"), sessions.lookup("service")
        await demo.get()
        await service.get()
        idp.faults.latency = 30.0
        await in_flight(service)
        assert service.busy and not service.holds_refresh_token
        started = trio.current_time()
        await sessions.settled(spending_only=True)
        assert trio.current_time() == started  # nothing to keep: no wait
        await in_flight(demo)
        assert demo.busy and demo.holds_refresh_token
        await sessions.settled(spending_only=True)
        assert trio.current_time() - started == pytest.approx(30.0, abs=1.5)  # the rotation came back
        saved = store.saved_tokens("demo")
        assert saved is not None and demo.token is not None and saved.refresh_token == demo.token.refresh_token
    assert idp.stats.refresh_reuse == 0


async def test_a_scope_evicted_while_its_narrowing_is_at_the_idp_keeps_the_rotated_token(
    make_idp, autojump_clock
) -> None:
    """A per-request scope's narrowing spends the login's refresh token at the IdP; the scope is
    evicted (a full profile makes room) while the answer drips in. The eviction must not cut the
    request: the IdP has rotated the token, and the answer is the only copy of the next one."""
    idp = make_idp(access_lifespan=60, rotate_refresh_tokens=True)
    sessions = registry(idp, "demo")
    async with running(sessions.run) as nursery:
        demo, first = await a_login_and_a_scope(sessions, served=False)
        idp.faults.drip = 0.005  # the IdP has processed the refresh; its answer comes a byte at a time
        nursery.start_soon(partial(_swallow, first.get))
        while not demo.busy:
            await trio.sleep(0.01)
        await trio.sleep(1.0)
        for i in range(registry_module.MAX_SCOPES_PER_PROFILE):  # the least recently used, first, makes room
            sessions.lookup_scoped(demo, f"profile x{i}")
        assert first.retired
        await trio.sleep(5)
        idp.faults.drip = 0.0
        await trio.sleep(70)  # the login refreshes on with the rotated token
        assert demo.state is State.FRESH
    assert idp.stats.refresh_reuse == 0 and grants(idp, "password") == 1


async def test_a_caller_waiting_on_a_scope_that_leaves_is_told_at_once_why(make_idp, autojump_clock) -> None:
    """The window ``Sessions._retire`` closes: a caller waits for a per-request scope's round while
    its narrowing is at a slow IdP, and the scope is evicted. No round of that session will ever
    come; the caller is told at once that it left (ask again), not after the 30 s wait limit as
    "the identity provider has not answered"."""
    idp = make_idp(access_lifespan=60)
    sessions = registry(idp, "demo")
    async with running(sessions.run) as nursery:
        demo, scoped = await a_login_and_a_scope(sessions, served=False)
        idp.faults.latency = 3.0
        outcome = outcome_of(nursery, scoped.get)
        await trio.sleep(1.0)  # its narrowing is at the IdP
        assert demo.busy and not outcome
        evicted_at = trio.current_time()
        for i in range(registry_module.MAX_SCOPES_PER_PROFILE):  # the least recently used makes room
            sessions.lookup_scoped(demo, f"profile x{i}")
        while not outcome:
            await trio.sleep(0.01)
        told_after = trio.current_time() - evicted_at
    [err] = outcome
    assert isinstance(err, UpstreamUnavailable) and err.retry_after == 1.0
    assert "left the broker while this request waited; ask again" in err.message
    assert told_after < 0.1


async def _swallow(get: Any) -> None:
    with contextlib.suppress(Exception):
        await get()


async def test_a_scope_asked_for_while_logged_out_is_served_once_the_person_logs_in_again(
    make_idp, autojump_clock
) -> None:
    """A per-request scope asked for after `dc-broker logout` is refused (login required: it narrows a
    login there is none of); after the person logs in again the same scope is served, not refused
    with the old "log in" until the broker restarts."""
    idp = make_idp(access_lifespan=60)
    sessions = registry(idp, "demo")
    async with running(sessions.run):
        demo = sessions.lookup("demo")
        await demo.get()
        child = sessions.scoped(demo, "email profile", caller=1000)
        await child.get()
        await demo.logout()
        with pytest.raises(LoginRequired):
            await sessions.scoped(demo, "email profile", caller=1000).get()
        await demo.password_login(Secret("demo"))
        with trio.fail_after(30):
            tok = await sessions.scoped(demo, "email profile", caller=1000).get()
        assert tok.scope is not None and set(tok.scope.split()) >= {"email", "profile"}


async def test_a_device_login_refused_by_a_realm_setting_keeps_its_refresh_token_until_it_is_fixed(
    make_idp, autojump_clock
) -> None:
    """A configuration refusal of a refresh (here the realm disabled: Keycloak's 'Realm not enabled')
    says nothing about the refresh token: a device login (no password to fall back on) keeps it,
    asks again every few minutes, and is fresh again once the setting is fixed, with no person."""
    idp = make_idp(access_lifespan=60, rotate_refresh_tokens=True)
    sessions = registry(idp, "device")
    async with running(sessions.run):
        dev = sessions.lookup("device")
        await approved_device_login(idp, dev)
        assert dev.token is not None
        held = dev.token.refresh_token
        idp.realm("demo").enabled = False
        await in_flight(dev)
        await dev.settled()
        assert dev.state is not State.LOGIN_REQUIRED
        assert dev.token is not None and dev.token.refresh_token == held  # kept: nothing said it is dead
        idp.realm("demo").enabled = True
        await trio.sleep(400)
        assert dev.state is State.FRESH and dev.token.refresh_token != held  # refreshed (and rotated) since
    assert idp.stats.refresh_reuse == 0


# -- a person's login that ends after its profile was removed or changed ---------------------------------------


async def test_a_password_login_ending_after_its_profile_was_removed_stores_nothing(make_idp, autojump_clock) -> None:
    """`dc-broker login` at a slow IdP while `dc-broker remove` (a reload without the profile) lands:
    the password the IdP accepted is not stored for a profile the config no longer has, nor its login."""
    idp = make_idp(access_lifespan=60)
    store = MemoryStore({"demo": Credentials(client_secret=Secret("dc-cli-secret"))})
    sessions = registry(idp, "demo", store=store)
    async with running(sessions.run) as nursery:
        demo = sessions.lookup("demo")
        outcome = await password_login_at_a_slow_idp(idp, demo, nursery)
        sessions.reload({})
        await trio.sleep(5)
        (err,) = outcome
        assert isinstance(err, UnknownProfile), err
        assert "removed during the login" in err.message and "nothing was stored" in err.message
        assert store.credentials("demo").password is None and store.saved_tokens("demo") is None
        assert demo.token is None


@pytest.mark.parametrize("how", ["password", "device"])
async def test_a_login_for_settings_changed_meanwhile_is_not_adopted(make_idp, autojump_clock, how: str) -> None:
    """`dc-broker add --force` (a new user) while a person's login is at the IdP: the login made for the
    old settings is not stored as the new settings' login, and the person is told to log in again."""
    idp = make_idp(access_lifespan=60)
    name = "demo" if how == "password" else "device"
    store = MemoryStore(
        {name: Credentials(client_secret=Secret("dc-cli-secret")) if how == "password" else Credentials()}
    )
    sessions = registry(idp, name, store=store)
    async with running(sessions.run) as nursery:
        session = sessions.lookup(name)
        outcome: list[BaseException | None] = []

        async def login() -> None:
            try:
                if how == "password":
                    await session.password_login(Secret("demo"))
                else:
                    flow = session.device_login()
                    shown = await flow.__anext__()
                    idp.approve_device(shown["user_code"], "demo")
                    idp.faults.latency = 3.0
                    async for _ in flow:
                        pass
                outcome.append(None)
            except Exception as exc:
                outcome.append(exc)

        if how == "password":
            idp.faults.latency = 3.0
        nursery.start_soon(login)
        while not session.busy and idp.faults.latency == 0.0:
            await trio.sleep(0.01)
        await trio.sleep(0.5)
        sessions.reload({name: profile(name, client_id="dc-cli", grant="password", username="other")})
        await trio.sleep(10)
        (err,) = outcome
        assert isinstance(err, LoginRequired), err
        assert "settings changed during the login" in err.message and f"dc-broker login {name}" in err.message
        assert store.credentials(name).password is None and store.saved_tokens(name) is None
        assert session.token is None


async def test_a_password_login_keeps_a_client_secret_rotated_while_it_was_at_the_idp(make_idp, autojump_clock) -> None:
    """The password is stored over the credentials as they are when the login ends: a `dc-broker
    rotate --client-secret` that landed meanwhile is not undone by the login's older copy."""
    idp = make_idp(access_lifespan=60)
    store = MemoryStore({"demo": Credentials(client_secret=Secret("dc-cli-secret"))})
    sessions = registry(idp, "demo", store=store)
    async with running(sessions.run) as nursery:
        demo = sessions.lookup("demo")
        logins = await password_login_at_a_slow_idp(idp, demo, nursery)
        await trio.sleep(0.5)
        store.set_credentials("demo", Credentials(client_secret=Secret("rotated")))
        await trio.sleep(10)
        assert store.credentials("demo") == Credentials(password=Secret("demo"), client_secret=Secret("rotated"))
        assert len(logins) == 1 and isinstance(logins[0], TokenSet), logins


@pytest.mark.parametrize("relogin", [True, False])
async def test_a_request_whose_rounds_all_end_without_a_token_is_told_why_and_to_ask_again(
    make_idp, autojump_clock, relogin: bool
) -> None:
    """Each refresh round a caller joins ends with its outcome dropped, because the login changed
    while it was at the IdP (here: a new secret each time, which drops the login, or keeps it with
    its token expired by the API's 401 and, from an OP that answers a refresh with the same refresh
    token, nothing new to keep from the dropped answer). The caller was told "the identity provider
    grants tokens too short for min_ttl 0 s (last lifetime ...)", which names a fault nobody made;
    it is told what happened, as a retryable error."""
    idp = make_idp(access_lifespan=60, refresh_token_answer="same")
    session = make_session(idp)
    async with running(session.run) as nursery:
        tok = await session.get()
        idp.faults.latency = 3.0
        assert session.invalidate(tok.access_token.reveal())  # the API said 401: the token is done
        await trio.sleep(0.5)
        outcome = outcome_of(nursery, lambda: session.get())
        for _ in range(3):
            await trio.sleep(1.0)  # this round's attempt is at the IdP
            session.credentials_changed(relogin=relogin)  # `dc-broker rotate`: its outcome is dropped
            await trio.sleep(2.0)
        await trio.sleep(5.0)
    [err] = outcome
    assert isinstance(err, UpstreamUnavailable) and err.retry_after == 1.0
    assert "3 refreshes in a row ended without a token" in err.message and "ask again" in err.message
    assert "too short" not in err.message
