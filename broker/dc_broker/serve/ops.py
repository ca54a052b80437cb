"""What each wire op does: the dispatch table ``HANDLERS`` (op name -> handler).

A handler takes the broker's state, the caller (from the kernel), the request's arguments (the map as
received: keys the op's ``dc_token.protocol.ARGS`` entry does not name are ignored) and ``now`` (the
clock the server read once for the batch of frames this request came in), and returns either the
result map at once (the common, allocation-light path: a cached token), an awaitable that produces
it (the server runs those as separate tasks so a slow op never delays the connection), or an async
iterator of results (a stream: each is sent with ``more: true``; ``watch``).
Handlers raise ``dc_token.errors.BrokerError`` subclasses; the server turns them into error replies.

Every handler that decides who may do what first makes sure the caller's program hash is settled
when any profile pins a program by hash (``exe-sha256``): from the cache at once, else read in a
worker thread before the decision (``dc_broker.access.programs``; ``_program_first``). The decision
then costs the same whichever profile it is about, and the loop never reads a program.

A decision holds until the next wait, no longer. Whatever waits (a ``watch`` between tokens, a
token request behind a refresh, a per-request scope behind the profile's login, a person's login at
the IdP) decides again after the wait, before it hands anything out or stores anything, with the
same question as before and for the same session (``_still_allowed``, ``_still_admin``): a reload
that took the caller out of ``allow`` or ``admin`` meanwhile is ``forbidden``, a profile removed
(or removed and added again: another profile) ``unknown_profile``. That decision is not preceded
by a program's hash: a rule pinning one that was added while the caller waited matches nothing
until the caller connects again (its program is hashed before its new connection's first decision).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import msgpack
import trio

from dc_broker.access.authorize import administered, authorized, is_owner, may_see
from dc_broker.access.caller import Caller
from dc_broker.access.programs import ProgramHashes
from dc_broker.config import Profile
from dc_broker.config.load import load_config
from dc_broker.errors import RecordCorrupt, UpstreamFault, WrongPassphrase
from dc_broker.idp import clientkeys
from dc_broker.observe import events
from dc_broker.observe.events import caller_fields
from dc_broker.secret import Secret
from dc_broker.serve.audit import Audit
from dc_broker.sessions.flows import Ended
from dc_broker.sessions.registry import MAX_SCOPES_PER_CALLER, MAX_SCOPES_PER_PROFILE, ScopeNotKnownYet, Sessions
from dc_broker.sessions.session import Session
from dc_broker.sinks import TokenFiles
from dc_broker.store import MemoryStore, SecretStore
from dc_broker.tokens import Credentials, TokenSet
from dc_broker.vault.records import unlock_delay
from dc_token.errors import (
    BadRequest,
    BrokerError,
    ConfigInvalid,
    Forbidden,
    Overloaded,
    UnknownProfile,
    UpstreamError,
    UpstreamUnavailable,
)
from dc_token.protocol import OPS, PROTOCOL_VERSION, OpArgs, TokenArgs
from dc_token.version import version

log = logging.getLogger("dc_broker")

#: profiles listed in one status reply at most; the rest are counted (and reached with ``after``)
STATUS_LIMIT = 200
#: bytes of profile entries in one status reply: the frame is 64 KiB, the rest is headroom
STATUS_BUDGET = 56 * 1024
#: a status string (an IdP's error message, a URL) is cut to this many characters: room for the
#: longest of the broker's own messages whole (a proxy's 407 with its quoted answer, then what to set,
#: about 440), so a cut only ever shortens text an IdP or proxy sent
STATUS_FIELD_MAX = 480

Result = dict[str, Any]


class ServerView(Protocol):
    """What the ops read of the server (``metrics``): it sets itself as ``BrokerState.server``."""

    connections: int
    pending: int


@dataclass
class BrokerState:
    sessions: Sessions
    socket_path: str
    started_at: float = field(default_factory=time.time)
    #: trio's clock (the server's deadlines and the sessions' times are on it)
    clock: Callable[[], float] = trio.current_time
    #: system mode (a shared broker): profiles without allow rules are closed to everyone
    system: bool = False
    audit: Audit = field(default_factory=Audit)
    config_path: str | None = None
    unlock_lock: trio.Lock = field(default_factory=trio.Lock)
    #: clock time of the last token request (for auto-lock)
    last_use: float = 0.0
    #: the server serving this state (its connection counts, for ``metrics``)
    server: ServerView | None = None
    #: the token files (``[[profiles.NAME.sinks]]``): `logout`, `lock` and `reload` wait until
    #: the files they take away are gone
    files: TokenFiles | None = None
    #: callers' program hashes for exe-sha256 rules: cache, budgets, the worker thread
    programs: ProgramHashes = field(default_factory=ProgramHashes)

    def program_pending(self, caller: Caller) -> bool:
        """Whether ``caller``'s program must be hashed (off the loop) before anything is decided."""
        return not caller.attested and self.sessions.pins_programs and not self.programs.cached(caller)

    async def settle_files(self, names: list[str] | None = None) -> None:
        if self.files is not None:
            await self.files.settle(names)


Args = Mapping[str, Any]
Handler = Callable[[BrokerState, Caller, Args, float], "Result | Awaitable[Result] | AsyncIterator[Result]"]


