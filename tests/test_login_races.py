"""A person's login, a logout and a refresh that rotates, each meeting a reload, a logout or a new
credential while it waits at a slow IdP (or on the vault): what began for one login is never
stored as another's, and a logout forgets only what it found. In-process dev IdP, trio's autojump
clock: a 3 s IdP is a 3 s IdP, in milliseconds."""

from __future__ import annotations

from typing import Any

import trio

from dc_broker.secret import Secret
from dc_broker.sessions.registry import Sessions
from dc_broker.sessions.session import Session
from dc_broker.sessions.states import State
from dc_broker.store import MemoryStore
from dc_broker.tokens import Credentials, TokenSet
from dc_token.errors import LoginRequired
from tests.conftest import (
    CREDENTIALS,
    LockableStore,
    outcome_of,
    password_login_at_a_slow_idp,
    profile,
    registry,
    running,
)


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
    sessions = registry(idp, "demo", store=store)
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
    sessions = registry(idp, "device", store=store)
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
    sessions = registry(idp, "demo", store=store)
    async with running(sessions.run) as nursery:
        demo = sessions.lookup("demo")
        logins = await password_login_at_a_slow_idp(idp, demo, nursery)
        await trio.sleep(0.5)
        await demo.logout()
        assert len(logins) == 1 and isinstance(logins[0], TokenSet), logins  # the login ended first
        assert demo.token is None and store.saved_tokens("demo") is None
        assert store.credentials("demo").password is None


async def test_a_password_stored_while_a_logout_is_at_the_idp_is_kept(make_idp, autojump_clock) -> None:
    """`dc-broker rotate --password` lands while a logout ends the login at a slow IdP: the logout
    forgets the password it found, not the one stored after it began, and the profile logs in with
    that one."""
    idp = make_idp(access_lifespan=60)
    store = MemoryStore({"demo": CREDENTIALS["demo"]})
    sessions = registry(idp, "demo", store=store)
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
    sessions = registry(idp, "demo", store=store)
    async with running(sessions.run) as nursery:
        demo: Session = sessions.lookup("demo")
        store.stall = True
        outcome = outcome_of(nursery, lambda: demo.password_login(Secret("demo")))
        await store.saving.wait()
        sessions.reload({"demo": profile("demo", username="nobody")})
        store.release.set()
        await trio.sleep(1)
        (err,) = outcome
        assert isinstance(err, LoginRequired), err
        assert "changed while its new login was being stored" in err.message
        assert demo.token is None or demo.token.scope is None or demo.profile.username == "nobody"


# ---------------------------------------------------------------- a new user or client: the old one's secrets go


def sent_grants(sessions: Sessions) -> list[dict[str, str]]:
    """Every form the sessions send to the IdP from now on (a spy on the shared transport)."""
    sent: list[dict[str, str]] = []
    send = sessions.idp.send

    async def spy(req: Any, **kwargs: Any) -> Any:
        sent.append({**req.form, "authorization": req.headers.get("Authorization", "")})
        return await send(req, **kwargs)

    sessions.idp.send = spy  # type: ignore[method-assign]
    return sent


def password_grants(sent: list[dict[str, str]]) -> list[tuple[str, str]]:
    return [(f["username"], f["password"]) for f in sent if f.get("grant_type") == "password"]


def assert_demos_password_dropped(store: MemoryStore, sent: list[dict[str, str]]) -> None:
    """The profile became viewer's: demo's password was never sent as viewer's and is gone from the
    store; the client secret (the same client's) stays."""
    assert ("viewer", "demo") not in password_grants(sent)
    assert store.credentials("demo").password is None
    assert store.credentials("demo").client_secret == Secret("dc-cli-secret")


async def test_a_new_username_drops_the_old_users_password_before_any_grant(make_idp, autojump_clock, caplog) -> None:
    """`dc-broker set demo username=viewer` and a reload: the stored password is demo's, and is never
    sent as viewer's; it is dropped from the store (the client secret stays: same client), the
    profile says what to do, and with viewer's password stored it logs in."""
    caplog.set_level("INFO", logger="dc_broker.audit")
    idp = make_idp(access_lifespan=60)
    store = MemoryStore({"demo": CREDENTIALS["demo"]})
    sessions = registry(idp, "demo", store=store)
    async with running(sessions.run):
        demo = sessions.lookup("demo")
        await demo.get()
        sent = sent_grants(sessions)
        sessions.reload({"demo": profile("demo", username="viewer")})
        await trio.sleep(5)
        assert_demos_password_dropped(store, sent)
        assert demo.state is State.LOGIN_REQUIRED and demo.token is None
        assert demo.last_error is not None
        assert "dc-broker rotate demo --password" in demo.last_error.message
        assert "dc-broker login demo" in demo.last_error.message
        audit = [getattr(r, "fields", {}) for r in caplog.records if r.name == "dc_broker.audit"]
        dropped = [f for f in audit if f.get("event") == "secrets_dropped"]
        assert [(f["dropped"], f["changed"]) for f in dropped] == [(["password"], ["username"])]
        said = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
        assert len(said) == 2 and all("password" in m and "Secret" not in m for m in said)
        store.set_credentials("demo", Credentials(password=Secret("viewer"), client_secret=Secret("dc-cli-secret")))
        demo.credentials_changed()
        await trio.sleep(5)
        assert demo.token is not None and demo.state is State.FRESH
        assert password_grants(sent) == [("viewer", "viewer")]


