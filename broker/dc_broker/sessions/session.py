"""One ``Session`` per profile: the current token, its refresh task, single-flight, and what a person
does to its login (lock, unlock, login, logout, new credentials, new settings).

A session owns exactly one login. Its background task (``run``) refreshes ahead of expiry as its
``Schedule`` says (``sessions.schedule``, the rules in ``policy``), retries with backoff when the IdP
fails, and is the only code that refreshes this login, so there is never more than one request in
flight per login: callers that need a token the current one cannot satisfy wake the task and wait
for the *round* in progress, sharing its result (single-flight). Reads that the current token
satisfies never wait (``peek``). Every use of this login's refresh token (the refresh task, a
per-scope narrowing, logout, a password login) holds ``_login_lock``.

**Attempts and generations.** The state (``sessions.states``) says what the login and token are; an
attempt at the IdP is tracked apart from it (``attempt``), with the ``generation`` it started in.
Lock, unlock, an adopted login, logout, a credentials or settings change all bump the generation; an
attempt whose generation has moved on has its outcome dropped, except that a refresh token the IdP
rotated on the way is kept first (``_keep_rotated``): the IdP has already killed its predecessor.

**A sent refresh is precious.** A refresh request's answer holds the only copy of the next refresh
token: the transport reads it patiently, and if it is lost anyway, the refresh token is presented
again only after the IdP has answered something harmless (``Login.refresh_in_doubt``).

**Layers.** A ``Session`` is this module's class over four layers, each a module a reader takes in
one sitting with only the layers below it in mind: ``base`` (what the login is, and the reads that
never go to the IdP), ``performing`` (the flows' steps performed at the edge: the one place a
request leaves for the IdP), ``outcomes`` (what an attempt's outcome does; the one place new tokens
become current, ``_accept``: stored before the old refresh token is dropped, then current) and
``logins`` (logins outside the refresh task, and logout). This module adds what a person or the
config changes, the background task's attempts (``_attempt``), and ``status``.

What to send and what an answer means is decided by the pure flows (``flows``), stepped by the one
driver (``driver``); the schedule is one value (``schedule``). Time comes from ``clock``
(``trio.current_time`` by default, so trio's MockClock drives it in tests). No layer builds an HTTP
request nor parses an answer itself.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable
from typing import Any

import trio

from dc_broker.config import Profile
from dc_broker.errors import ConfigError, RecordCorrupt, UpstreamFault
from dc_broker.idp import assertions
from dc_broker.observe import events
from dc_broker.secret import Secret
from dc_broker.sessions import flows, policy
from dc_broker.sessions.base import UNREAD, Attempt, Outcome, Unread, shift_times
from dc_broker.sessions.logins import PersonLogins
from dc_broker.sessions.states import WAITING_FOR_PERSON, Event, State
from dc_broker.tokens import TokenSet
from dc_token.errors import (
    BrokerError,
    InternalError,
    Locked,
)

__all__ = ["UNREAD", "Session", "shift_times"]

log = logging.getLogger("dc_broker.sessions")


class Session(PersonLogins):
    """The live state of one profile's login (the layers below: ``sessions.base``)."""

    __slots__ = ()

    # ------------------------------------------------------------ what a person (or the config) changes

    def reconfigure(self, profile: Profile) -> None:
        """The profile's settings changed (same name). A change of who may use or change it, or of
        its token files, applies at once and keeps the login (``Profile.same_login``); the sink task
        is woken to look again. A change of whom its tokens are for (IdP, client, grant, user,
        scope: ``login_fingerprint``) drops the login; any other means new endpoints and a new
        attempt now."""
        if self.profile.same_login(profile):
            self.profile = profile
            self._announce()  # the token files' task rereads profile.sinks; watchers see no new token
            return
        stale = self.profile.stale_secrets(profile)
        fingerprint = profile.login_fingerprint()
        relogin = fingerprint != self._fingerprint
        self.profile, self._fingerprint = profile, fingerprint
        self._endpoints = None
        if stale:
            self._drop_secrets(stale)  # before the new login below sends what is stored
        self.credentials_changed(relogin=relogin)

    def _drop_secrets(self, fields: frozenset[str]) -> None:
        """Remove ``fields`` (with those a locked vault kept waiting) from this profile's stored
        credentials, as stored now; with the vault locked, remember them for ``resume``."""
        if self.store.locked:
            self._secrets_to_drop |= fields
            return
        fields, self._secrets_to_drop = fields | self._secrets_to_drop, frozenset()
        name = self.profile.name
        try:
            creds = self.store.credentials(name)
        except RecordCorrupt:
            return  # nothing readable to send; a new login replaces the record
        except Exception as exc:  # the vault fails (a disk error): kept pending, and never sent (``_login``)
            self._not_dropped(fields, exc)
            return
        held = creds.held(fields)
        if not held:
            return
        try:
            self.store.set_credentials(name, creds.without(held))
        except Exception as exc:
            self._not_dropped(fields, exc)
            return
        changed = [k for k, f in (("username", "password"), ("client_id", "client_secret")) if f in fields]
        changed = changed or ["client_id"]  # only the client's keys were asked for: its client changed
        log.warning(
            "profile %s: its %s changed: the stored %s belonged to the old one and was dropped, never sent "
            "under the new settings (`dc-broker status %s` says what to store)",
            name,
            " and ".join(changed),
            " and ".join(f.replace("_", " ") for f in held),
            name,
        )
        events.emit(
            "secrets_dropped",
            "profile %s: stored %s dropped: its %s changed",
            name,
            ", ".join(held),
            " and ".join(changed),
            profile=name,
            dropped=held,
            changed=changed,
            generation=self.generation,
        )

    def _not_dropped(self, fields: frozenset[str], exc: Exception) -> None:
        """The vault failed while ``fields`` were being dropped: they stay pending (dropped at the next
        unlock; until then ``_login`` never sends them, and storing new ones clears them:
        ``secrets_stored``). A reload (or SIGHUP) never fails for it."""
        self._secrets_to_drop |= fields
        log.error(
            "profile %s: the stored %s of its old settings could not be dropped (%s); they are not sent, and "
            "dropping them is tried again at the next unlock",
            self.profile.name,
            " and ".join(sorted(f.replace("_", " ") for f in fields)),
            type(exc).__name__,
        )

    def lock_out(self) -> None:
        """The vault was locked: drop the token from memory and wait for `dc-broker unlock`."""
        self._changed()
        self.token = None
        self.last_error = Locked("the vault is locked; run `dc-broker unlock`")
        self.schedule = self.schedule.stopped()
        self._event(Event.LOCK)
        self._announce()

    def resume(self, read: TokenSet | BrokerError | Unread | None = UNREAD) -> None:
        """After unlock: a stored, still-valid token is served at once and refreshed on its own schedule;
        without one, try now. ``read``: the stored tokens, if the caller read them already."""
        if self.state is State.LOCKED:
            self.last_error = None
            self._event(Event.UNLOCKED)
        if self._secrets_to_drop:  # a reload while locked made them another user's or client's
            self._drop_secrets(frozenset())
        if self.token is None:
            self._restore(read)
        tok = self.token
        now = self.clock()
        if tok is None or tok.expires_at <= now:
            self.credentials_changed()
            return
        self._changed()
        self.schedule = self.schedule.planned(self._refresh_time(tok, capped=False))
        self._event(Event.RESTORED)
        self._poke()  # its refresh is planned anew

    def crashed(self, exc: BaseException, restart_in: float) -> None:
        """The refresh task failed with a bug; its supervisor restarts it in ``restart_in`` seconds.
        The message names only the exception's type: its text could quote anything."""
        self._changed()
        self.crashes += 1
        self.attempt = None
        self.last_error = InternalError(
            f"profile {self.profile.name!r}: the broker failed while refreshing it ({type(exc).__name__}); "
            f"it tries again in {restart_in:.0f} s"
        )
        self._event(Event.CRASHED)
        self.schedule = self.schedule.failed(self.policy, now=self.clock(), rand=1.0, retry_after=None, wait=restart_in)
        self._finish_round()  # callers waiting for a round are told, not left hanging

    @property
    def busy(self) -> bool:
        """An attempt is in flight, or something uses this login at the IdP (``settled`` waits)."""
        return self.attempt is not None or (self._lock is not None and self._lock.locked())

    @property
    def holds_refresh_token(self) -> bool:
        """Its login has a refresh token: an attempt or narrowing in flight may spend it, and its
        answer holds the only copy of the next one (what a stop waits for; a client-credentials or
        password grant cut short loses nothing)."""
        tok = self.token
        return (tok is not None and tok.refresh_token is not None) or self._in_doubt is not None

    async def settled(self) -> None:
        """Return once no attempt is in flight and nothing uses this login at the IdP."""
        while self.attempt is not None:
            await self._round_event().wait()
        async with self._login_lock:
            pass

    # ------------------------------------------------------------ the background task

    def _due_at(self) -> float:
        return self.schedule.due_at(self.policy, demanded=self._demanded)

    def begin(self, first_attempt_delay: float = 0.0) -> None:
        """Plan the first attempt (a scheduler takes the session on): its token's own plan, else after
        the start-up stagger, which never delays a due refresh past its token's life."""
        now = self.clock()
        tok = self.token
        if self.state in WAITING_FOR_PERSON:
            return
        plan = now + first_attempt_delay
        if tok is not None and tok.expires_at > now:  # restored: keep its schedule unless already due
            plan = policy.first_attempt_at(
                self.policy,
                now=now,
                planned_at=self._refresh_time(tok, capped=False),
                expires_at=tok.expires_at,
                delay=first_attempt_delay,
            )
        self.schedule = self.schedule.planned(plan)

    def due(self) -> float:
        """When this session's next attempt starts (inf: not until a person acts)."""
        return math.inf if self.state in WAITING_FOR_PERSON else self._due_at()

    async def step(self) -> None:
        """One attempt, started by the scheduler because it is due; callers that joined during it were
        served by its round."""
        self._demanded = False
        await self._attempt()
        self._demanded = False

    def release_callers(self) -> None:
        """Callers waiting for a round that will not come (a person must act first) are told now."""
        self._demanded = False
        self._finish_round()

    async def run(self, *, first_attempt_delay: float = 0.0) -> None:
        """Keep this profile's token fresh until cancelled: a scheduler of its own (the registry runs
        one for all its sessions)."""
        from dc_broker.sessions.scheduler import Scheduler

        scheduler = Scheduler(self.policy, self.clock)
        async with trio.open_nursery() as nursery:
            await nursery.start(scheduler.run)
            scheduler.add(self, first_attempt_delay)

    async def _attempt(self) -> None:
        """One attempt at the IdP for this login (a narrowing of the parent's, for a child). Its
        generation is the one it holds the login in: whatever changed the session while it waited
        for the lock (a logout, a login) is what it works from, or, if that left a person to act,
        it does not go at all."""
        now = self.clock()
        self.schedule = self.schedule.started(now)
        self.attempt = Attempt(self.generation, now)
        self.counts.attempt(self.profile.name)
        try:
            if (parent := self.parent) is not None:
                assert isinstance(parent, Session)  # a child narrows its parent's login (``logins.narrow``)
                if self.state in WAITING_FOR_PERSON:
                    return  # locked (or told to log in) after the scheduler started this task, before it ran
                gen = self.generation
                await self._conclude(gen, await _outcome(parent.narrow(self.profile.scope or "")), None)
                return
            # held until the new refresh token is stored *and* current: a narrowing call must never
            # pick up the one this refresh just used (with rotation, that kills the session)
            async with self._login_lock:
                if self.state in WAITING_FOR_PERSON:
                    return  # logged out or locked while it waited for the lock
                gen, began = self.generation, self._fingerprint
                self.attempt = Attempt(gen, now)
                presented: Secret | None = None

                async def obtain() -> TokenSet:
                    nonlocal presented
                    login = await self._login()
                    presented = login.refresh_token
                    return await self._drive(flows.obtain(login), self._lost(login.refresh_token))

                outcome = await _outcome(obtain())
                await self._conclude(gen, outcome, presented, began)
        finally:
            self.attempt = None
            self._finish_round()

    # ------------------------------------------------------------ reporting

    def status(self, now: float, wall_now: float | None = None) -> dict[str, Any]:
        wall = time.time() if wall_now is None else wall_now
        tok = self.token
        due = self.next_attempt_at
        out: dict[str, Any] = {
            "profile": self.profile.name,
            "state": self.effective_state(now).value,
            "grant": self.profile.grant,
            "idp": self.profile.describe(),
            "via": self._shown_route(),
            "expires_in": round(tok.expires_at - now, 3) if tok else None,
            "scope": tok.scope if tok else None,
            "refreshing": self.attempt is not None,
            "generation": self.generation,
            "refreshes": self.refreshes,
            "idp_requests": self.idp_requests,
            "last_refresh": round(wall - (now - self.last_refresh_at), 3) if self.last_refresh_at is not None else None,
            "next_refresh_in": round(max(0.0, due - now), 3) if math.isfinite(due) else None,
            "last_error": self.last_error.message if self.last_error else None,
            "error_code": self.last_error.code if self.last_error else None,
            **self._login_end(tok, now),
        }
        if self.profile.auth_method in ("private_key_jwt", "tls_client_auth", "client_assertion_file"):
            out["client_auth"] = assertions.status(self.profile, self._client_keys(), wall)
        return out

    def _login_end(self, tok: TokenSet | None, now: float) -> dict[str, Any]:
        """When this login ends: its refresh token's deadline (None: no deadline, or no refresh
        token); ``final`` once the IdP's SSO Session Max holds it (a refresh no longer moves it);
        ``offline``: an offline token (scope offline_access)."""
        deadline = tok.refresh_expires_at if tok is not None and tok.refresh_token is not None else None
        return {
            "login_ends_in": round(deadline - now, 3) if deadline is not None else None,
            "login_end_final": deadline is not None and self._session_capped,
            "offline": tok is not None and tok.scope is not None and "offline_access" in tok.scope.split(),
        }

    def _client_keys(self) -> Secret | assertions.Unknown | None:
        """The stored client key set, for ``status``; ``UNKNOWN`` when it cannot be read now."""
        if self.profile.auth_method != "private_key_jwt":
            return None
        try:
            return self.store.credentials(self.profile.name).client_keys
        except BrokerError:
            return assertions.UNKNOWN


async def _outcome(work: Awaitable[TokenSet]) -> Outcome:
    """What an attempt ends with: its tokens, or the error that stands for its failure. Anything
    else is a bug and propagates (the registry's supervisor restarts the session's task)."""
    try:
        return await work
    except (BrokerError, UpstreamFault, ConfigError) as exc:
        return exc
