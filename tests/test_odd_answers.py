"""A session against the dev IdP in each odd-answer mode (in-process, trio's autojump clock): body-less
refusals, odd lifetimes, echoed secrets, drip-fed answers, slow recovery, non-destructive logins."""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any

import httpx
import pytest
import trio

from dc_broker.errors import RecordCorrupt
from dc_broker.idp import oidc
from dc_broker.idp.transport import IdpTransport, Timeouts
from dc_broker.secret import Secret
from dc_broker.sessions.session import Session
from dc_broker.sessions.states import Event, LifecycleError, State, next_state
from dc_broker.store import MemoryStore
from dc_broker.tokens import Credentials, TokenSet
from dc_token.errors import CredentialsRejected, Locked, LoginRequired, UpstreamUnavailable
from tests.conftest import CREDENTIALS, idp_transport, make_session, profile, running

T = 300.0


def _token_requests(idp: Any, grant: str) -> int:
    return sum(n for (_, _, g), n in idp.stats.token_requests.items() if g == grant)


# -- 1a: refusals without an OAuth body ---------------------------------------------------------------


@pytest.mark.parametrize("body", ["empty", "html"])
async def test_a_forgotten_session_is_recovered_with_the_stored_password(make_idp, autojump_clock, body) -> None:
    idp = make_idp(access_lifespan=T, sso_idle=T)
    idp.faults.refusal_body = body
    session = make_session(idp)

    async with running(session.run):
        first = await session.get()
        idp.kill_sessions("demo")  # the IdP restarted and forgot every session
        await trio.sleep(T)  # one refresh interval (refreshes at 75 % +- 5 %)
        assert session.state is State.FRESH and session.token is not first
        assert _token_requests(idp, "refresh_token") == 1  # the dead refresh token was tried once
        assert _token_requests(idp, "password") == 2  # ... then the stored password


@pytest.mark.parametrize("body", ["empty", "html", "json"])
async def test_a_refused_password_is_rejected_with_its_http_status(make_idp, autojump_clock, body) -> None:
    idp = make_idp(access_lifespan=T)
    idp.faults.refusal_body = body
    session = make_session(
        idp, credentials=Credentials(password=Secret("wrong"), client_secret=Secret("dc-cli-secret"))
    )

    async with running(session.run):
        with pytest.raises(CredentialsRejected, match="HTTP 401") as info:
            await session.get()
        assert "password of user 'demo'" in info.value.message
        before = idp.stats.total
        await trio.sleep(3600)
        assert session.state is State.REJECTED and idp.stats.total == before  # no retries


async def test_a_public_client_is_not_told_to_fix_its_secret(make_idp, autojump_clock) -> None:
    idp = make_idp()
    session = make_session(idp, "device", client_id="no-such-client")
    session.token = TokenSet(Secret("A"), 0.0, 0.0, refresh_token=Secret("R"), refresh_expires_at=1e9)
    with pytest.raises(CredentialsRejected) as info:
        await session.verify()
    assert "secret" not in info.value.message.replace("no secret", "") and "PROFILE" not in info.value.message


# -- 1b: discovery -----------------------------------------------------------------------------------


async def test_a_404_issuer_is_a_config_error_counted_and_not_retried(make_idp, autojump_clock) -> None:
    idp = make_idp()
    session = make_session(idp, server=None, tenant=None, issuer="http://127.0.0.1:1/realms/nope")

    async with running(session.run):
        with pytest.raises(CredentialsRejected, match=r"HTTP 404.*check the issuer URL"):
            await session.get()
        await trio.sleep(3600)
        assert session.state is State.REJECTED and session.idp_requests == 1
        assert idp.stats.requests["discovery"] == 1