def token_result(session: Session, tok: TokenSet, now: float, min_ttl: float = 0.0) -> Result:
    expires_in, expires_at, refresh_in = token_times(session, tok, now)
    result = {
        "profile": session.profile.name,
        "token": tok.access_token.reveal(),
        "type": tok.token_type,
        "expires_in": expires_in,
        "expires_at": expires_at,
        "scope": tok.scope,
        "refresh_in": refresh_in,
    }
    if min_ttl > expires_in:  # capped at half the lifetime the IdP grants: said, never silent
        result["min_ttl_shortfall"] = round(min_ttl - expires_in, 3)
    return result


def token_times(session: Session, tok: TokenSet, now: float) -> tuple[float, float, float]:
    """A token reply's times at ``now``: ``expires_in``, ``expires_at`` (wall clock) and
    ``refresh_in``, when the broker will replace the token (a client cache must not outlive it:
    some IdPs, Django OAuth Toolkit among them, revoke the old access token when they issue a new
    one). The one place they are computed (``dc_broker.serve.repeat`` writes them into its bytes)."""
    remaining = tok.expires_at - now
    return remaining, time.time() + remaining, max(0.0, min(session.next_attempt_at - now, remaining))


def op_hello(state: BrokerState, caller: Caller, args: Args, now: float) -> Result:
    return {
        "server": "dc-broker",
        "version": version(),  # read from the package metadata on the first hello/status
        "protocol": PROTOCOL_VERSION,
        "ops": sorted(HANDLERS),
        "uid": caller.uid,
        "pid": os.getpid(),
    }


def op_token(state: BrokerState, caller: Caller, args: Args, now: float) -> Result | Awaitable[Result]:
    checked = TokenArgs.from_wire(args)  # the wire contract's own checks, the same as the client's
    sessions = state.sessions
    if sessions.pins_programs and state.program_pending(caller):
        return _after_program(state, caller, args, now, op_token)
    name = checked.profile
    session = authorized(sessions, caller, name, system=state.system)
    if checked.scope:  # checked and paid for by the caller (``Sessions.scoped``)
        try:
            session = sessions.scoped(session, checked.scope, caller.uid, checked.min_ttl)
        except ScopeNotKnownYet:
            return _scoped_token(state, caller, session, checked)
    state.audit.record(name, caller)
    state.last_use = now
    min_ttl = checked.min_ttl
    tok = session.peek(min_ttl, now)
    if tok is not None:
        return token_result(session, tok, now, min_ttl)
    return _token_slow(state, caller, session, min_ttl)


def op_id_token(state: BrokerState, caller: Caller, args: Args, now: float) -> Result | Awaitable[Result]:
    """The ID token that came with the profile's current login (Keycloak sends one when the scope
    has ``openid``), with the access token's expiry when the ID token says none of its own."""
    checked = OpArgs.from_wire("id_token", args)
    name = checked["profile"]
    session = authorized(state.sessions, caller, name, system=state.system)
    state.audit.record(name, caller)
    state.last_use = now
    min_ttl = float(checked.get("min_ttl", 0.0))
    tok = session.peek(min_ttl, now)
    if tok is not None:
        return id_token_result(session, tok, now)
    return _id_token_slow(state, caller, session, min_ttl)


async def _id_token_slow(state: BrokerState, caller: Caller, session: Session, min_ttl: float) -> Result:
    tok = await _waited(state, caller, session, min_ttl)
    return id_token_result(session, tok, state.clock())


def id_token_result(session: Session, tok: TokenSet, now: float) -> Result:
    name = session.profile.name
    granted = tok.scope or session.profile.scope or ""
    if tok.id_token is None and "openid" in granted.split():
        raise UpstreamError(
            f"profile {name!r} has no ID token: the identity provider sent none with its current token, though the "
            "scope has 'openid' (OpenID Connect defines none for a password or client credentials grant; some "
            "providers, Django OAuth Toolkit among them, send one with the next refresh: ask again then)",
            retry_after=max(1.0, session.next_attempt_at - now) if math.isfinite(session.next_attempt_at) else None,
        )
    if tok.id_token is None:
        raise ConfigInvalid(
            f"profile {name!r} has no ID token: its login's scope {tok.scope or session.profile.scope or ''!r} lacks "
            f"'openid'; add it (`dc-broker set {name} scope=\"openid ...\"`): the next login brings an ID token"
        )
    remaining = tok.expires_at - now
    exp = jwt_exp(tok.id_token.reveal())
    if exp is not None:
        remaining = min(remaining, exp - time.time())
    return {
        "profile": name,
        "id_token": tok.id_token.reveal(),
        "expires_in": remaining,
        "expires_at": time.time() + remaining,
    }


def jwt_exp(token: str) -> float | None:
    """A JWT's ``exp`` claim, read without verifying (the IdP signed it for the API, not for us)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, TypeError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


async def _scoped_token(state: BrokerState, caller: Caller, base: Session, args: TokenArgs) -> Result:
    """A per-request scope of a profile without a scope of its own: it narrows what the IdP granted
    the profile's login, so that login comes first."""
    session = await _scoped_after_login(state, caller, base, args)
    state.audit.record(args.profile, caller)
    state.last_use = state.clock()
    return await _token_slow(state, caller, session, args.min_ttl)


async def _scoped_after_login(state: BrokerState, caller: Caller, base: Session, args: TokenArgs) -> Session:
    await base.get(0.0)
    _still_allowed(state, caller, base)  # before a scope is made from a login it may no longer use
    assert args.scope is not None
    return state.sessions.scoped(base, args.scope, caller.uid, args.min_ttl)


