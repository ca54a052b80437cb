"""What an attempt's outcome does to a session (``Concluding``, the layer above ``performing``):
``_conclude`` is the one place an outcome moves the state, if its generation is still current (an
outcome of an older generation is dropped, but a refresh token the IdP rotated on the way is kept
first: ``_keep_rotated``); ``_accept`` is the one place new tokens become current (stored first,
then served, then scheduled); ``_failed`` schedules the retry after a failure.
"""

from __future__ import annotations

import logging

from dc_broker.errors import ConfigError, MaybeLocked, UpstreamFault
from dc_broker.observe import events
from dc_broker.observe.counters import failure_reason
from dc_broker.secret import Secret
from dc_broker.sessions.base import MAX_NOTES, Outcome
from dc_broker.sessions.performing import Performing, broker_error
from dc_broker.sessions.states import ACTIVE, Event
from dc_broker.tokens import TokenSet
from dc_token.errors import (
    BrokerError,
    CredentialsRejected,
    Locked,
    LoginRequired,
    UpstreamError,
    UpstreamUnavailable,
)

log = logging.getLogger("dc_broker.sessions")


class Concluding(Performing):
    """An attempt's outcome, applied to the session."""

    __slots__ = ()

    async def _conclude(self, gen: int, outcome: Outcome, presented: Secret | None, began: str | None = None) -> None:
        """The one place an attempt's outcome moves the session, if its generation is still current."""
        name = self.profile.name
        if gen != self.generation:
            if isinstance(outcome, TokenSet):
                await self._keep_rotated(outcome, presented, began)
            log.debug("profile %s: an attempt of generation %d ended after a change; its outcome is dropped", name, gen)
            return
        if not isinstance(outcome, TokenSet) and (reason := failure_reason(outcome)) is not None:
            if reason == "maybe_locked" and not (self._proven and self._lockouts < len(self.policy.lockout_waits)):
                reason = "credential_wrong"  # never accepted, or waited out: taken for a wrong password
            self.counts.failure(name, reason)
        if isinstance(outcome, TokenSet):
            await self._accept(outcome, Event.GRANTED, gen)
        elif isinstance(outcome, Locked):
            self.last_error = outcome
            self.schedule = self.schedule.stopped()
            self._event(Event.LOCK)
            log.debug("profile %s: waiting for `dc-broker unlock`", name)
        elif isinstance(outcome, MaybeLocked) and self._proven and self._lockouts < len(self.policy.lockout_waits):
            wait = self.policy.lockout_waits[self._lockouts]
            self._lockouts += 1
            told = UpstreamUnavailable(
                f"profile {name!r}: the identity provider refuses the password of user {self.profile.username!r}, "
                "which it accepted before: Keycloak's brute-force detection answers so while it locks an account, "
                f"and the lock lifts by itself; asking again in {wait:.0f} s ({self._lockouts} of "
                f"{len(self.policy.lockout_waits)})"
            )
            self._failed(outcome, told, outcome.message, wait)
        elif isinstance(outcome, LoginRequired | CredentialsRejected | ConfigError):
            err = outcome if isinstance(outcome, BrokerError) else CredentialsRejected(f"profile {name!r}: {outcome}")
            self.last_error = err
            if isinstance(err, LoginRequired) and not self._token_valid():
                self.token = None  # a corrupt record must not drop a still-valid token
            self.schedule = self.schedule.stopped()
            self._event(Event.NEED_LOGIN if isinstance(err, LoginRequired) else Event.REFUSED)
            # the message names the profile already; the log line's own "profile %s" is its field
            log.warning("profile %s: %s", name, err.message.removeprefix(f"profile {name!r}: "))
        elif isinstance(outcome, UpstreamFault):
            self._failed(outcome, broker_error(name, outcome), str(outcome))
        else:  # the parent login behind a scope could not give a token: the parent's error, as it said it
            kind = UpstreamError if isinstance(outcome, UpstreamError) else UpstreamUnavailable
            self._failed(outcome, kind(outcome.message), outcome.message)

    def _failed(self, exc: UpstreamFault | BrokerError, told: BrokerError, said: str, wait: float = 0.0) -> None:
        now = self.clock()
        self.schedule = self.schedule.failed(
            self.policy, now=now, rand=self.rng.random(), retry_after=exc.retry_after, wait=wait
        )
        told.retry_after = delay = self.schedule.backoff_until - now
        self.last_error = told
        self._event(Event.FAILED_STALE if self._token_valid() else Event.FAILED)
        log.warning(
            "profile %s: refresh failed (%s); retry %d in %.1f s",
            self.profile.name,
            said,
            self.schedule.failures,
            delay,
        )

    def _token_valid(self) -> bool:
        return self.token is not None and self.token.expires_at > self.clock()

    async def _keep_rotated(self, tokens: TokenSet, presented: Secret | None, began: str | None = None) -> None:
        """An attempt of an older generation brought new tokens. If the IdP rotated the refresh token
        it presented, that one is dead now: the new one replaces it wherever it still stands (in
        memory, else in the store: as the login of the settings the attempt ``began`` for, so a
        reload that changed whom the login is for never gets the old login back as its own). If the
        login was replaced meanwhile, the old login's new token has nowhere to go."""
        name = self.profile.name
        if presented is None or tokens.refresh_token is None or tokens.refresh_token == presented:
            return
        current = self.token
        if current is not None and current.refresh_token == presented and self.state in ACTIVE:
            await self._accept(tokens, Event.GRANTED, self.generation, keep_schedule=True)
            return
        try:
            saved = self.store.saved_tokens(name)
            if saved is not None and saved.refresh_token == presented:
                await self._save(tokens, issued_for=began)
                self._rotated()
                log.info("profile %s: stored the refresh token the IdP rotated during a change", name)
                return
        except BrokerError as exc:
            log.warning("profile %s: could not keep the rotated refresh token: %s", name, exc.message)
            return
        log.info("profile %s: a refresh that ended after the login was replaced is dropped", name)

    async def _accept(self, tokens: TokenSet, event: Event, gen: int, *, keep_schedule: bool = False) -> bool:
        """The one place new tokens become current: stored first (durable before the old refresh
        token is dropped; stores keep wall-clock times), then served, then scheduled. Returns whether
        they became current (not if the session changed while they were being stored)."""
        for note in tokens.notes:
            noted = self._noted if self._noted is not None else set()
            if note not in noted and len(noted) < MAX_NOTES:
                noted.add(note)
                self._noted = noted
                log.warning("profile %s: the identity provider's answer is odd: %s", self.profile.name, note)
        try:
            if self.parent is None:
                await self._save(tokens)
        except Exception:
            # keep serving from memory: with rotation the old refresh token is already dead
            log.exception("profile %s: could not store the new tokens", self.profile.name)
        if gen != self.generation or self.store.locked:
            return False  # locked, logged out or replaced while storing: they are stored, not current
        if event is Event.ADOPTED:
            self._session_capped = False
            self._refresh_life = None
        # At SSO Session Max the IdP grants refresh tokens with ever shorter lives (max - elapsed);
        # below Max their life is the idle timeout, the same every time. (Comparing deadlines
        # instead misfires when a scope narrowing has just pushed the deadline.) An answer that kept
        # the refresh token and its deadline (RFC 6749 section 6) says nothing about either.
        old = self.token
        if not (
            old is not None
            and tokens.refresh_token is not None
            and tokens.refresh_token == old.refresh_token
            and tokens.refresh_expires_at == old.refresh_expires_at
        ):
            life = None if tokens.refresh_expires_at is None else tokens.refresh_expires_at - tokens.obtained_at
            self._session_capped = (
                life is not None and self._refresh_life is not None and life < self._refresh_life - 2.0
            )
            if not self._session_capped:
                self._refresh_life = life
        if (
            event is Event.GRANTED
            and old is not None
            and old.refresh_token is not None
            and tokens.refresh_token is not None
            and tokens.refresh_token != old.refresh_token
        ):
            self._rotated()
        self.token = tokens
        self.last_error = None
        self.last_refresh_at = self.clock()
        self.refreshes += 1
        self._proven, self._lockouts = True, 0
        if not keep_schedule:
            self.schedule = self.schedule.granted(self._refresh_time(tokens, capped=self._session_capped))
        self._event(event)
        self._announce()
        return True

    def _rotated(self) -> None:
        name = self.profile.name
        self.counts.rotation(name)
        events.emit(
            "refresh_token_rotated",
            "profile %s: the identity provider rotated the refresh token",
            name,
            profile=name,
            generation=self.generation,
        )