async def test_a_non_https_endpoint_in_discovery_is_a_clean_config_error(make_idp, autojump_clock) -> None:
    class Rewriting(IdpTransport):
        async def send(
            self, req: oidc.HttpRequest, *, ca_bundle: str | None = None, proxy: str | None = None, **more: Any
        ) -> oidc.HttpResponse:
            resp = await super().send(req, ca_bundle=ca_bundle, proxy=proxy, **more)
            if req.url.endswith("openid-configuration"):
                doc = json.loads(resp.body)
                doc["token_endpoint"] = "http://sso.example.com/token"
                return oidc.HttpResponse(resp.status, resp.headers, json.dumps(doc).encode())
            return resp

    idp = make_idp()
    session = Session(
        profile("demo", server=None, tenant=None, issuer="http://127.0.0.1:1/realms/demo"),
        MemoryStore({"demo": CREDENTIALS["demo"]}),
        Rewriting(transport=httpx.ASGITransport(app=idp.app)),
    )
    with pytest.raises(CredentialsRejected, match=r"discovery document .* unusable.*plain http"):
        await session.verify()


# -- 1c: lifetimes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["NaN", "1e999", "1e18", "absent", "0", "-5", "0.01"])
async def test_every_lifetime_keeps_the_floor_rate_and_a_sane_status(make_idp, autojump_clock, raw) -> None:
    idp = make_idp(access_lifespan=T)
    idp.faults.expires_in = raw
    session = make_session(idp, "service")
    callers = 0

    async with running(session.run):
        start = trio.current_time()
        for _ in range(200):  # a busy caller for 100 s that always wants 30 s left
            with contextlib.suppress(UpstreamUnavailable):
                await session.get(min_ttl=30)
            callers += 1
            await trio.sleep(0.5)
        elapsed = trio.current_time() - start
        assert idp.stats.total <= elapsed / session.policy.refresh_floor + 1
        st = session.status(trio.current_time())
        json.dumps(st, allow_nan=False)  # no inf/NaN reaches `dc-broker status`
        assert st["expires_in"] is not None and st["expires_in"] <= oidc.MAX_LIFETIME
    assert callers == 200


# -- 1d: IdP text --------------------------------------------------------------------------------------