def _still_allowed(state: BrokerState, caller: Caller, session: Session) -> None:
    """After a wait, before anything is handed out: ``caller`` may still use ``session`` (a profile's,
    or a per-request scope's of it), as the handler decided before the wait (``authorized``), and it
    is still the session configured under that name. ``UnknownProfile`` when the profile was removed
    (or removed and added again: another profile, whatever its settings); ``Forbidden`` when the
    caller is no longer allowed (a reload changed ``allow``); ``Overloaded`` (ask again) when the
    per-request scope was dropped (newer scopes took its slot, or the profile's login changed).

    A program's hash is taken from the cache if it is there; it is not read now (a rule pinning one
    was added while the caller waited): without it an ``exe-sha256`` rule matches nothing, as it
    matches nothing for a program that cannot be hashed, and the client connects again."""
    base = session.parent if session.parent is not None else session
    name = base.profile.name
    if base.retired:
        raise _removed_meanwhile(name)
    if state.sessions.pins_programs and not caller.attested:
        state.programs.cached(caller)  # settled from the cache if it can be, no read
    if authorized(state.sessions, caller, name, system=state.system) is not base:
        raise _removed_meanwhile(name)  # not reached: a session configured is never retired
    if session.retired:
        raise Overloaded(
            f"profile {name!r}: the per-request scope {session.profile.scope!r} was dropped while this request "
            f"waited (newer scopes took its place: a profile serves {MAX_SCOPES_PER_PROFILE} at once, "
            f"a caller {MAX_SCOPES_PER_CALLER}; or the profile's login changed); ask again",
            retry_after=1.0,
        )


def _removed_meanwhile(name: str) -> UnknownProfile:
    return UnknownProfile(
        f"profile {name!r} was removed (`dc-broker remove` or a reload) while this request waited; "
        "`dc-broker status` lists the profiles"
    )


def op_watch(state: BrokerState, caller: Caller, args: Args, now: float) -> AsyncIterator[Result]:
    """Stream: the current token at once, then every new one, until the client closes or an error."""
    checked = TokenArgs.from_wire(args)
    name, min_ttl = checked.profile, checked.min_ttl
    session = authorized(state.sessions, caller, name, system=state.system)
    if checked.scope:
        try:
            session = state.sessions.scoped(session, checked.scope, caller.uid, min_ttl)
        except ScopeNotKnownYet:
            return _watch(state, caller, session, min_ttl, scoped=checked)
    state.audit.record(name, caller)
    return _watch(state, caller, session, min_ttl)


async def _watch(
    state: BrokerState, caller: Caller, session: Session, min_ttl: float, scoped: TokenArgs | None = None
) -> AsyncIterator[Result]:
    """The watch stream: decided again (``_still_allowed``) each time it wakes (``token_changed``:
    a new token, a reload's new settings, its session retired) and after every wait for a token, so
    no token is sent after the caller lost the profile, and a watch of a profile removed ends."""
    if scoped is not None:  # a per-request scope waiting for the profile's login (``_scoped_token``)
        session = await _scoped_after_login(state, caller, session, scoped)
        state.audit.record(scoped.profile, caller)
    last: TokenSet | None = None
    while True:
        _still_allowed(state, caller, session)  # woken, or first run some time after the handler decided
        changed = session.token_changed
        tok = await _waited(state, caller, session, min_ttl)  # the token may have come after a reload
        if tok is not last:
            last = tok
            yield token_result(session, tok, state.clock(), min_ttl)
        await changed.wait()


def op_login(state: BrokerState, caller: Caller, args: Args, now: float) -> AsyncIterator[Result]:
    """Stream: a password login (one message), the device flow (the code to show, then the outcome) or
    a browser login (the URL to open, then the outcome). Each replaces the profile's login: for the
    broker's own uid, root and the profile's admins only."""
    checked = OpArgs.from_wire("login", args)
    session = administered(state.sessions, caller, checked["profile"])
    still = _still_admin(state, caller, session)  # asked again right before the login is stored
    password = checked.get("password")
    if password is not None:
        if session.profile.grant != "password":
            raise BadRequest(
                f"profile {session.profile.name!r} does not use a password (grant {session.profile.grant})"
            )
        return _password_login(session, Secret(password), still)
    if session.profile.grant == "browser":
        return session.browser_login(still=still)
    return session.device_login(still=still)


def _still_admin(state: BrokerState, caller: Caller, session: Session) -> Callable[[], None]:
    """The check a person's login makes right before anything of it is stored (``Session``'s
    ``still``), minutes after ``op_login`` decided: ``caller`` may still change the login of
    ``session`` (``administered``, as decided then), still the session configured under that name.
    ``Forbidden`` when a reload took the caller out of ``admin``; a program's hash, as in
    ``_still_allowed``, from the cache or not at all."""
    name = session.profile.name

    def still() -> None:
        if state.sessions.pins_programs and not caller.attested:
            state.programs.cached(caller)
        if administered(state.sessions, caller, name) is not session:
            raise _removed_meanwhile(name)  # not reached: its callers look at ``retired`` first

    return still


async def _password_login(session: Session, password: Secret, still: Callable[[], None]) -> AsyncIterator[Result]:
    # checked at the IdP before it replaces anything: a wrong password keeps the working login
    tok = await session.password_login(password, still=still)
    yield session.logged_in(tok)


