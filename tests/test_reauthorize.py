"""A decision about who may do what holds only until the next wait: every op that waits (a watch
between tokens, a token request behind a slow refresh, a person's login at the IdP) decides again
after the wait, before it hands anything out or stores anything, and for the same session it
decided for (a profile removed and added again is another).

- ``watch``: a reload that takes the caller's uid out of ``allow`` ends an open watch with
  ``forbidden`` when it wakes, and never hands it a token after; a profile removed ends it with
  ``unknown_profile``; a per-request scope evicted (its slot taken by newer scopes) with
  ``overloaded`` (ask again), instead of a watch that hangs silently.
- ``token`` and ``id_token`` that wait for a refresh, and a per-request scope that waits for the
  profile's login, decide again once they have their token.
- ``login`` (device or password): a login whose caller lost its ``admin`` rule while the person was
  at the IdP is not adopted (``Session.*_login(still=...)``, called right before anything is stored).
- A rule that pins a program by hash (``exe-sha256``) added while a connection waits: the program's
  hash is not read then; without it the rule matches nothing (the client reconnects, and its program
  is hashed before the first decision).

In-process dev IdP on trio's autojump clock; a caller of uid 4242 (not the broker's, not root)."""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing

from dc_broker.access.caller import Caller
from dc_broker.access.identity import boottime
from dc_broker.devserver import DevIdP
from dc_broker.serve.ops import HANDLERS, BrokerState
from dc_broker.sessions import registry as registry_module
from dc_broker.sessions.registry import Sessions
from dc_broker.store import MemoryStore
from dc_token.errors import Forbidden, Overloaded, UnknownProfile
from tests.conftest import CREDENTIALS, idp_transport, outcome_of, profile, running, trio_wall_clock

UID = 4242
SHA = "ab" * 32


def consumer() -> Caller:
    return Caller(UID, UID, os.getpid(), accepted_at=boottime())


def broker(
    idp: DevIdP, name: str = "demo", *, system: bool = True, store: MemoryStore | None = None, **overrides: Any
) -> BrokerState:
    """A broker with one profile ``name`` (by default open to uid 4242 only: ``allow``)."""
    overrides.setdefault("allow", (f"uid:{UID}",))
    store = store if store is not None else MemoryStore({name: CREDENTIALS[name]})
    sessions = Sessions(
        {name: profile(name, **overrides)},
        store,
        idp_transport(idp),
        rng=random.Random(3),
        wall_clock=trio_wall_clock,
    )
    return BrokerState(sessions=sessions, socket_path="unused", system=system)


def reload(state: BrokerState, name: str = "demo", **overrides: Any) -> None:
    """What `reload` does with a config whose profile ``name`` has these settings."""
    state.sessions.reload({name: profile(name, **overrides)})


async def answered(pending: Any) -> dict[str, Any]:
    return pending if isinstance(pending, dict) else await pending


async def until_at_the_idp(state: BrokerState, name: str = "demo") -> None:
    """Return once the profile's refresh is at the (slow) IdP."""
    session = state.sessions.lookup(name)
    while not session.busy:
        await trio.sleep(0.01)


# ---------------------------------------------------------------- watch


async def test_an_open_watch_ends_forbidden_once_its_caller_is_no_longer_allowed(make_idp, autojump_clock) -> None:
    """The issue's case: a watch from uid 4242 has its first token; a reload takes uid 4242 out of
    ``allow``. The stream ends with ``forbidden`` at once, not with the next token the profile gets."""
    idp = make_idp(access_lifespan=60)
    state = broker(idp)
    async with running(state.sessions.run):
        stream = HANDLERS["watch"](state, consumer(), {"profile": "demo"}, 0.0)
        assert isinstance(stream, AsyncIterator)
        first = await stream.__anext__()
        assert first["token"]
        reload(state, allow=("uid:1",))
        with trio.fail_after(600), pytest.raises(Forbidden, match="not available to uid 4242"):
            await stream.__anext__()


