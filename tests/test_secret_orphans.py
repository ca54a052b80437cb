"""A secret is stored only for a profile that is configured when it is written, with the settings it
was sent for: no secret of a profile that is gone (an "orphan" in the vault, which a later `add` of
the same name would find and `remove` would never clean), and no secret sent for one set of settings
kept under another.

Two ways an orphan could be made, each with the broker in-process:

- `dc-broker add` against a running broker writes the profile, asks for ``reload``, then
  ``set_secrets`` (a slow op). When the command gives up on it (``BrokerSlow``, Ctrl-C) the broker
  may still store the secrets, so the command keeps the profile it wrote; only an op the broker
  refused (nothing stored) is undone (``dc_broker.cli.files._add_to_running``).
- A ``set_secrets`` that waits (its caller's program hashed, the new credentials or the next key
  checked at the IdP) while the profile is removed or changed refuses afterwards, naming what
  happened, instead of storing (``dc_broker.serve.ops._unchanged``).

Every wait is held open by an event the test releases, never by a sleep: the command gives up after
its (patched, 0.5 s) patience, and the broker's stalled write goes on only once the command is done.

And the way a removed profile's secrets used to stay: `remove` against a running broker asked for a
plain ``logout``, which keeps the client secret and the client's keys. It asks for ``logout`` with
``forget`` now, which removes every record of the profile after the logout, for whoever may change
the profile's login and for no one else; a broker that does not know ``forget`` makes `remove` keep
the profile and say so.

And a secret sent under settings it was not stored for: `add --force` that changes whom the login
is for (``login_fingerprint``) has the broker forget the old login and its secrets first (``logout``
with ``forget``), so the reload never starts a grant with the old user's password for the new user
or the old client's secret with the new client, and the vault holds only the new secrets. These run
the broker in-process against the dev IdP (``idp_broker``) and note every request it sends."""

from __future__ import annotations

import base64
import dataclasses
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import trio
import trio.testing
from click.testing import CliRunner, Result

from dc_broker.access.caller import Caller
from dc_broker.access.identity import boottime
from dc_broker.cli import cli, files, talk
from dc_broker.config import Profile
from dc_broker.config.edit import add_profile, remove_profile, replace_profile
from dc_broker.config.load import load_config
from dc_broker.devserver import DevIdP, demo_realm
from dc_broker.idp import clientkeys
from dc_broker.idp.oidc import HttpRequest
from dc_broker.idp.transport import IdpTransport
from dc_broker.secret import Secret
from dc_broker.serve import ops
from dc_broker.serve.ops import HANDLERS, BrokerState
from dc_broker.serve.server import Server
from dc_broker.sessions.policy import DEFAULT_POLICY
from dc_broker.sessions.registry import Sessions
from dc_broker.store import MemoryStore, SecretStore
from dc_broker.tokens import Credentials, TokenSet
from dc_broker.vault import KeyFile, Vault, create_key_file
from dc_token.errors import (
    BrokerUnavailable,
    DcBrokerError,
    Forbidden,
    InternalError,
    Locked,
    Overloaded,
    UnknownProfile,
    VaultUnusable,
)
from tests.conftest import IDP_URL, idp_transport, listening

TOKEN_URL = "http://127.0.0.1:9/token"  # never asked: every wait here is the test's
KEPT = f'[profiles.kept]\ntoken_url = "{TOKEN_URL}"\nclient_id = "k"\ngrant = "client_credentials"\n'


def stored(store: MemoryStore) -> dict[str, Credentials]:
    """The store's credentials, by profile (a profile whose record holds nothing is not listed)."""
    return {n: c for n, c in store._credentials.items() if c != Credentials()}


def owner() -> Caller:
    return Caller(os.getuid(), os.getgid(), os.getpid())


# ---------------------------------------------------------------- `dc-broker add` that gives up


class StallingStore(MemoryStore):
    """A memory store whose write of ``stalled``'s secrets holds the broker's loop (as a vault on a
    disk that stopped answering does) until ``release`` is set: the broker completes the write
    only after the command has given up on it. (A write of no secret at all, the logout of an
    ``add --force`` for another client, goes through.)"""

    def __init__(self, stalled: str) -> None:
        super().__init__()
        self.stalled = stalled
        self.entered = threading.Event()
        self.release = threading.Event()

    def set_credentials(self, profile: str, credentials: Credentials) -> None:
        if profile == self.stalled and credentials != Credentials():
            self.entered.set()
            if not self.release.wait(30):
                raise VaultUnusable("the test never released the stalled write")
        super().set_credentials(profile, credentials)


@asynccontextmanager
async def broker(tmp_path: Path, cfg: Path, store: SecretStore) -> AsyncIterator[tuple[str, BrokerState]]:
    """A broker serving ``cfg`` on a real socket, in this process (its sessions are not started: no
    IdP is asked anything)."""
    sessions = Sessions(load_config(str(cfg)).profiles, store, IdpTransport())
    path = str(tmp_path / "run" / "b.sock")
    state = BrokerState(sessions=sessions, socket_path=path, config_path=str(cfg))
    async with listening(Server(state), path):
        yield path, state


