"""A person's login, a logout and a refresh that rotates, each meeting a reload, a logout or a new
credential while it waits at a slow IdP (or on the vault): what began for one login is never
stored as another's, and a logout forgets only what it found. In-process dev IdP, trio's autojump
clock: a 3 s IdP is a 3 s IdP, in milliseconds."""

from __future__ import annotations

import random
from typing import Any

import trio

from dc_broker.devserver import DevIdP
from dc_broker.secret import Secret
from dc_broker.sessions.registry import Sessions
from dc_broker.sessions.session import Session
from dc_broker.store import MemoryStore
from dc_broker.tokens import Credentials, TokenSet
from dc_token.errors import LoginRequired
from tests.conftest import CREDENTIALS, LockableStore, idp_transport, profile, running, trio_wall_clock


def registry(idp: DevIdP, store: MemoryStore, *names: str, **overrides: Any) -> Sessions:
    profiles = {n: profile(n, **overrides) for n in names}
    return Sessions(profiles, store, idp_transport(idp), rng=random.Random(3), wall_clock=trio_wall_clock)


async def until(condition: Any) -> None:
    while not condition():
        await trio.sleep(0.01)


async def test_a_rotated_refresh_token_landing_after_a_new_user_is_stored_as_the_old_login(
    make_idp, autojump_clock
) -> None:
    """A refresh at a rotating IdP is out when a reload makes the profile another user's. Its rotated
    refresh token is kept (the IdP killed the one presented), but as the old user's login: a lock and
    unlock (or a restart) must not restore it as the new user's, who has not logged in."""
    idp = make_idp(access_lifespan=60, rotate_refresh_tokens=True)
    store = LockableStore({"demo": CREDENTIALS["demo"]})
    sessions = registry(idp, store, "demo")
    async with running(sessions.run):
        demo = sessions.lookup("demo")
        old = await demo.get()
        old_fingerprint = demo.profile.login_fingerprint()
        idp.faults.latency = 3.0
        assert demo.invalidate(old.access_token.reveal())
        await until(lambda: demo.attempt is not None and demo.idp_requests > 1)
        sessions.reload({"demo": profile("demo", username="nobody")})
        idp.faults.latency = 0.0
        await trio.sleep(10)
        saved = store.saved_tokens("demo")
        assert saved is not None and saved.refresh_token != old.refresh_token  # the rotated one was kept
        assert saved.issued_for == old_fingerprint != demo.profile.login_fingerprint()
        await sessions.lock()
        store.unlock()
        sessions.unlocked()
        await trio.sleep(1)
        assert demo.token is None or demo.token.refresh_token != saved.refresh_token


async def test_a_device_login_approved_after_a_logout_is_not_adopted(make_idp, autojump_clock) -> None:
    """`dc-broker logout` (or `remove`, a logout that forgets) while a person still has the device code
    open: the login they finish afterwards began before the logout, and is not stored."""
    idp = make_idp(access_lifespan=60)
    store = MemoryStore({"device": Credentials()})
    sessions = registry(idp, store, "device")
    async with running(sessions.run):
        device = sessions.lookup("device")
        flow = device.device_login()
        shown = await flow.__anext__()
        await device.logout()
        idp.approve_device(shown["user_code"], "demo")
        try:
            async for _ in flow:
                pass
            raise AssertionError("a login that began before the logout was adopted")
        except LoginRequired as exc:
            assert "logged out during the login" in exc.message and "dc-broker login device" in exc.message
        assert device.token is None and store.saved_tokens("device") is None


async def test_a_logout_behind_a_password_login_at_a_slow_idp_logs_out_what_it_finds(make_idp, autojump_clock) -> None:
    """The password login holds the login from the IdP to its adoption; a logout that arrives meanwhile
    comes after it, and logs out that login: nothing of it is left."""
    idp = make_idp(access_lifespan=60)
    store = MemoryStore({"demo": Credentials(client_secret=Secret("dc-cli-secret"))})
    sessions = registry(idp, store, "demo")
    async with running(sessions.run) as nursery:
        demo = sessions.lookup("demo")
        idp.faults.latency = 3.0
        logins: list[TokenSet] = []

        async def login() -> None:
            logins.append(await demo.password_login(Secret("demo")))

        nursery.start_soon(login)
        await until(lambda: demo.busy)
        await trio.sleep(0.5)
        await demo.logout()
        assert len(logins) == 1  # the login ended first
        assert demo.token is None and store.saved_tokens("demo") is None
        assert store.credentials("demo").password is None


async def test_a_password_stored_while_a_logout_is_at_the_idp_is_kept(make_idp, autojump_clock) -> None:
    """`dc-broker rotate --password` lands while a logout ends the login at a slow IdP: the logout
    forgets the password it found, not the one stored after it began, and the profile logs in with
    that one."""
    idp = make_idp(access_lifespan=60)
    store = MemoryStore({"demo": CREDENTIALS["demo"]})
    sessions = registry(idp, store, "demo")
    async with running(sessions.run) as nursery:
        demo = sessions.lookup("demo")
        await demo.get()
        idp.faults.latency, idp.faults.all_endpoints = 3.0, True  # the end-session request is slow too
        nursery.start_soon(demo.logout)
        await until(lambda: demo.busy)
        await trio.sleep(0.5)
        idp.realm("demo").user("demo").password = "rotated"
        store.set_credentials("demo", Credentials(password=Secret("rotated"), client_secret=Secret("dc-cli-secret")))
        demo.credentials_changed()  # what set_secrets does after it stored
        idp.faults.latency = 0.0
        await trio.sleep(10)
        assert store.credentials("demo").password == Secret("rotated")
        assert demo.token is not None  # logged in again with the new password


class StallingStore(MemoryStore):
    """A memory store whose saving of tokens waits for ``release`` (a slow disk)."""

    def __init__(self, credentials: dict[str, Credentials]) -> None:
        super().__init__(credentials)
        self.stall = False
        self.saving = trio.Event()
        self.release = trio.Event()

    async def save_tokens(self, profile: str, tokens: TokenSet) -> None:
        if self.stall:
            self.saving.set()
            await self.release.wait()
        await super().save_tokens(profile, tokens)


async def test_a_login_dropped_while_it_was_being_stored_is_not_told_as_logged_in(make_idp, autojump_clock) -> None:
    """The vault's disk stalls while a person's new login is stored, and a reload makes the profile
    another user's: the login was stored as the old settings' and is not current; the person hears
    it was not kept, not "logged in"."""
    idp = make_idp(access_lifespan=60)
    store = StallingStore({"demo": Credentials(client_secret=Secret("dc-cli-secret"))})
    sessions = registry(idp, store, "demo")
    async with running(sessions.run) as nursery:
        demo: Session = sessions.lookup("demo")
        outcome: list[BaseException | TokenSet] = []

        async def login() -> None:
            try:
                outcome.append(await demo.password_login(Secret("demo")))
            except LoginRequired as exc:
                outcome.append(exc)

        store.stall = True
        nursery.start_soon(login)
        await store.saving.wait()
        sessions.reload({"demo": profile("demo", username="nobody")})
        store.release.set()
        await trio.sleep(1)
        (err,) = outcome
        assert isinstance(err, LoginRequired), err
        assert "changed while its new login was being stored" in err.message
        assert demo.token is None or demo.token.scope is None or demo.profile.username == "nobody"