async def test_a_watch_whose_token_arrives_after_the_revocation_is_not_handed_it(make_idp, autojump_clock) -> None:
    """The watch waits for its first token (a slow IdP); the revocation lands meanwhile: the token
    that arrives afterwards is not sent."""
    idp = make_idp(access_lifespan=60)
    state = broker(idp)
    async with running(state.sessions.run) as nursery:
        idp.faults.latency = 3.0
        stream = HANDLERS["watch"](state, consumer(), {"profile": "demo"}, 0.0)
        assert isinstance(stream, AsyncIterator)
        outcome = outcome_of(nursery, stream.__anext__)
        await until_at_the_idp(state)
        reload(state, allow=("uid:1",))
        with trio.fail_after(30):
            while not outcome:
                await trio.sleep(0.1)
        assert state.sessions.lookup("demo").token is not None  # the token came, and was kept
        (err,) = outcome
        assert isinstance(err, Forbidden), err


@pytest.mark.parametrize("how", ["removed", "replaced"])
async def test_a_watch_of_a_profile_removed_ends_unknown_profile(make_idp, autojump_clock, how: str) -> None:
    """A reload without the profile retires its session: the watch is woken and ends with
    ``unknown_profile`` (it used to wait for a token that never came). A profile of the same name
    added again is a new profile: the watch does not go on with it."""
    idp = make_idp(access_lifespan=60)
    state = broker(idp)
    async with running(state.sessions.run):
        old = state.sessions.lookup("demo")
        await old.get()  # a token there: the watch's first is served at once, and the watch waits for news
        stream = HANDLERS["watch"](state, consumer(), {"profile": "demo"}, 0.0)
        assert isinstance(stream, AsyncIterator)
        await stream.__anext__()
        generation = old.generation
        state.sessions.reload({})
        if how == "replaced":
            reload(state, allow=(f"uid:{UID}",))
            assert state.sessions.lookup("demo") is not old
        with trio.fail_after(600), pytest.raises(UnknownProfile, match="'demo' was removed"):
            await stream.__anext__()
        assert old.generation > generation  # retired: an attempt of before is dropped, not applied


async def test_a_watch_of_an_evicted_per_request_scope_ends_overloaded(make_idp, autojump_clock) -> None:
    """A per-request scope's watch; newer scopes take its slot (a profile serves at most 16): the
    watch ends with ``overloaded`` saying so (ask again: a new watch gets a new slot)."""
    idp = make_idp(access_lifespan=60)
    state = broker(idp)
    async with running(state.sessions.run):
        demo = state.sessions.lookup("demo")
        await demo.get()
        await state.sessions.lookup_scoped(demo, "email profile", owner=UID).get()  # the watch waits for news
        stream = HANDLERS["watch"](state, consumer(), {"profile": "demo", "scope": "email profile"}, 0.0)
        assert isinstance(stream, AsyncIterator)
        first = await stream.__anext__()
        assert set(first["scope"].split()) == {"email", "profile"}
        for i in range(registry_module.MAX_SCOPES_PER_PROFILE):
            state.sessions.lookup_scoped(demo, f"profile x{i}")
        with trio.fail_after(600), pytest.raises(Overloaded, match="scope 'email profile'") as caught:
            await stream.__anext__()
        assert caught.value.retry_after is not None


@pytest.mark.parametrize("hashed", ["never", "known", "cached"])
async def test_a_program_rule_added_while_a_watch_is_open_needs_the_programs_hash(
    make_idp, autojump_clock, hashed: str
) -> None:
    """A reload pins the profile to a program by hash (``exe-sha256``) for the watch's uid. A
    connection whose program's hash is known keeps its watch, and so does one whose program another
    connection had hashed (from the cache, no read); one whose hash was never read (no rule needed
    it when it connected) is not read now: without it the rule matches nothing, and it is refused."""
    idp = make_idp(access_lifespan=60)
    caller, digest = consumer(), SHA
    if hashed == "cached":  # this process, its program hashed for another connection of it
        caller = Caller(os.getuid(), os.getgid(), os.getpid(), accepted_at=boottime())
        other = Caller(os.getuid(), os.getgid(), os.getpid(), accepted_at=boottime())
    state = broker(idp, allow=(f"uid:{caller.uid}",))
    if hashed == "known":
        caller.attest(SHA)
    elif hashed == "cached":
        await state.programs.attest(other)
        hashed_as = other.identity().exe_sha256
        assert hashed_as is not None and not caller.attested
        digest = hashed_as
    async with running(state.sessions.run):
        stream = HANDLERS["watch"](state, caller, {"profile": "demo"}, 0.0)
        assert isinstance(stream, AsyncIterator)
        first = await stream.__anext__()
        reload(state, allow=(f"uid:{caller.uid} & exe-sha256:{digest}",))
        assert state.sessions.pins_programs
        with trio.fail_after(600):
            if hashed == "never":
                with pytest.raises(Forbidden):
                    await stream.__anext__()
            else:
                later = await stream.__anext__()  # its next token
                assert later["token"] != first["token"]