def add_new(cfg: Path, sock: str, *extra: str, secret: str = "s3cret") -> Result:
    """`dc-broker add new` (client credentials, its secret from stdin) in this process."""
    args = ["add", "new", "--config", str(cfg), "--socket", sock, "--token-url", TOKEN_URL, "--client-id", "n",
            "--grant", "client_credentials", "--secret-stdin", "--no-verify", *extra]  # fmt: skip
    return CliRunner().invoke(cli, args, input=f"{secret}\n")


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command runs in the test's process: no core-dump protection for the whole test run, and
    patience a test can wait for (the broker's answer to a slow op, and to the undo's reload)."""
    import dc_token.protect

    monkeypatch.setattr(dc_token.protect, "no_dumps", lambda **_: None)
    monkeypatch.setattr(talk, "SLOW_ANSWER_TIMEOUT", 0.5)
    monkeypatch.setattr(talk, "ANSWER_TIMEOUT", 2.0)


@pytest.mark.usefixtures("in_process")
@pytest.mark.parametrize("force", [False, True], ids=["add", "add-force"])
async def test_an_add_the_broker_completes_after_the_command_gave_up_leaves_no_orphan(
    tmp_path: Path, force: bool
) -> None:
    """The broker takes `add`'s set_secrets and is slow to store it (its vault's disk stalls); the
    command gives up (``BrokerSlow``); the broker then stores it. The profile must still be there,
    as the add wrote it: a secret in the vault for a profile the config no longer has is the orphan
    the user believes was never stored (and, with --force, the new secret under the old settings)."""
    cfg = tmp_path / "config.toml"
    cfg.write_text(KEPT)
    store = StallingStore("new")
    if force:
        add_profile(str(cfg), Profile(name="new", token_url=TOKEN_URL, client_id="old", grant="client_credentials"))
        store._credentials["new"] = Credentials(client_secret=Secret("old-secret"))
    async with broker(tmp_path, cfg, store) as (sock, state):

        def add() -> Result:
            try:
                return add_new(cfg, sock, *(["--force"] if force else []))
            finally:
                store.release.set()  # the broker completes the write once the command is done with it

        result = await trio.to_thread.run_sync(add)
        assert store.entered.is_set()  # the write had begun: the broker did complete it
        secret = stored(store)["new"].client_secret
        assert secret is not None and secret.reveal() == "s3cret"
        await trio.to_thread.run_sync(lambda: talk.ask(sock, "reload"))  # whatever the broker had yet to read
        try:
            running: Profile | None = state.sessions.lookup("new").profile
        except UnknownProfile:
            running = None
    on_disk = load_config(str(cfg)).profiles
    assert set(stored(store)) <= set(on_disk), "a secret in the store for a profile no longer configured"
    assert result.exit_code == 7, result.output
    assert "the broker took longer than 0.5 s to answer set_secrets for profile 'new'" in result.output
    assert f"profile new stays in {cfg} as this add wrote it" in result.output, result.output
    assert on_disk["new"].client_id == "n" and running == on_disk["new"]  # the settings the secret was sent for


@pytest.mark.usefixtures("in_process")
async def test_an_add_the_broker_refused_is_undone_and_stores_nothing(tmp_path: Path) -> None:
    """The other side: a set_secrets the broker answered with a refusal stored nothing, so the add is
    taken back, byte for byte, and the broker reloads the config without it."""
    cfg = tmp_path / "config.toml"
    cfg.write_text(KEPT)
    store = MemoryStore()

    def locked(profile: str, credentials: Credentials) -> None:
        raise Locked("the vault is locked; run `dc-broker unlock`")

    store.set_credentials = locked  # type: ignore[method-assign]
    async with broker(tmp_path, cfg, store) as (sock, _state):
        result = await trio.to_thread.run_sync(lambda: add_new(cfg, sock))
        names = [s["profile"] for s in (await trio.to_thread.run_sync(lambda: talk.ask(sock, "status")))["profiles"]]
    assert result.exit_code == 6, result.output
    assert cfg.read_text() == KEPT and names == ["kept"] and stored(store) == {}


# ---------------------------------------------------------------- what the command keeps, case by case


class Refused(Exception):
    pass


@pytest.mark.parametrize(
    ("failure", "kept"),
    [
        ("reload refused", False),  # nothing sent but the reload: nothing can be stored
        ("secret refused", False),  # the broker answered no: nothing stored
        ("secret slow", True),  # BrokerSlow: the broker may still store it
        ("secret interrupted", True),  # Ctrl-C while the broker has it
        ("secret internal", True),  # the broker failed inside the op: it may have stored it
        ("secret connection lost", True),  # sent, then no answer: it may have stored it
        ("key refused after the password", True),  # the password is stored already
    ],
)
def test_the_add_keeps_its_profile_whenever_the_broker_may_hold_its_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str, kept: bool
) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(KEPT)
    p = Profile(
        name="new", token_url=TOKEN_URL, client_id="n", grant="password", username="u", auth_method="private_key_jwt"
    )
    asked: list[str] = []
    errors: dict[str, BaseException] = {
        "reload refused": VaultUnusable("no"),
        "secret refused": Locked("the vault is locked; run `dc-broker unlock`"),
        "secret slow": talk.BrokerSlow(
            "the broker took longer than 0.5 s to answer set_secrets; it may still "
            "complete it: check with `dc-broker status`"
        ),
        "secret interrupted": KeyboardInterrupt(),
        "secret internal": InternalError("the request failed inside the broker; see its log"),
        "secret connection lost": BrokerUnavailable("the broker closed the connection"),
        "key refused after the password": Locked("the vault is locked; run `dc-broker unlock`"),
    }

    def ask(socket_path: str | None, op: str, **args: Any) -> dict[str, Any]:
        step = f"{op}:{','.join(sorted(args))}"
        asked.append(step)
        first_reload = op == "reload" and len(asked) == 1
        if (failure == "reload refused" and first_reload) or (
            failure.startswith("secret") and step == "set_secrets:password,profile"
        ):
            raise errors[failure]
        if failure.startswith("key") and step == "set_secrets:new_key,profile":
            raise errors[failure]
        return {"jwks": {"keys": []}, "stored": ["password"]}

    monkeypatch.setattr(files, "ask", ask)
    with pytest.raises((DcBrokerError, KeyboardInterrupt)) as raised:
        files._add_to_running(str(cfg), p, None, None, Secret("pw"), None, "ec")
    assert (load_config(str(cfg)).profiles.get("new") == p) is kept
    assert (cfg.read_text() == KEPT) is not kept
    undo_reloads = asked.count("reload:") - 1
    assert undo_reloads == (0 if kept else 1), asked
    if kept and not isinstance(raised.value, KeyboardInterrupt):
        assert f"profile new stays in {cfg} as this add wrote it" in str(raised.value)
        assert type(raised.value) is type(errors[failure])  # its exit status stays
    if not kept:
        assert raised.value is errors[failure]


# ---------------------------------------------------------------- set_secrets that waits


class Waits:
    """One wait inside set_secrets, held open until ``release``: its caller's program hashed
    (``program``), the new credentials checked at the IdP (``verify``), the next key checked
    (``activate``), the client checked (``check``)."""

    def __init__(self, kind: str, monkeypatch: pytest.MonkeyPatch, state: BrokerState) -> None:
        self.kind = kind
        self.waiting = trio.Event()
        self.release = trio.Event()
        if kind == "program":
            monkeypatch.setattr(BrokerState, "program_pending", lambda self, caller: not caller.attested)
            monkeypatch.setattr(state.programs, "attest", self._attest)
        else:
            monkeypatch.setattr(ops, "_probe", lambda *_: self)

    async def _wait(self) -> None:
        self.waiting.set()
        await self.release.wait()

    async def _attest(self, caller: Caller) -> None:
        await self._wait()
        caller.attested = True

    async def verify(self) -> None:
        await self._wait()

    async def check_client(self, *, next_key: bool = False) -> bool:
        await self._wait()
        return True

    def args(self) -> dict[str, Any]:
        if self.kind == "activate":
            return {"profile": "p", "activate_key": True, "verify": True}
        if self.kind == "check":  # `dc-broker keys p --check`: stores nothing, tries again at once
            return {"profile": "p", "verify": True}
        return {"profile": "p", "password": "new-password", "verify": self.kind == "verify"}


def _profile(**changes: Any) -> Profile:
    base: dict[str, Any] = dict(name="p", token_url=TOKEN_URL, client_id="c", grant="password", username="u")
    return Profile(**{**base, **changes})


async def answered(pending: Any) -> dict[str, Any]:
    """A handler's result: at once, or once its awaitable ends."""
    return pending if isinstance(pending, dict) else await pending