async def _waited(state: BrokerState, caller: Caller, session: Session, min_ttl: float) -> TokenSet:
    """``session.get`` for a caller decided before the wait, decided again after it (``_still_allowed``),
    also when the wait ended in an error: a session that left meanwhile is told as why it left."""
    try:
        tok = await session.get(min_ttl)
    except BrokerError:
        _still_allowed(state, caller, session)
        raise
    _still_allowed(state, caller, session)  # the wait was long enough for a reload
    return tok


async def _token_slow(state: BrokerState, caller: Caller, session: Session, min_ttl: float) -> Result:
    tok = await _waited(state, caller, session, min_ttl)
    return token_result(session, tok, state.clock(), min_ttl)


def op_invalidate(state: BrokerState, caller: Caller, args: Args, now: float) -> Result:
    checked = OpArgs.from_wire("invalidate", args)
    session = authorized(state.sessions, caller, checked["profile"], system=state.system)
    return {"profile": session.profile.name, "refreshing": session.invalidate(checked["token"])}


def op_status(state: BrokerState, caller: Caller, args: Args, now: float) -> Result:
    """The broker and the profiles this caller may use, in name order. One reply always fits a frame:
    strings are cut to ``STATUS_FIELD_MAX`` characters and at most ``STATUS_BUDGET`` bytes of profiles
    are listed; ``next`` (when set) is the ``after`` to send for the rest, ``truncated`` how many
    there are. The state summary counts them all."""
    checked = OpArgs.from_wire("status", args)
    name = checked.get("profile")
    after = checked.get("after")
    if name is not None:
        sessions = [authorized(state.sessions, caller, name, system=state.system).status(now)]
    else:  # only the profiles this caller may use or administer
        sessions = [
            st
            for st in state.sessions.status()
            if may_see(caller, state.sessions.lookup(st["profile"]).profile, system=state.system)
        ]
    summary: dict[str, int] = {}
    for st in sessions:
        summary[st["state"]] = summary.get(st["state"], 0) + 1
    pending = [st for st in sessions if after is None or st["profile"] > after]
    shown: list[Result] = []
    used = 0
    for st in pending[:STATUS_LIMIT]:
        entry = _bounded(st)
        size = len(_packb(entry))
        if shown and used + size > STATUS_BUDGET:
            break
        shown.append(entry)
        used += size
    rest = len(pending) - len(shown)
    return {
        "broker": {
            "version": version(),  # read from the package metadata on the first hello/status
            "pid": os.getpid(),
            "socket": _cut(state.socket_path),
            "uptime": round(time.time() - state.started_at, 3),
            "profiles": len(sessions),
            "mode": "system" if state.system else "user",
            "vault": _vault_state(state.sessions.store),
            "states": summary,
            "truncated": rest,
            "next": shown[-1]["profile"] if rest and shown else None,
        },
        "profiles": shown,
    }


def op_metrics(state: BrokerState, caller: Caller, args: Args, now: float) -> Awaitable[Result]:
    """The Prometheus exposition of the profiles this caller may use and the broker's own figures."""
    return _metrics(state, caller)


async def _metrics(state: BrokerState, caller: Caller) -> Result:
    return {"text": (await render_metrics(state, caller)).decode()}


async def render_metrics(state: BrokerState, caller: Caller | None = None) -> bytes:
    """The exposition (``observe.metrics``), for a caller (its profiles) or the HTTP endpoint (all:
    whoever may reach it was decided by ``metrics_listen``). prometheus_client costs about 70 ms to
    import, so the first scrape imports it in a thread, off the event loop."""
    import importlib

    module = await trio.to_thread.run_sync(importlib.import_module, "dc_broker.observe.metrics")
    sessions = state.sessions
    names = [
        n
        for n in sessions.names()
        if caller is None or may_see(caller, sessions.lookup(n).profile, system=state.system)
    ]
    server = state.server
    text: bytes = module.exposition(
        sessions,
        names,
        connections=server.connections if server is not None else 0,
        system=state.system,
        started_at=state.started_at,
    )
    return text


def _vault_state(store: SecretStore) -> str:
    if not store.lockable:
        return "in memory"
    return "locked" if store.locked else "unlocked"


def _cut(text: str) -> str:
    return text if len(text) <= STATUS_FIELD_MAX else text[: STATUS_FIELD_MAX - 3] + "..."


def _bounded(entry: Result) -> Result:
    return {k: _cut(v) if isinstance(v, str) else v for k, v in entry.items()}


_packb = msgpack.Packer(use_bin_type=True, autoreset=True).pack


# ---------------------------------------------------------------- administration (vault, config)


def _admin(state: BrokerState, caller: Caller) -> None:
    """Changing the broker (unlock, lock, secrets, config) is for its own user and root only."""
    if not is_owner(caller):
        raise Forbidden("only the broker's own user (or root) may change it")


def _vault(state: BrokerState) -> SecretStore:
    store = state.sessions.store
    if not store.lockable:
        raise BadRequest("this broker keeps its secrets in memory only (no vault); there is nothing to lock")
    return store


def op_unlock(state: BrokerState, caller: Caller, args: Args, now: float) -> Awaitable[Result]:
    _admin(state, caller)
    passphrase = OpArgs.from_wire("unlock", args).get("passphrase")  # a bad request is that, first
    vault = _vault(state)
    return _unlock(state, vault, Secret(passphrase) if passphrase else None)