# ---------------------------------------------------------------- one request behind a wait


@pytest.mark.parametrize("op", ["token", "id_token", "scoped token"])
async def test_a_request_waiting_for_a_refresh_decides_again_before_it_answers(
    make_idp, autojump_clock, op: str
) -> None:
    """A token request that finds no token waits (a refresh at a 3 s IdP; for a per-request scope,
    the profile's login first); the reload taking uid 4242 out of ``allow`` lands meanwhile: the
    answer is ``forbidden``, not the token that arrived."""
    idp = make_idp(access_lifespan=60)
    scoped = op == "scoped token"
    state = broker(idp, **({} if scoped else {"scope": "openid"}))
    args: dict[str, Any] = {"profile": "demo", **({"scope": "email profile"} if scoped else {})}
    async with running(state.sessions.run) as nursery:
        demo = state.sessions.lookup("demo")
        idp.faults.latency = 3.0
        if not scoped:  # a token there, then taken for expired: a refresh now
            await demo.get()
            tok = demo.token
            assert tok is not None and demo.invalidate(tok.access_token.reveal())
        pending = HANDLERS[op.split()[-1]](state, consumer(), args, trio.current_time())
        assert not isinstance(pending, dict)
        outcome = outcome_of(nursery, lambda: answered(pending))
        await until_at_the_idp(state)
        reload(state, allow=("uid:1",), **({} if scoped else {"scope": "openid"}))
        with trio.fail_after(30):
            while not outcome:
                await trio.sleep(0.1)
        (err,) = outcome
        assert isinstance(err, Forbidden), err
        assert demo.token is not None and demo.token.expires_at > trio.current_time()  # it was refreshed
        assert not demo.children  # no scope was made for a caller no longer allowed


async def test_a_request_waiting_for_a_refresh_is_answered_when_nothing_changed(make_idp, autojump_clock) -> None:
    """The other side: a reload that changes something else (here who may administer it) leaves the
    caller's answer as it was."""
    idp = make_idp(access_lifespan=60)
    state = broker(idp)
    async with running(state.sessions.run):
        demo = state.sessions.lookup("demo")
        await demo.get()
        idp.faults.latency = 3.0
        tok = demo.token
        assert tok is not None and demo.invalidate(tok.access_token.reveal())
        pending = HANDLERS["token"](state, consumer(), {"profile": "demo"}, trio.current_time())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: reload_later(state))
            result = await answered(pending)
        assert result["token"] != tok.access_token.reveal()


@pytest.mark.parametrize("op", ["token", "id_token", "watch"])
async def test_a_request_waiting_for_a_refresh_of_a_profile_removed_ends_at_once(
    make_idp, autojump_clock, op: str
) -> None:
    """The profile leaves the broker (`dc-broker remove`) while a request waits for its refresh at a
    slow IdP: the request is told so at once, unknown_profile, not after the session's 30 s wait
    for a round that will never come."""
    idp = make_idp(access_lifespan=60)
    state = broker(idp, scope="openid")
    async with running(state.sessions.run) as nursery:
        demo = state.sessions.lookup("demo")
        await demo.get()
        tok = demo.token
        assert tok is not None
        idp.faults.latency = 10.0
        assert demo.invalidate(tok.access_token.reveal())
        pending = HANDLERS[op](state, consumer(), {"profile": "demo"}, trio.current_time())
        outcome: list[Any] = []

        async def ask() -> None:
            try:
                if op == "watch":
                    async for result in pending:
                        outcome.append(result)
                else:
                    outcome.append(await answered(pending))
            except Exception as exc:
                outcome.append(exc)

        nursery.start_soon(ask)
        await until_at_the_idp(state)
        removed_at = trio.current_time()
        state.sessions.reload({})
        with trio.fail_after(60):
            while not outcome:
                await trio.sleep(0.01)
        (err,) = outcome
        assert isinstance(err, UnknownProfile), err
        assert "was removed" in err.message
        assert trio.current_time() - removed_at < 1.0


async def reload_later(state: BrokerState) -> None:
    await trio.sleep(1.0)
    reload(state, allow=(f"uid:{UID}",), admin=("uid:7",))