async def _reload(state: BrokerState) -> None:
    await answered(HANDLERS["reload"](state, owner(), {}, 0.0))


@pytest.mark.parametrize("kind", ["program", "verify", "activate", "check"])
@pytest.mark.parametrize("change", ["removed", "changed", "replaced", "access only", "none"])
async def test_set_secrets_stores_only_for_the_profile_still_configured_as_it_was_sent_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, change: str
) -> None:
    """While set_secrets waits, the profile is removed (a `dc-broker remove`, an `add` taking itself
    back), changed (its client), or removed and added again (a new profile of the same name: not
    the one the secret was sent for). After the wait it refuses, saying which, and the store is as
    it was: no orphan, no secret under settings it was not sent for, nothing of a configured profile
    dropped. A change of who may use it changes nothing it was sent for: it is stored."""
    keys = clientkeys.KeySet(clientkeys.generate("ec", now=time.time())).with_next(
        clientkeys.generate("ec", now=time.time())
    )
    extra: dict[str, Any] = {"auth_method": "private_key_jwt", "grant": "client_credentials", "username": None}
    p = _profile(**(extra if kind == "activate" else {}))
    cfg = tmp_path / "config.toml"
    add_profile(str(cfg), p)
    before = Credentials(password=Secret("old-password"), client_keys=keys.to_secret())
    store = MemoryStore({"p": before})
    state = BrokerState(
        sessions=Sessions({"p": p}, store, IdpTransport()), socket_path=str(tmp_path / "s"), config_path=str(cfg)
    )
    waits = Waits(kind, monkeypatch, state)
    outcome: dict[str, Any] = {}

    async def set_secrets() -> None:
        try:
            outcome["result"] = await answered(HANDLERS["set_secrets"](state, owner(), waits.args(), 0.0))
        except DcBrokerError as exc:
            outcome["error"] = exc

    changes: dict[str, Callable[[], None]] = {
        "removed": lambda: remove_profile(str(cfg), "p"),
        "changed": lambda: replace_profile(
            str(cfg), _profile(**{**extra, "client_id": "other"}) if kind == "activate" else _profile(client_id="other")
        ),
        "access only": lambda: replace_profile(str(cfg), dataclasses.replace(p, allow=("user:nobody",))),
        "none": lambda: None,
    }
    async with trio.open_nursery() as nursery:
        nursery.start_soon(set_secrets)
        with trio.fail_after(5):
            await waits.waiting.wait()
        if change == "replaced":
            remove_profile(str(cfg), "p")
            await _reload(state)
            add_profile(str(cfg), p)  # the same settings, a new profile: not the one it was sent for
        else:
            changes[change]()
        await _reload(state)
        waits.release.set()
    if change in ("none", "access only"):
        assert "error" not in outcome, outcome
        assert (stored(store)["p"] == before) is (kind == "check")
        return
    error = outcome.get("error")
    if change == "removed":
        assert isinstance(error, UnknownProfile), outcome
        assert str(error).startswith("profile 'p' was removed while "), error
    else:
        assert isinstance(error, Overloaded), outcome
        assert str(error).startswith("profile 'p' was changed while "), error
    assert "nothing was stored" in str(error)
    if change == "changed":  # another client: the reload dropped the old client's keys (Session.reconfigure)
        before = dataclasses.replace(before, client_keys=None)
    assert stored(store) == {"p": before}  # nothing stored, nothing else dropped