async def test_a_new_client_id_drops_the_old_clients_secret_and_keys(make_idp, autojump_clock) -> None:
    """A client credentials profile moved to another client: the old client's secret (and keys) are
    never sent as the new client's, and are dropped."""
    idp = make_idp(access_lifespan=60)
    store = MemoryStore({"service": Credentials(client_secret=Secret("dc-service-secret"), client_keys=Secret("{}"))})
    sessions = registry(idp, "service", store=store)
    async with running(sessions.run):
        service = sessions.lookup("service")
        await service.get()
        sent = sent_grants(sessions)
        sessions.reload({"service": profile("service", client_id="dc-cli")})
        await trio.sleep(5)
        assert not [f for f in sent if f["authorization"] or "client_secret" in f or "client_assertion" in f]
        creds = store.credentials("service")
        assert creds.client_secret is None and creds.client_keys is None
        assert service.state is State.LOGIN_REQUIRED
        assert (
            service.last_error is not None and "dc-broker rotate service --client-secret" in service.last_error.message
        )


async def test_a_scope_change_keeps_the_password(make_idp, autojump_clock) -> None:
    """Another scope (or server, proxy...) is still the same user of the same client: nothing is dropped,
    and the new login is got with the stored password at once."""
    idp = make_idp(access_lifespan=60)
    store = MemoryStore({"demo": CREDENTIALS["demo"]})
    sessions = registry(idp, "demo", store=store)
    async with running(sessions.run):
        demo = sessions.lookup("demo")
        await demo.get()
        sessions.reload({"demo": profile("demo", scope="openid")})
        await trio.sleep(5)
        assert store.credentials("demo") == CREDENTIALS["demo"]
        assert demo.token is not None and demo.token.scope is not None and demo.state is State.FRESH


async def test_a_new_username_while_the_vault_is_locked_drops_the_password_at_unlock(make_idp, autojump_clock) -> None:
    """The reload comes while the vault is locked: the drop waits for the unlock, and happens before
    anything is tried with what the store holds."""
    idp = make_idp(access_lifespan=60)
    store = LockableStore({"demo": CREDENTIALS["demo"]})
    sessions = registry(idp, "demo", store=store)
    async with running(sessions.run):
        demo = sessions.lookup("demo")
        await demo.get()
        await sessions.lock()
        sent = sent_grants(sessions)
        sessions.reload({"demo": profile("demo", username="viewer")})
        await trio.sleep(5)
        store.unlock()
        sessions.unlocked()
        await trio.sleep(5)
        assert_demos_password_dropped(store, sent)
        assert demo.state is State.LOGIN_REQUIRED


class FailingWrites(MemoryStore):
    """A memory store whose writes of credentials fail while ``failing`` (a disk error)."""

    failing = False

    def set_credentials(self, profile: str, creds: Credentials) -> None:
        if self.failing:
            raise OSError(28, "No space left on device")
        super().set_credentials(profile, creds)


async def test_a_password_the_vault_cannot_drop_is_never_sent_as_the_new_users(
    make_idp, autojump_clock, caplog
) -> None:
    """The vault fails while a reload to another user drops the old user's password: the reload goes
    through all the same, the password stays in the store but is never sent (the drop stays pending),
    and once the new user's password is stored, that one is used."""
    idp = make_idp(access_lifespan=60)
    store = FailingWrites({"demo": CREDENTIALS["demo"]})
    sessions = registry(idp, "demo", store=store)
    async with running(sessions.run):
        demo = sessions.lookup("demo")
        await demo.get()
        sent = sent_grants(sessions)
        store.failing = True
        sessions.reload({"demo": profile("demo", username="viewer")})  # no error out of the reload
        await trio.sleep(5)
        assert store.credentials("demo").password == Secret("demo")  # not dropped: the disk failed
        assert ("viewer", "demo") not in password_grants(sent)
        assert any("could not be dropped (OSError)" in r.getMessage() for r in caplog.records)
        store.failing = False
        store.set_credentials("demo", Credentials(password=Secret("viewer"), client_secret=Secret("dc-cli-secret")))
        demo.secrets_stored(frozenset({"password"}))  # what set_secrets does after it stored
        demo.credentials_changed()
        await trio.sleep(5)
        assert demo.token is not None and password_grants(sent) == [("viewer", "viewer")]