async def _unlock(state: BrokerState, vault: SecretStore, passphrase: Secret | None) -> Result:
    async with state.unlock_lock:  # one attempt at a time, so the delay cannot be sidestepped
        try:
            await trio.to_thread.run_sync(vault.unlock, passphrase)  # Argon2id: ~0.1 s, off the loop
        except WrongPassphrase as exc:
            delay = unlock_delay(vault.failed_unlocks)
            await trio.sleep(delay)  # wrong passphrases are slowed down, increasingly
            raise WrongPassphrase(exc.message, retry_after=delay or None) from None
        state.sessions.unlocked()
    return {"unlocked": True, "profiles": len(state.sessions)}


def op_lock(state: BrokerState, caller: Caller, args: Args, now: float) -> Awaitable[Result]:
    _admin(state, caller)
    _vault(state)
    return _lock(state)


async def _lock(state: BrokerState) -> Result:
    """Tokens leave memory at once; the vault locks once refreshes at the IdP have stored their
    answers (``Sessions.lock``). One lock or unlock at a time, so an unlock cannot slip in between."""
    async with state.unlock_lock:
        # shielded: once the tokens have left memory the store locks too, even when the request's
        # connection closes meanwhile (a lock cut short would leave the data key in memory while
        # every profile shows locked); the wait is bounded (``LOCK_SETTLE_LIMIT``)
        with trio.CancelScope(shield=True):
            await state.sessions.lock()
        await state.settle_files()  # no token file outlives the reply
    return {"locked": True}


async def auto_lock(state: BrokerState, after: float) -> None:
    """Lock the vault once no token has been asked for in ``after`` seconds (``[daemon]
    auto_lock_after``); `dc-broker unlock` opens it again."""
    store = state.sessions.store
    if after <= 0 or not store.lockable:
        return
    state.last_use = state.clock()
    while True:
        if store.locked:  # nothing to lock (a passphrase vault starts so): wait for an unlock, idle
            await _until_unlocked(store, min(after, 1.0))
            state.last_use = state.clock()  # a full period from the unlock, not from a request before it
        await trio.sleep_until(state.last_use + after)
        if state.clock() >= state.last_use + after and not store.locked:
            await _lock(state)
            events.emit("vault_locked", "vault locked after %.0f s without a token request", after, by="auto_lock")


async def _until_unlocked(store: SecretStore, every: float) -> None:
    """Back once ``store`` is unlocked, looking every ``every`` seconds: an unlock comes from the op,
    `Sessions.unlocked` or a key source read again, and a look a second costs nothing worth an event
    threaded through all of them."""
    while store.locked:  # noqa: ASYNC110 (see the docstring)
        await trio.sleep(every)


def op_reload(state: BrokerState, caller: Caller, args: Args, now: float) -> Awaitable[Result]:
    """Re-read the config file (what `dc-broker add/remove` do with a running broker). Returns once
    the token files of removed profiles (and sinks a change dropped) are gone."""
    _admin(state, caller)
    if state.config_path is None:
        raise BadRequest("this broker was not started from a config file; there is nothing to reload")
    config = load_config(state.config_path, missing_ok=True)
    added, changed, removed = state.sessions.reload(config.profiles)
    reloaded("op", added, changed, removed)
    return _reloaded(state, {"added": added, "changed": changed, "removed": removed})


async def _reloaded(state: BrokerState, result: Result) -> Result:
    await state.settle_files([*result["changed"], *result["removed"]])
    return result


def reloaded(source: str, added: list[str], changed: list[str], removed: list[str]) -> None:
    """The ``reload`` audit event: what the config's new reading changed."""
    events.emit(
        "reload",
        "config reloaded (%s): added %s, changed %s, removed %s",
        source,
        ", ".join(added) or "none",
        ", ".join(changed) or "none",
        ", ".join(removed) or "none",
        source=source,
        added=",".join(added),
        changed=",".join(changed),
        removed=",".join(removed),
    )


def op_set_secrets(state: BrokerState, caller: Caller, args: Args, now: float) -> Result | Awaitable[Result]:
    """Store a profile's password / client secret (`dc-broker add`, `dc-broker rotate`). With
    ``verify: true`` the new values (with the stored ones they do not replace) are first checked by
    one grant at the IdP: a wrong new password changes nothing.

    A secret is stored only for the profile it was sent for, still configured as it was when the
    request arrived: after every wait (its caller's program hashed, a check at the IdP) ``_unchanged``
    looks again, and a profile removed or changed meanwhile is refused, nothing stored. Between
    that look and the write there is no checkpoint, so no ``reload`` (which changes the sessions
    without one either) can come in between: the event loop is the lock both take."""
    if state.program_pending(caller):  # the caller's program is hashed first (``_program_first``)
        name = args.get("profile")
        arrived = _configured(state, name) if isinstance(name, str) else None
        return _set_secrets_after_program(state, caller, args, arrived)
    return _set_secrets(state, caller, args)


#: a profile as a request found it: its session and settings
Configured = tuple[Session, Profile]

_PROGRAM_HASHED: Final = "its caller's program was hashed"


def _configured(state: BrokerState, name: str) -> Configured | None:
    """``name``'s session and settings now (no decision: who may change it is asked after the wait)."""
    try:
        session = state.sessions.lookup(name)
    except UnknownProfile:
        return None
    return session, session.profile