@pytest.mark.parametrize("args", [{"password": "pw"}, {"new_key": "ec"}], ids=["password", "new-key"])
async def test_a_set_secrets_that_waits_for_nothing_has_stored_when_the_op_returns(
    tmp_path: Path, args: dict[str, Any]
) -> None:
    """`add`'s set_secrets (no check at the IdP) is stored before the handler returns: no task
    starts later, when a reload taking the profile away may have come in between."""
    p = _profile(grant="client_credentials", username=None, auth_method="private_key_jwt")
    store = MemoryStore()
    state = BrokerState(sessions=Sessions({"p": p}, store, IdpTransport()), socket_path=str(tmp_path / "s"))
    result = HANDLERS["set_secrets"](state, owner(), {"profile": "p", **args}, 0.0)
    assert isinstance(result, dict), result
    assert set(stored(store)) == {"p"}


# ---------------------------------------------------------------- `remove` forgets every record (logout with forget)


#: what each kind of profile holds that a plain logout keeps: `remove` must forget that too
KINDS = ["client_credentials", "password", "private_key_jwt"]


def _keys() -> Secret:
    return (
        clientkeys.KeySet(clientkeys.generate("ec", now=time.time()))
        .with_next(clientkeys.generate("ec", now=time.time()))
        .to_secret()
    )


def _gone(kind: str, name: str = "gone") -> tuple[Profile, Credentials]:
    """A profile of ``kind`` and its stored credentials: a client secret (client credentials), a
    password and a confidential client's secret (kept by a logout), or the client's keys (kept too)."""
    if kind == "client_credentials":
        return _profile(name=name, grant="client_credentials", username=None), Credentials(client_secret=Secret("cs"))
    if kind == "password":
        return _profile(name=name), Credentials(password=Secret("pw"), client_secret=Secret("cs"))
    p = _profile(name=name, grant="client_credentials", username=None, auth_method="private_key_jwt")
    return p, Credentials(client_keys=_keys())


def _spent(now: float) -> TokenSet:
    """Tokens a store holds for the profile (spent: no session takes them up, so no IdP is asked)."""
    return TokenSet(access_token=Secret("at"), obtained_at=now - 120, expires_at=now - 60)


def _records(store: MemoryStore | Vault, name: str) -> list[str]:
    """Every record the store holds for ``name``, whatever it is."""
    if isinstance(store, MemoryStore):
        return [kind for kind, held in (("credentials", store._credentials), ("tokens", store._tokens)) if name in held]
    rows = sqlite3.connect(store.path).execute("SELECT field FROM records WHERE profile = ?", (name,)).fetchall()
    return sorted(field for (field,) in rows) + (["profile"] if name in store.profiles() else [])