# ---------------------------------------------------------------- a person's login


@pytest.mark.parametrize("how", ["device", "password"])
async def test_a_login_whose_caller_lost_its_admin_rule_meanwhile_is_not_adopted(
    make_idp, autojump_clock, how: str
) -> None:
    """uid 4242 may change the profile's login (``admin``) when it starts one; a reload takes that
    away while the person is at the IdP (the device code shown, or the password being checked). The
    login ends ``forbidden``: the profile keeps the login and the password it had."""
    idp = make_idp(access_lifespan=600)
    name = "device" if how == "device" else "demo"
    store = MemoryStore({name: CREDENTIALS[name]})
    state = broker(idp, name, system=False, store=store, allow=(), admin=(f"uid:{UID}",))
    async with running(state.sessions.run) as nursery:
        session = state.sessions.lookup(name)
        if how == "device":  # the profile's current login, made by its owner
            owners = session.device_login()
            shown = await owners.__anext__()
            idp.approve_device(shown["user_code"], "demo")
            async for _ in owners:
                pass
        else:
            await session.get()
        before, saved, creds = session.token, store.saved_tokens(name), store.credentials(name)
        assert before is not None and saved is not None
        args: dict[str, Any] = {"profile": name, **({"password": "demo"} if how == "password" else {})}
        stream = HANDLERS["login"](state, consumer(), args, 0.0)
        assert isinstance(stream, AsyncIterator)
        outcome: list[Any] = []

        async def log_in() -> None:
            try:
                async for item in stream:
                    outcome.append(item)
            except Exception as exc:
                outcome.append(exc)

        if how == "device":
            shown = await stream.__anext__()
            reload(state, name, allow=(), admin=())
            idp.approve_device(shown["user_code"], "demo")
        else:
            idp.faults.latency = 3.0
        nursery.start_soon(log_in)
        if how == "password":
            await trio.testing.wait_all_tasks_blocked()
            assert session.busy  # the password is at the IdP
            reload(state, name, allow=(), admin=())
        with trio.fail_after(60):
            while not outcome or isinstance(outcome[-1], dict):
                await trio.sleep(0.5)
        assert isinstance(outcome[-1], Forbidden), outcome
        assert session.token is before and store.saved_tokens(name) == saved
        assert store.credentials(name) == creds


async def test_a_login_whose_caller_keeps_its_admin_rule_is_adopted(make_idp, autojump_clock) -> None:
    """The other side: a reload that changes something else while the device code is shown."""
    idp = make_idp(access_lifespan=600)
    state = broker(idp, "device", system=False, allow=(), admin=(f"uid:{UID}",))
    async with running(state.sessions.run):
        stream = HANDLERS["login"](state, consumer(), {"profile": "device"}, 0.0)
        assert isinstance(stream, AsyncIterator)
        shown = await stream.__anext__()
        reload(state, "device", allow=("uid:7",), admin=(f"uid:{UID}",))
        idp.approve_device(shown["user_code"], "demo")
        with trio.fail_after(60):
            last = [item async for item in stream][-1]
        assert last["logged_in"] is True
        assert state.sessions.lookup("device").token is not None


async def test_a_logout_whose_caller_lost_its_admin_rule_while_it_waited_changes_nothing(
    make_idp, autojump_clock
) -> None:
    """A profile admin's logout waits for the login (a refresh at a slow IdP holds it); a reload takes
    the caller out of ``admin`` meanwhile: once the logout holds the login it is ``forbidden``, and
    the login stays."""
    idp = make_idp(access_lifespan=60)
    state = broker(idp, admin=(f"uid:{UID}",))
    async with running(state.sessions.run) as nursery:
        demo = state.sessions.lookup("demo")
        tok = await demo.get()
        idp.faults.latency = 3.0
        assert demo.invalidate(tok.access_token.reveal())
        await until_at_the_idp(state)
        pending = HANDLERS["logout"](state, consumer(), {"profile": "demo"}, trio.current_time())
        outcome = outcome_of(nursery, lambda: answered(pending))
        await trio.sleep(0.5)
        reload(state, allow=(f"uid:{UID}",), admin=())
        with trio.fail_after(30):
            while not outcome:
                await trio.sleep(0.1)
        (err,) = outcome
        assert isinstance(err, Forbidden), err
        assert demo.token is not None and state.sessions.store.saved_tokens("demo") is not None