async def _set_secrets_after_program(
    state: BrokerState, caller: Caller, args: Args, arrived: Configured | None
) -> Result:
    await state.programs.attest(caller)
    result = _set_secrets(state, caller, args, waited=True, arrived=arrived)
    return result if isinstance(result, dict) else await result


def _set_secrets(
    state: BrokerState, caller: Caller, args: Args, *, waited: bool = False, arrived: Configured | None = None
) -> Result | Awaitable[Result]:
    """set_secrets once the caller's program is settled; ``waited``: it was hashed since the request
    arrived, when the profile was ``arrived`` (None: unknown)."""
    checked = OpArgs.from_wire("set_secrets", args)
    try:
        session = administered(state.sessions, caller, checked["profile"])
    except UnknownProfile:  # the owner's answer (another caller's is Forbidden, as for any unknown profile)
        if waited and arrived is not None:
            _unchanged(state, arrived, _PROGRAM_HASHED)  # removed while it waited: says so
        raise
    if waited:
        if arrived is None:  # unknown when it came: a profile of that name added since is not the one it meant
            raise _changed_meanwhile(checked["profile"], _PROGRAM_HASHED)
        _unchanged(state, arrived, _PROGRAM_HASHED)
    sent = (session, session.profile)
    fields = {key: Secret(value) for key in ("password", "client_secret") if (value := checked.get(key)) is not None}
    verify = bool(checked.get("verify", False))
    new_key, activate = checked.get("new_key"), bool(checked.get("activate_key"))
    if new_key is not None or activate:
        if activate and verify:
            return _set_keys(state, session, new_key, activate, verify)
        return _store_keys(state, session, new_key, activate, verified=False)  # no wait: stored now
    if not fields and verify:
        return _check_client(state, sent)
    if verify:
        return _set_secrets_checked(state, sent, fields)
    return _store_secrets(state, session, fields)


def _unchanged(state: BrokerState, sent: Configured, waited: str) -> Session:
    """The session ``sent`` names, after a wait (``waited``: what it waited for), if it is still the
    one configured under that name with the same settings, but for who may use it (``allow``) and
    its token files. Else nothing may be stored for it: ``UnknownProfile`` when it was removed,
    ``Overloaded`` (ask again) when it was changed (its login, or who may change it) or replaced by
    a new profile of the same name. The caller's write follows with no checkpoint in between."""
    session, settings = sent
    name = settings.name
    try:
        now = state.sessions.lookup(name)
    except UnknownProfile:
        raise UnknownProfile(
            f"profile {name!r} was removed while {waited}; nothing was stored for it (`dc-broker status` "
            "lists the profiles)"
        ) from None
    if now is not session or not now.profile.same_login(settings) or now.profile.admin != settings.admin:
        raise _changed_meanwhile(name, waited)
    return now


def _changed_meanwhile(name: str, waited: str) -> Overloaded:
    return Overloaded(
        f"profile {name!r} was changed while {waited} (`dc-broker add --force`, `set`, `remove` or a reload); "
        "nothing was stored for it: look at `dc-broker list`, then run the command again for the profile as it is now",
        retry_after=1.0,
    )


def _store_secrets(state: BrokerState, session: Session, fields: dict[str, Secret]) -> Result:
    store = state.sessions.store
    store.set_credentials(session.profile.name, dataclasses.replace(store.credentials(session.profile.name), **fields))
    session.secrets_stored(frozenset(fields))
    session.credentials_changed(relogin=True)
    return {"profile": session.profile.name, "stored": sorted(fields), "verified": False}


def _probe(state: BrokerState, session: Session, credentials: Credentials) -> Session:
    """A throwaway session of ``session``'s profile holding ``credentials``: it asks the IdP whether
    they work without touching the stored ones (its attempts count in the broker's metrics)."""
    name = session.profile.name
    return Session(
        session.profile,
        MemoryStore({name: credentials}),
        state.sessions.idp,
        clock=state.clock,
        counts=state.sessions.counts,
    )


async def _set_secrets_checked(state: BrokerState, sent: Configured, fields: dict[str, Secret]) -> Result:
    session, _ = sent
    name = session.profile.name
    candidate = dataclasses.replace(state.sessions.store.credentials(name), **fields)
    probe = _probe(state, session, candidate)
    try:
        await probe.verify()
    except UpstreamFault as exc:
        raise UpstreamUnavailable(f"could not check the new credentials of profile {name!r}: {exc}") from None
    session = _unchanged(state, sent, "its new credentials were checked at the identity provider")
    result = _store_secrets(state, session, fields)
    return {**result, "verified": True}


async def _check_client(state: BrokerState, sent: Configured) -> Result:
    """``verify`` with nothing new (`dc-broker keys PROFILE --check`): does the IdP accept the client
    as it authenticates now? If so the profile tries again at once (out of ``rejected``)."""
    session, _ = sent
    name = session.profile.name
    probe = _probe(state, session, state.sessions.store.credentials(name))
    try:
        await probe.check_client()
    except UpstreamFault as exc:
        raise UpstreamUnavailable(f"could not check the client of profile {name!r}: {exc}") from None
    session = _unchanged(state, sent, "its client was checked at the identity provider")
    session.credentials_changed()
    return {"profile": name, "stored": [], "verified": True}