@pytest.fixture(params=["memory", "vault"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MemoryStore | Vault]:
    """A memory store (`dc-broker run --secrets-stdin`) or a vault on disk (key file)."""
    if request.param == "memory":
        yield MemoryStore()
        return
    home = tmp_path / "vault"
    home.mkdir(mode=0o700)
    create_key_file(str(home / "vault.key"))
    with Vault.create(home / "vault.db", KeyFile(str(home / "vault.key"))) as vault:
        yield vault


@pytest.mark.usefixtures("in_process")
@pytest.mark.parametrize("kind", KINDS)
async def test_remove_against_a_running_broker_forgets_every_secret_of_the_profile(
    tmp_path: Path, kind: str, any_store: MemoryStore | Vault
) -> None:
    """`remove` says "Remove PROFILE from config.toml and forget its secrets and tokens". With a broker
    running it asks for `logout` with ``forget``, so what a logout keeps (the client secret, the
    client's keys) goes as well, and a later `add` of the same name finds nothing of it."""
    cfg = tmp_path / "config.toml"
    cfg.write_text(KEPT)
    p, creds = _gone(kind)
    add_profile(str(cfg), p)
    any_store.set_credentials("gone", creds)
    any_store.set_credentials("kept", Credentials(client_secret=Secret("kept-secret")))
    await any_store.save_tokens("gone", _spent(time.time()))
    assert _records(any_store, "gone")
    async with broker(tmp_path, cfg, any_store) as (sock, _state):
        args = ["remove", "gone", "--config", str(cfg), "--socket", sock]
        result = await trio.to_thread.run_sync(lambda: CliRunner().invoke(cli, args))
        names = [s["profile"] for s in (await trio.to_thread.run_sync(lambda: talk.ask(sock, "status")))["profiles"]]
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Removed profile gone"), result.output
    assert "gone" not in load_config(str(cfg)).profiles and names == ["kept"]
    assert _records(any_store, "gone") == []  # "Remove PROFILE from config.toml and forget its secrets and tokens."
    assert any_store.credentials("gone") == Credentials() and any_store.saved_tokens("gone") is None
    kept = any_store.credentials("kept").client_secret  # another profile's records stay
    assert kept is not None and kept.reveal() == "kept-secret"


@pytest.mark.usefixtures("in_process")
async def test_remove_against_a_broker_that_does_not_know_forget_keeps_the_profile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker from before ``forget`` ignores the key (a key the contract does not name is ignored)
    and does a plain logout: its answer has no ``forgot_profile``. `remove` then keeps the profile
    (taken out of the config, its secrets would stay in the vault where no one sees them) and says
    what to do, exit 12 (a version mismatch)."""
    logout = HANDLERS["logout"]
    monkeypatch.setitem(HANDLERS, "logout", lambda st, c, a, n: logout(st, c, {"profile": a["profile"]}, n))
    cfg = tmp_path / "config.toml"
    cfg.write_text(KEPT)
    p, creds = _gone("password")
    add_profile(str(cfg), p)
    store = MemoryStore({"gone": creds})
    async with broker(tmp_path, cfg, store) as (sock, _state):
        args = ["remove", "gone", "--config", str(cfg), "--socket", sock]
        result = await trio.to_thread.run_sync(lambda: CliRunner().invoke(cli, args))
    assert result.exit_code == 12, result.output
    assert "too old to forget its secrets" in result.output and f"gone stays in {cfg}" in result.output
    assert "gone" in load_config(str(cfg)).profiles
    assert stored(store) == {"gone": Credentials(client_secret=Secret("cs"))}  # logged out, the secret kept


def _state(tmp_path: Path, profiles: dict[str, Profile], store: MemoryStore) -> BrokerState:
    cfg = tmp_path / "config.toml"
    for p in profiles.values():
        add_profile(str(cfg), p)
    return BrokerState(
        sessions=Sessions(profiles, store, IdpTransport()), socket_path=str(tmp_path / "s"), config_path=str(cfg)
    )


def _admin_changes(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    audit = [getattr(r, "fields", {}) for r in caplog.records if r.name == "dc_broker.audit"]
    return [fields for fields in audit if fields.get("event") == "admin_change"]


@pytest.mark.parametrize("kind", KINDS)
async def test_logout_with_forget_removes_every_record_and_says_what(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Over the wire: ``logout`` with ``forget: true`` from the broker's own user ends the login and
    forgets what a logout keeps; the answer names it, and the audit trail's admin_change says
    ``forget`` was asked, as it names the secrets other changes carry."""
    p, creds = _gone(kind, "p")
    store = MemoryStore({"p": creds, "other": Credentials(client_secret=Secret("o"))})
    await store.save_tokens("p", _spent(time.time()))
    state = _state(tmp_path, {"p": p}, store)
    caplog.set_level("INFO", logger="dc_broker.audit")
    result = await answered(HANDLERS["logout"](state, owner(), {"profile": "p", "forget": True}, 0.0))
    kept_by_logout = {"client_credentials": [], "password": ["client_secret"], "private_key_jwt": ["client_keys"]}
    assert result["forgot_profile"] is True and result["forgot_fields"] == kept_by_logout[kind], result
    assert result["kept_client_secret"] is False
    assert _records(store, "p") == [] and set(stored(store)) == {"other"}
    [change] = _admin_changes(caplog)
    assert (change["op"], change["profile"], change["result"], change["fields"]) == ("logout", "p", "ok", "forget")


@pytest.mark.parametrize("args", [{"profile": "p"}, {"profile": "p", "forget": False}], ids=["plain", "forget-false"])
async def test_a_plain_logout_keeps_the_client_secret_and_keys(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, args: dict[str, Any]
) -> None:
    """Without ``forget`` (or with ``forget: false``) a logout forgets the login only: the password
    goes, the confidential client's secret and its keys stay, and the answer has no ``forgot_profile``."""
    keys = _keys()
    store = MemoryStore({"p": Credentials(password=Secret("pw"), client_secret=Secret("cs"), client_keys=keys)})
    state = _state(tmp_path, {"p": _profile()}, store)
    caplog.set_level("INFO", logger="dc_broker.audit")
    result = await answered(HANDLERS["logout"](state, owner(), args, 0.0))
    assert "forgot_profile" not in result and result["kept_client_secret"] is True, result
    assert stored(store) == {"p": Credentials(client_secret=Secret("cs"), client_keys=keys)}
    [change] = _admin_changes(caplog)
    assert change["op"] == "logout" and "fields" not in change


def _stranger() -> Caller:
    uid = next(uid for uid in range(4242, 5000) if uid not in (0, os.getuid()))
    return Caller(uid, uid, os.getpid(), accepted_at=boottime())


async def test_logout_with_forget_is_refused_to_a_caller_who_may_not_administer_the_profile(tmp_path: Path) -> None:
    """Forgetting a profile's secrets takes them from everyone who uses it: only who may change its
    login (the broker's user, root, its ``admin`` rules) may. Another uid, even one the profile
    serves (``allow``), is refused before anything is done: the login, the password, the client
    secret all stay; an unknown profile is refused to it the same way (the owner hears it is unknown)."""
    stranger = _stranger()
    p = _profile(allow=(f"uid:{stranger.uid}",))
    creds = Credentials(password=Secret("pw"), client_secret=Secret("cs"), client_keys=_keys())
    store = MemoryStore({"p": creds})
    state = _state(tmp_path, {"p": p}, store)
    session = state.sessions.lookup("p")
    generation, last_error = session.generation, session.last_error
    for name in ("p", "no_such"):
        with pytest.raises(Forbidden, match=f"may not change the login or secrets of profile {name!r}"):
            HANDLERS["logout"](state, stranger, {"profile": name, "forget": True}, 0.0)
    assert stored(store) == {"p": creds}
    assert (session.generation, session.last_error) == (generation, last_error)  # not even logged out
    with pytest.raises(UnknownProfile):
        HANDLERS["logout"](state, owner(), {"profile": "no_such", "forget": True}, 0.0)
    assert stored(store) == {"p": creds}


async def test_logout_with_forget_is_for_the_owner_not_a_profile_admin(tmp_path: Path) -> None:
    """An ``admin`` rule lets a caller log the profile out and store new secrets, not take its client
    secret and keys from everyone who relies on them: that is `dc-broker remove`, the owner's. The
    refusal comes before the logout: nothing changes."""
    stranger = _stranger()
    p = _profile(admin=(f"uid:{stranger.uid}",))
    creds = Credentials(password=Secret("pw"), client_secret=Secret("cs"))
    store = MemoryStore({"p": creds})
    state = _state(tmp_path, {"p": p}, store)
    session = state.sessions.lookup("p")
    generation = session.generation
    with pytest.raises(Forbidden, match=r"may not forget the secrets of profile 'p': that is `dc-broker remove`"):
        HANDLERS["logout"](state, stranger, {"profile": "p", "forget": True}, 0.0)
    assert stored(store) == {"p": creds} and session.generation == generation
    result = await answered(HANDLERS["logout"](state, stranger, {"profile": "p"}, 0.0))  # a plain logout: fine
    assert result["profile"] == "p" and "forgot_profile" not in result
    assert stored(store)["p"].client_secret == Secret("cs")


@pytest.mark.parametrize("change", ["removed", "changed", "none"])
async def test_logout_with_forget_forgets_only_the_profile_it_was_sent_for(tmp_path: Path, change: str) -> None:
    """The logout may wait (a refresh holding the login lock, the IdP ending the login). A profile
    changed meanwhile (`add --force`, `set`) keeps its records: they may be the new settings' (it is
    logged out, the answer says nothing else was forgotten). One removed meanwhile has them
    forgotten: no profile configured uses them."""
    p, creds = _gone("password", "p")
    store = MemoryStore({"p": creds})
    state = _state(tmp_path, {"p": p}, store)
    session = state.sessions.lookup("p")
    outcome: dict[str, Any] = {}

    async def forget() -> None:
        try:
            outcome["result"] = await answered(
                HANDLERS["logout"](state, owner(), {"profile": "p", "forget": True}, 0.0)
            )
        except DcBrokerError as exc:
            outcome["error"] = exc

    cfg = str(tmp_path / "config.toml")
    # the login lock held, as a refresh at the IdP holds it: the logout waits its turn
    async with trio.open_nursery() as nursery, session._login_lock:
        nursery.start_soon(forget)
        await trio.testing.wait_all_tasks_blocked()
        assert not outcome and stored(store) == {"p": creds}  # waiting: nothing done yet
        if change == "removed":
            remove_profile(cfg, "p")
        elif change == "changed":  # another scope: a new client_id would drop the client secret at the reload
            replace_profile(cfg, dataclasses.replace(p, scope="openid email"))
        await _reload(state)
    if change == "changed":
        error = outcome.get("error")
        assert isinstance(error, Overloaded), outcome
        assert str(error).startswith("profile 'p' was changed while it was logged out"), error
        assert "nothing else of it was forgotten" in str(error)
        assert stored(store) == {"p": Credentials(client_secret=Secret("cs"))}  # logged out, nothing else gone
    else:
        assert outcome.get("result", {}).get("forgot_profile") is True, outcome
        assert stored(store) == {}


# ---------------------------------------------------------------- `add --force` for another login forgets the old one first

#: where a login is ended at the IdP (``flows.end_login``): its end-session or revocation endpoint
ENDINGS = ("/protocol/openid-connect/logout", "/protocol/openid-connect/revoke")
#: the old profile's login: user demo of client dc-cli at the dev IdP, its password and client secret
OLD_SECRETS = Credentials(password=Secret("demo"), client_secret=Secret("dc-cli-secret"))


def _sent(req: HttpRequest) -> dict[str, str]:
    """What one request told the IdP: its form, the client's id and secret from Basic auth, and
    where it went (``url``)."""
    seen = {**req.form, "url": req.url}
    auth = req.headers.get("Authorization", "")
    if auth.startswith("Basic "):
        client_id, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
        seen["basic_client_id"], seen["basic_client_secret"] = unquote(client_id), unquote(secret)
    return seen


@asynccontextmanager
async def idp_broker(
    tmp_path: Path, cfg: Path, store: SecretStore, sent: list[dict[str, str]]
) -> AsyncIterator[tuple[str, BrokerState]]:
    """A broker serving ``cfg`` on a real socket, in this process, its sessions running against the
    dev IdP in-process; every request it sends the IdP is noted in ``sent`` before it goes."""
    idp = DevIdP([demo_realm(access_lifespan=600)])
    transport = idp_transport(idp)
    send = transport.send

    async def spy(req: HttpRequest, **kwargs: Any) -> Any:
        sent.append(_sent(req))
        return await send(req, **kwargs)

    transport.send = spy  # type: ignore[method-assign]
    # no floor between attempts: a reload's new attempt starts at once, before the command goes on
    quick = dataclasses.replace(DEFAULT_POLICY, refresh_floor=0.01)
    sessions = Sessions(load_config(str(cfg)).profiles, store, transport, refresh_policy=quick)
    path = str(tmp_path / "run" / "b.sock")
    state = BrokerState(sessions=sessions, socket_path=path, config_path=str(cfg))
    async with listening(Server(state), path, sessions.run):
        yield path, state


def _logged_in(store: SecretStore) -> Profile:
    p = Profile(name="p", server=IDP_URL, tenant="demo", client_id="dc-cli", grant="password", username="demo")
    store.set_credentials("p", OLD_SECRETS)
    return p


async def _add_force(cfg: Path, sock: str, *login: str, stdin: str) -> Result:
    """`dc-broker add p --force ... --no-verify` against the broker on ``sock``: profile p at the
    in-process dev IdP with ``login`` (its client, grant, user, where its secrets come from), the
    secrets from ``stdin``. In a thread: the broker runs in this one."""
    args = ["add", "p", "--force", "--config", str(cfg), "--socket", sock, "--server", IDP_URL, "--tenant", "demo",
            *login, "--no-verify"]  # fmt: skip
    return await trio.to_thread.run_sync(lambda: CliRunner().invoke(cli, args, input=stdin))


def _slow_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command's set_secrets goes only once the broker has done all the reload started (a grant
    with what the store held, if it started one): what the broker sends before the new secrets
    arrive is then sent before this test looks, every run."""
    ask = files.ask

    def after_the_broker(socket_path: str | None, op: str, **args: Any) -> Any:
        if op == "set_secrets":
            trio.from_thread.run(trio.testing.wait_all_tasks_blocked, 0.2)
        return ask(socket_path, op, **args)

    monkeypatch.setattr(files, "ask", after_the_broker)


@pytest.mark.usefixtures("in_process")
async def test_add_force_for_another_user_never_sends_the_old_users_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`add --force p --username viewer` against a running broker whose p logs user demo in: the
    reload used to start a grant at once with what the vault held, demo's password, for user viewer
    (to a new server too, had --server changed). The broker forgets the old login and its secrets
    first (`logout` with `forget`), so the IdP never sees (viewer, demo's password), and the vault
    holds the new secrets only."""
    cfg = tmp_path / "config.toml"
    store = MemoryStore()
    add_profile(str(cfg), _logged_in(store))
    sent: list[dict[str, str]] = []
    _slow_secrets(monkeypatch)
    async with idp_broker(tmp_path, cfg, store, sent) as (sock, state):
        p = state.sessions.lookup("p")
        with trio.fail_after(10):
            await p.get()  # demo is logged in
        result = await _add_force(cfg, sock, "--client-id", "dc-cli", "--username", "viewer", "--password-stdin",
                                  "--secret-stdin", stdin="viewer-password\ndc-cli-secret\n")  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "the running broker ended its old login and forgot its secrets first" in result.output
        await trio.sleep(0.5)  # the new login, with the new secrets
    passwords = [(s.get("username"), s.get("password")) for s in sent if s.get("grant_type") == "password"]
    assert ("viewer", "demo") not in passwords, passwords
    assert passwords[0] == ("demo", "demo") and ("viewer", "viewer-password") in passwords, passwords
    assert [s["url"] for s in sent if s["url"].endswith(ENDINGS)]  # demo's login was ended at the IdP
    assert stored(store) == {
        "p": Credentials(password=Secret("viewer-password"), client_secret=Secret("dc-cli-secret"))
    }