async def test_an_echoed_password_never_reaches_logs_status_or_errors(make_idp, autojump_clock, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    idp = make_idp()
    idp.faults.echo_description = True
    password = "s3cret-Passw0rd!"
    session = make_session(
        idp, credentials=Credentials(password=Secret(password), client_secret=Secret("dc-cli-secret"))
    )

    async with running(session.run):
        with pytest.raises(CredentialsRejected) as info:
            await session.get()
        texts = [info.value.message, json.dumps(session.status(trio.current_time())), caplog.text]
        for text in texts:
            assert password not in text and "s3cret-Passw0rd%21" not in text and "dc-cli-secret" not in text
            assert "\x00" not in text and "\x1b" not in text
        assert len(info.value.message) < 1000


# -- 1e: one deadline per request --------------------------------------------------------------------


async def test_a_drip_feeding_idp_cannot_keep_a_profile_refreshing(make_idp, autojump_clock) -> None:
    idp = make_idp()
    idp.faults.drip = 1.0  # one byte a second: every chunk is in time, the whole never is
    store = MemoryStore({"demo": CREDENTIALS["demo"]})
    transport = IdpTransport(Timeouts(total=20.0, patient_total=25.0), transport=httpx.ASGITransport(app=idp.app))
    session = Session(profile("demo"), store, transport)

    async with running(session.run):
        with pytest.raises(UpstreamUnavailable, match="within 25 s"):  # a grant: the patient deadline
            await session.get()
        assert session.state is State.UNAVAILABLE


# -- 1f: demand probes ---------------------------------------------------------------------------------


async def test_callers_see_the_recovery_within_the_probe_interval(make_idp, autojump_clock) -> None:
    idp = make_idp(access_lifespan=T)
    session = make_session(idp, "service")

    async with running(session.run):
        idp.faults.fail_next(12, status=503)
        with pytest.raises(UpstreamUnavailable):
            await session.get()
        await trio.sleep(600)  # an outage: the background backoff has grown to minutes
        idp.faults.clear()
        back_at = trio.current_time()
        while True:
            try:
                await session.get()
                break
            except UpstreamUnavailable as exc:
                assert exc.retry_after is not None and exc.retry_after <= session.policy.demand_probe_interval
                await trio.sleep(exc.retry_after)
        assert trio.current_time() - back_at <= session.policy.demand_probe_interval + 0.01


# -- 1g: logins are non-destructive --------------------------------------------------------------------


async def test_a_wrong_password_at_login_keeps_the_working_login(make_idp, autojump_clock) -> None:
    idp = make_idp(access_lifespan=T)
    session = make_session(idp)

    async with running(session.run):
        working = await session.get()
        with pytest.raises(CredentialsRejected, match="HTTP 401"):
            await session.password_login(Secret("wrong"))
        assert session.token is working and session.state is State.FRESH
        assert session.store.credentials("demo").password == Secret("demo")
        new = await session.password_login(Secret("demo"))
        assert session.token is new


async def test_logout_keeps_a_confidential_clients_secret(make_idp, autojump_clock) -> None:
    idp = make_idp()
    session = make_session(idp)

    async with running(session.run):
        await session.get()
        assert await session.logout()
        assert session.store.credentials("demo") == Credentials(client_secret=Secret("dc-cli-secret"))
        await session.password_login(Secret("demo"))  # works: the client secret was kept
        assert session.state is State.FRESH


async def test_logout_of_client_credentials_revokes_the_access_token(make_idp, autojump_clock) -> None:
    idp = make_idp()
    session = make_session(idp, "service")

    async with running(session.run):
        tok = await session.get()
        assert await session.logout()
        assert oidc_claims_revoked(idp, tok.access_token.reveal())
        with pytest.raises(LoginRequired, match="no client secret stored"):
            await session.get()


def oidc_claims_revoked(idp: Any, token: str) -> bool:
    from dc_broker.devidp import grants

    return grants.access_token_claims(idp._state, token) is None


async def test_login_on_client_credentials_is_not_a_device_flow(make_idp, autojump_clock) -> None:
    session = make_session(make_idp(), "service")
    with pytest.raises(CredentialsRejected, match="nothing to log in"):
        async for _ in session.device_login():
            pass
    assert session.idp_requests == 0


async def test_a_corrupt_password_record_keeps_a_valid_token(make_idp, autojump_clock) -> None:
    idp = make_idp(access_lifespan=T)
    session = make_session(idp)

    async with running(session.run):
        working = await session.get()

        def corrupt(profile: str) -> Credentials:
            raise RecordCorrupt("profile 'demo': its vault record fails authentication")

        session.store.credentials = corrupt  # type: ignore[method-assign]
        await trio.sleep(0.8 * T)  # the refresh fails on the record
        assert session.state is State.LOGIN_REQUIRED
        assert await session.get() is working  # still served until it expires
        await trio.sleep(0.2 * T)
        with pytest.raises(LoginRequired):
            await session.get()


async def test_device_login_asks_for_openid_by_default(make_idp, autojump_clock) -> None:
    idp = make_idp()
    session = make_session(idp, "device")
    sent: list[dict[str, str]] = []
    inner = session.idp.send

    async def spy(req: oidc.HttpRequest, **route: str | None) -> oidc.HttpResponse:
        sent.append(dict(req.form))
        return await inner(req, **route)

    session.idp.send = spy  # type: ignore[method-assign]
    flow = session.device_login()
    code = await flow.__anext__()
    assert code["user_code"] and sent[0]["scope"] == "openid"
    await flow.aclose()


# -- 1i: state shown is the state ------------------------------------------------------------------------


class LockedStore(MemoryStore):
    def saved_tokens(self, profile: str) -> TokenSet | None:
        raise Locked("the vault is locked; run `dc-broker unlock`")


async def test_a_locked_vault_shows_locked_for_every_profile(make_idp) -> None:
    store = LockedStore()
    sessions = [Session(profile(n), store, IdpTransport()) for n in ("demo", "service")]
    assert [s.status(0.0)["state"] for s in sessions] == ["locked", "locked"]


async def test_a_restored_token_that_has_expired_is_not_fresh(make_idp, autojump_clock) -> None:
    session = make_session(make_idp())
    now = trio.current_time()
    session.token = TokenSet(Secret("A"), now, now + 10)
    session.state = State.FRESH
    assert session.effective_state(now + 11) is State.EMPTY


async def test_settled_returns_when_the_attempt_ends(make_idp, autojump_clock) -> None:
    idp = make_idp()
    idp.faults.latency = 3.0
    session = make_session(idp)

    async with running(session.run), trio.open_nursery() as inner:
        inner.start_soon(session.get)
        await trio.sleep(1)
        assert session.attempt is not None and session.state is State.EMPTY and session.status(1.0)["refreshing"]
        await session.settled()
        assert session.attempt is None and session.state is State.FRESH
        assert trio.current_time() == pytest.approx(3.0, abs=0.01)


# -- the state table -------------------------------------------------------------------------------------


def test_an_impossible_pair_names_both() -> None:
    """An attempt's outcome lands only in the states attempts run in: anywhere else it is a bug."""
    with pytest.raises(LifecycleError, match=r"'granted'.*'login_required'"):
        next_state(State.LOGIN_REQUIRED, Event.GRANTED)


def test_every_state_can_be_locked_adopted_restored_and_left_by_logout() -> None:
    for state in State:
        assert next_state(state, Event.LOCK) is State.LOCKED
        assert next_state(state, Event.ADOPTED) is State.FRESH
        assert next_state(state, Event.RESTORED) is State.FRESH
        assert next_state(state, Event.LOGOUT) is State.LOGIN_REQUIRED
        assert next_state(state, Event.CRASHED) is (State.LOCKED if state is State.LOCKED else State.ERROR)


def test_every_outcome_lands_in_every_state_an_attempt_runs_in() -> None:
    from dc_broker.sessions.states import ACTIVE, OUTCOMES

    assert State.ERROR in ACTIVE and State.LOCKED not in ACTIVE
    for state in ACTIVE:
        for event, to in OUTCOMES.items():
            assert next_state(state, event) is to


async def test_the_systemd_status_line_counts_unavailable_profiles_and_a_failed_reload() -> None:
    from dc_broker.daemon import status_line
    from dc_broker.sessions.registry import Sessions

    sessions = Sessions({n: profile(n) for n in ("demo", "service", "device")}, MemoryStore(), IdpTransport())
    sessions.lookup("demo").state = State.UNAVAILABLE
    sessions.lookup("device").state = State.LOGIN_REQUIRED
    line = status_line(sessions, MemoryStore(), "config.toml: line 3: bad value")
    assert line.startswith("3 profile(s), 0 fresh, 1 unavailable")
    assert "1 need a login" in line and line.endswith("; last reload failed: config.toml: line 3: bad value")
    assert "last reload failed" not in status_line(sessions, MemoryStore())


async def test_sessions_settled_waits_for_every_attempt(make_idp, autojump_clock) -> None:
    from dc_broker.sessions.registry import Sessions

    idp = make_idp()
    idp.faults.latency = 2.0
    store = MemoryStore(dict(CREDENTIALS))
    sessions = Sessions({n: profile(n) for n in ("demo", "service")}, store, idp_transport(idp))
    async with running(sessions.run) as nursery:
        nursery.start_soon(sessions.lookup("demo").get)
        nursery.start_soon(sessions.lookup("service").get)
        await trio.sleep(0.5)
        await sessions.settled()
        assert all(sessions.lookup(n).state is State.FRESH for n in ("demo", "service"))