def _set_keys(
    state: BrokerState, session: Session, new_key: str | None, activate: bool, verify: bool
) -> Awaitable[Result]:
    """A private_key_jwt profile's keys (`dc-broker add`, `rotate --key [--activate]`), made and kept
    here: a private key never crosses the socket. Activating checks first, with ``verify``, that the
    IdP accepts a client assertion signed with the next key; a refusal changes nothing. (A change
    that checks nothing is ``_store_keys``, stored before the op returns.)"""
    return _keys_checked(state, (session, session.profile), new_key, activate, verify)


async def _keys_checked(
    state: BrokerState, sent: Configured, new_key: str | None, activate: bool, verify: bool
) -> Result:
    session, _ = sent
    name = session.profile.name
    store = state.sessions.store
    checked = store.credentials(name).client_keys
    if activate and verify:
        probe = _probe(state, session, store.credentials(name))
        try:
            await probe.check_client(next_key=True)
        except UpstreamFault as exc:
            raise UpstreamUnavailable(f"could not check the next key of profile {name!r}: {exc}") from None
    waited = "its next key was checked at the identity provider" if activate and verify else "it waited its turn"
    session = _unchanged(state, sent, waited)
    if store.credentials(name).client_keys != checked:  # the key checked is not the one that would be activated
        raise Overloaded(
            f"the keys of profile {name!r} changed while its next key was being checked (another `rotate "
            "--key` or a logout); nothing was activated: look at `dc-broker keys` and run the command again",
            retry_after=1.0,
        )
    return _store_keys(state, session, new_key, activate, verified=activate and verify)


def _store_keys(state: BrokerState, session: Session, new_key: str | None, activate: bool, *, verified: bool) -> Result:
    name = session.profile.name
    store = state.sessions.store
    current = store.credentials(name)
    creds, keys = clientkeys.changed(current, new_key=new_key, activate=activate, now=time.time())
    store.set_credentials(name, creds)
    session.secrets_stored(frozenset({"client_keys"}))
    if activate or current.client_keys is None:  # a next key changes nothing until it is activated
        session.credentials_changed()
    return {"profile": name, "stored": ["client_keys"], "verified": verified, "jwks": keys.public_jwks()}


def op_logout(state: BrokerState, caller: Caller, args: Args, now: float) -> Awaitable[Result]:
    """End the profile's login (``Session.logout``: the client secret and keys stay). With ``forget``
    (`dc-broker remove`), every record the store holds for the profile goes too, right after.
    Who may: as for any change of its login (``administered``); ``forget`` takes the profile's
    client secret and keys from everyone who relies on them, as `remove` takes the profile: the
    broker's owner only. Decided before anything is done."""
    checked = OpArgs.from_wire("logout", args)
    session = administered(state.sessions, caller, checked["profile"])
    forget = bool(checked.get("forget", False))
    if forget and not is_owner(caller):
        raise Forbidden(
            f"uid {caller.uid} may not forget the secrets of profile {checked['profile']!r}: that is "
            "`dc-broker remove`, for the broker's owner; a profile's admin may log it out (`dc-broker logout`) "
            "or store new secrets (`dc-broker rotate`)"
        )
    return _logout(state, session, forget=forget, still=_still_admin_of_logout(state, caller, session))


def _still_admin_of_logout(state: BrokerState, caller: Caller, session: Session) -> Callable[[], None]:
    """A logout's ``still``, asked once it holds the login (a refresh at a slow IdP may hold it for
    minutes): the caller still administers the profile (``_still_admin``), unless the profile was
    removed meanwhile: logging out (and forgetting) a removed profile's login leaves nothing behind."""
    still = _still_admin(state, caller, session)

    def check() -> None:
        if not session.retired:
            still()

    return check


async def _logout(
    state: BrokerState, session: Session, *, forget: bool = False, still: Callable[[], None] | None = None
) -> Result:
    sent = (session, session.profile)
    ended = await session.logout(still=still, keep_unreached=not forget)
    forgotten = _forget(state, sent) if forget else None  # no checkpoint since the logout's last write
    await state.settle_files([session.profile.name])  # its token files are gone before the reply
    grant = session.profile.grant
    forgot = {"password": "password", "client_credentials": "client secret"}.get(grant, "refresh token")
    if session.profile.signs_in_with() is not None:
        forgot = "token"  # its client key, certificate or assertion file is who the client is: it stays
    kept = (
        forgotten is None
        and grant != "client_credentials"
        and session.store.credentials(session.profile.name).client_secret is not None
    )
    result: Result = {
        "profile": session.profile.name,
        "revoked": ended in (Ended.SESSION, Ended.REVOKED),
        "ended": ended.value,
        "forgotten": forgot,
        "kept_client_secret": kept,
    }
    if forgotten is not None:
        result["forgot_profile"] = True  # its absence: a broker that does not know `forget`
        result["forgot_fields"] = forgotten
    return result


def _forget(state: BrokerState, sent: Configured) -> list[str]:
    """Remove every record the store holds for ``sent``'s profile, just logged out (what `logout`
    keeps: the client secret and keys; tokens or anything else a record holds); the names of what
    it held. Only for the profile the request was for: one changed (or removed and added again)
    while the logout waited keeps its records (``Overloaded``: it is logged out, nothing forgotten).
    One removed meanwhile has them forgotten: no configured profile uses them."""
    name = sent[1].name
    try:
        _unchanged(state, sent, "it was logged out")
    except UnknownProfile:
        pass
    except Overloaded:
        raise Overloaded(
            f"profile {name!r} was changed while it was logged out (`dc-broker add --force`, `set` or a reload); "
            "it is logged out, but nothing else of it was forgotten: look at `dc-broker list`, then run the "
            "command again",
            retry_after=1.0,
        ) from None
    store = state.sessions.store
    fields = _held(store, name)
    store.remove(name)
    return fields