@pytest.mark.usefixtures("in_process")
async def test_add_force_to_client_credentials_keeps_no_password_and_sends_no_old_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, any_store: MemoryStore | Vault
) -> None:
    """A switch to client credentials (another client): set_secrets merges with what is stored, so
    the old user's password stayed in the vault under the new settings, and the reload sent the old
    client's secret with the new client's id. Now the vault holds exactly the new client secret."""
    cfg = tmp_path / "config.toml"
    add_profile(str(cfg), _logged_in(any_store))
    sent: list[dict[str, str]] = []
    _slow_secrets(monkeypatch)
    async with idp_broker(tmp_path, cfg, any_store, sent) as (sock, state):
        with trio.fail_after(10):
            await state.sessions.lookup("p").get()
        result = await _add_force(cfg, sock, "--client-id", "dc-service", "--grant", "client_credentials",
                                  "--secret-stdin", stdin="dc-service-secret\n")  # fmt: skip
        assert result.exit_code == 0, result.output
        with trio.fail_after(10):
            tok = await state.sessions.lookup("p").get()
        assert tok.access_token.reveal()
    assert any_store.credentials("p") == Credentials(client_secret=Secret("dc-service-secret"))
    clients = {(s.get("basic_client_id"), s.get("basic_client_secret")) for s in sent}
    assert ("dc-service", "dc-cli-secret") not in clients, clients
    assert not any(s.get("password") == "demo" and s.get("basic_client_id") == "dc-service" for s in sent)


@pytest.mark.usefixtures("in_process")
async def test_add_force_for_the_same_login_keeps_the_login_until_the_new_secrets_come(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An `add --force` that changes nothing of whom the login is for (here only who may use it) does
    not log the profile out: the reload keeps its login, and the new secrets are stored as before."""
    cfg = tmp_path / "config.toml"
    store = MemoryStore()
    add_profile(str(cfg), _logged_in(store))
    sent: list[dict[str, str]] = []
    async with idp_broker(tmp_path, cfg, store, sent) as (sock, state):
        with trio.fail_after(10):
            await state.sessions.lookup("p").get()
        result = await _add_force(cfg, sock, "--client-id", "dc-cli", "--username", "demo", "--password-stdin",
                                  "--secret-stdin", "--allow", "uid:7", stdin="demo\ndc-cli-secret\n")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "forgot its secrets" not in result.output
    assert not [s["url"] for s in sent if s["url"].endswith(ENDINGS)]  # no logout: the login was kept
    assert stored(store) == {"p": OLD_SECRETS}


@pytest.mark.usefixtures("in_process")
async def test_add_force_for_another_login_against_a_broker_that_does_not_know_forget_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker from before ``forget`` does a plain logout (it ignores the key): its answer has no
    ``forgot_profile``. The add changes nothing (its config stays as it was) and says why, exit 12,
    as `remove` does; no new settings were ever sent the old secrets."""
    logout = HANDLERS["logout"]
    monkeypatch.setitem(HANDLERS, "logout", lambda st, c, a, n: logout(st, c, {"profile": a["profile"]}, n))
    cfg = tmp_path / "config.toml"
    store = MemoryStore()
    add_profile(str(cfg), _logged_in(store))
    before = cfg.read_text()
    sent: list[dict[str, str]] = []
    async with idp_broker(tmp_path, cfg, store, sent) as (sock, state):
        with trio.fail_after(10):
            await state.sessions.lookup("p").get()
        result = await _add_force(cfg, sock, "--client-id", "dc-cli", "--username", "viewer", "--password-stdin",
                                  "--secret-stdin", stdin="v\ndc-cli-secret\n")  # fmt: skip
        running = state.sessions.lookup("p").profile
    assert result.exit_code == 12, result.output
    assert "too old to forget" in result.output and f"nothing of this add was written to {cfg}" in result.output
    assert cfg.read_text() == before and running.username == "demo"
    assert not any(s.get("username") == "viewer" for s in sent)


def test_an_add_force_undone_after_the_old_secrets_were_forgotten_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The add's set_secrets is refused (nothing stored): the add is taken back, the old settings put
    back; but the old secrets are gone (forgotten before the new settings were written), and the
    error says so, with what to do."""
    cfg = tmp_path / "config.toml"
    old = Profile(name="p", token_url=TOKEN_URL, client_id="c", grant="password", username="demo")
    add_profile(str(cfg), old)
    before = cfg.read_text()
    asked: list[str] = []

    def ask(socket_path: str | None, op: str, **args: Any) -> dict[str, Any]:
        asked.append(op)
        if op == "logout":
            return {"profile": "p", "forgot_profile": True, "forgot_fields": ["password"]}
        if op == "set_secrets":
            raise Locked("the vault is locked; run `dc-broker unlock`")
        return {}

    monkeypatch.setattr(files, "ask", ask)
    new = dataclasses.replace(old, username="viewer")
    with pytest.raises(Locked) as raised:
        files._add_to_running(str(cfg), new, old, None, Secret("pw"), None)
    assert asked == ["logout", "reload", "set_secrets", "reload"]
    assert cfg.read_text() == before
    message = str(raised.value)
    assert message.startswith("the vault is locked"), message
    assert f"the old settings of profile p are back in {cfg}, but not its old secrets" in message
    assert "`dc-broker login p`" in message


def test_an_add_force_for_another_login_that_the_broker_does_not_run_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The config has the profile, the running broker does not (the file was changed without a
    reload): nothing can be forgotten there, and its store may hold anything under that name, which
    the reload would take up under the new settings. The add writes nothing and says what to do."""
    cfg = tmp_path / "config.toml"
    old = Profile(name="p", token_url=TOKEN_URL, client_id="c", grant="password", username="demo")
    add_profile(str(cfg), old)
    before = cfg.read_text()
    asked: list[str] = []

    def ask(socket_path: str | None, op: str, **args: Any) -> dict[str, Any]:
        asked.append(op)
        raise UnknownProfile("no profile named 'p'; `dc-broker status` lists the profiles")

    monkeypatch.setattr(files, "ask", ask)
    with pytest.raises(UnknownProfile, match="nothing of this add was written") as raised:
        files._add_to_running(str(cfg), dataclasses.replace(old, username="viewer"), old, None, Secret("pw"), None)
    assert asked == ["logout"] and cfg.read_text() == before
    assert "have the broker read the config" in str(raised.value)