def _held(store: SecretStore, name: str) -> list[str]:
    """The names of the records the store holds for profile ``name`` (``unreadable``: one it cannot
    read, a corrupt one or from a newer dc-broker; it is forgotten all the same)."""
    fields: set[str] = set()
    try:
        held = store.credentials(name)
        fields.update(held.held(f.name for f in dataclasses.fields(held)))
    except RecordCorrupt:
        fields.add("unreadable")
    try:
        if store.saved_tokens(name) is not None:
            fields.add("tokens")
    except RecordCorrupt:
        fields.add("unreadable")
    return sorted(fields)


def audited(op: str, handler: Handler) -> Handler:
    """``handler`` with an ``admin_change`` event for each use: who, which op, which profile, and
    how it ended (ok, or the error code), when it ends. Only names: never a value it carried."""

    def run(state: BrokerState, caller: Caller, args: Args, now: float) -> Any:
        profile = args.get("profile") if isinstance(args.get("profile"), str) else None
        given = sorted(k for k in ("password", "client_secret", "new_key", "activate_key", "forget") if args.get(k))
        note = _AdminNote(op, profile, caller, given)
        try:
            result = handler(state, caller, args, now)
        except BaseException as exc:
            note.done(exc)
            raise
        if isinstance(result, dict):
            note.done(None)
            return result
        if isinstance(result, AsyncIterator):
            return note.stream(result)
        return note.wait(result)

    return run


class _AdminNote:
    def __init__(self, op: str, profile: str | None, caller: Caller, given: list[str]) -> None:
        self.op, self.profile, self.caller, self.given = op, profile, caller, given

    def done(self, exc: BaseException | None) -> None:
        if isinstance(exc, Forbidden):
            return  # a refusal, not a change: the server writes its caller_refused event
        code = None if exc is None else getattr(exc, "code", "internal")
        fields: dict[str, Any] = {
            "op": self.op,
            "result": "ok" if exc is None else "error",
            **caller_fields(self.caller),
        }
        if self.profile:
            fields["profile"] = self.profile
        if code:
            fields["error_code"] = code
        if self.given:
            fields["fields"] = ",".join(self.given)
        where = f" of profile {self.profile}" if self.profile else ""
        outcome = "done" if exc is None else f"failed ({code})"
        events.emit("admin_change", "%s%s by %s: %s", self.op, where, self.caller.describe(), outcome, **fields)
        if exc is None and self.op in ("lock", "unlock"):
            verb = "locked" if self.op == "lock" else "unlocked"
            events.emit(
                f"vault_{verb}",
                "vault %s by %s",
                verb,
                self.caller.describe(),
                by="caller",
                **caller_fields(self.caller),
            )

    async def wait(self, pending: Awaitable[Result]) -> Result:
        try:
            result = await pending
        except BaseException as exc:
            self.done(exc)
            raise
        self.done(None)
        return result

    async def stream(self, pending: AsyncIterator[Result]) -> AsyncIterator[Result]:
        try:
            async for item in pending:
                yield item
        except BaseException as exc:
            self.done(exc)
            raise
        self.done(None)


async def _after_program(state: BrokerState, caller: Caller, args: Args, now: float, handler: Handler) -> Result:
    await state.programs.attest(caller)
    result = handler(state, caller, args, state.clock())
    if isinstance(result, dict):
        return result
    assert not isinstance(result, AsyncIterator)
    return await result


async def _stream_after_program(
    state: BrokerState, caller: Caller, args: Args, now: float, handler: Handler
) -> AsyncIterator[Result]:
    await state.programs.attest(caller)
    result = handler(state, caller, args, state.clock())
    assert isinstance(result, AsyncIterator)
    async for item in result:
        yield item


def _program_first(handler: Handler, *, stream: bool = False) -> Handler:
    """``handler``, once the caller's program hash is settled (module docstring)."""

    def first(
        state: BrokerState, caller: Caller, args: Args, now: float
    ) -> Result | Awaitable[Result] | AsyncIterator[Result]:
        if state.program_pending(caller):
            after = _stream_after_program if stream else _after_program
            return after(state, caller, args, now, handler)
        return handler(state, caller, args, now)

    return first


HANDLERS: dict[str, Handler] = {
    "hello": op_hello,
    "token": op_token,  # its own check: it is the hot path
    "invalidate": _program_first(op_invalidate),
    "status": _program_first(op_status),
    "watch": _program_first(op_watch, stream=True),
    "login": _program_first(op_login, stream=True),
    "unlock": op_unlock,
    "lock": op_lock,
    "reload": op_reload,
    "set_secrets": op_set_secrets,  # its own wait for the program: what it was sent for is kept
    "logout": _program_first(op_logout),
    "metrics": _program_first(op_metrics),
    "id_token": _program_first(op_id_token),
}
for _op in ("login", "unlock", "lock", "reload", "set_secrets", "logout"):
    HANDLERS[_op] = audited(_op, HANDLERS[_op])

# the contract (dc_token.protocol.OPS) names the ops; this table implements each of them, no more
if set(HANDLERS) != OPS:
    raise ImportError(f"ops.HANDLERS and protocol.OPS disagree: {sorted(set(HANDLERS) ^ OPS)}")
