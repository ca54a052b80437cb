"""User sessions and refresh tokens, with Keycloak's expiry rules. Pure: ``now`` is always a parameter.

Invariants (Keycloak's, see /work/shared/keycloak.md):

* An online session dies at ``last_refresh + sso_idle`` or ``started + sso_max``, whichever is first;
  a refresh resets ``last_refresh``. A refresh token minted at ``now`` expires at
  ``min(now + sso_idle, started + sso_max)``, fixed at minting (it is a JWT in Keycloak).
* An offline session (scope ``offline_access``) has refresh tokens without expiry
  (``refresh_expires_in`` 0) but dies after ``offline_idle`` without a refresh.
* Access tokens of an online session never outlive ``started + sso_max``.
* "Expired" means ``now > deadline`` (Keycloak: ``currentTime > exp``), so a token is still good at
  its exact deadline.
* A killed session (logout, admin "log out all sessions") stays in the store so its refresh tokens
  answer "Session not active" rather than "Invalid refresh token".
* A user session is the browser's SSO session too; clients *attach* to it (a grant, a code exchange)
  and *detach* from it (a revoked refresh token, a reused one): a detached client's refresh tokens
  answer "Session doesn't have required client", while the user session, and its SSO, live on.
  Only the logout endpoint (or an admin) ends the user session itself.
* With rotation (Keycloak's ``validateTokenReuse``): the refresh token a client last presented is its
  current one, with a use count; presenting another one issued before the client's last refresh is
  "Stale token", using the current one more than the realm's max reuse allows is "Maximum allowed
  refresh token reuse exceeded"; either detaches the client.

Refresh tokens are random opaque strings; the store maps them to ``RefreshToken`` records.
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass, field

from dc_broker.devidp.realm import DevRealm


@dataclass
class UserSession:
    sid: str
    realm: str
    username: str
    client_id: str
    started: float
    last_refresh: float
    offline: bool
    alive: bool = True
    #: the clients attached to this session (its SSO outlives a client that detaches)
    clients: set[str] = field(default_factory=set)
    #: rotation: each client's current refresh token (the one it last presented), its uses, and when
    #: the client last refreshed (a token issued before that is stale)
    current_refresh: dict[str, str] = field(default_factory=dict, repr=False)
    refresh_uses: dict[str, int] = field(default_factory=dict)
    refreshed_at: dict[str, float] = field(default_factory=dict)

    def idle_deadline(self, realm: DevRealm) -> float:
        return self.last_refresh + (realm.offline_idle if self.offline else realm.sso_idle)

    def max_deadline(self, realm: DevRealm) -> float | None:
        return None if self.offline else self.started + realm.sso_max

    def active(self, realm: DevRealm, now: float) -> bool:
        if not self.alive or now > self.idle_deadline(realm):
            return False
        limit = self.max_deadline(realm)
        return limit is None or now <= limit

    def refresh_lifetime(self, realm: DevRealm, now: float) -> float | None:
        """Seconds a refresh token minted now lives; None = no expiry (offline)."""
        if self.offline:
            return None
        return max(0.0, min(realm.sso_idle, self.started + realm.sso_max - now))

    def access_lifetime(self, realm: DevRealm, now: float) -> float:
        limit = self.max_deadline(realm)
        if limit is None:
            return realm.access_lifespan
        return max(0.0, min(realm.access_lifespan, limit - now))


@dataclass
class RefreshToken:
    value: str = field(repr=False)
    sid: str
    realm: str
    client_id: str
    issuer: str
    scope: str
    issued_at: float
    expires_at: float | None
    uses: int = 0

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now > self.expires_at


@dataclass
class SessionStore:
    sessions: dict[str, UserSession] = field(default_factory=dict)
    refresh_tokens: dict[str, RefreshToken] = field(default_factory=dict, repr=False)
    revoked_access: set[str] = field(default_factory=set)

    def start(self, realm: str, username: str, client_id: str, *, now: float, offline: bool) -> UserSession:
        session = UserSession(
            sid=str(uuid.uuid4()),
            realm=realm,
            username=username,
            client_id=client_id,
            started=now,
            last_refresh=now,
            offline=offline,
            clients={client_id} if client_id else set(),
        )
        self.sessions[session.sid] = session
        return session

    def mint_refresh(
        self, session: UserSession, realm: DevRealm, *, issuer: str, scope: str, now: float
    ) -> tuple[RefreshToken, float | None]:
        """A new refresh token for ``session`` and its lifetime in seconds (None = no expiry)."""
        lifetime = session.refresh_lifetime(realm, now)
        record = RefreshToken(
            value=secrets.token_urlsafe(48),
            sid=session.sid,
            realm=session.realm,
            client_id=session.client_id,
            issuer=issuer,
            scope=scope,
            issued_at=now,
            expires_at=None if lifetime is None else now + lifetime,
        )
        self.refresh_tokens[record.value] = record
        return record, lifetime

    def refresh_token(self, value: str) -> RefreshToken | None:
        return self.refresh_tokens.get(value)

    def session(self, sid: str) -> UserSession | None:
        return self.sessions.get(sid)

    def kill(self, sid: str) -> None:
        session = self.sessions.get(sid)
        if session is not None:
            session.alive = False

    def detach(self, sid: str, client_id: str) -> None:
        """``client_id``'s part of the session ends; the session (and its SSO) lives on."""
        session = self.sessions.get(sid)
        if session is not None:
            session.clients.discard(client_id)
            for per_client in (session.current_refresh, session.refresh_uses, session.refreshed_at):
                per_client.pop(client_id, None)

    def kill_matching(self, realm: str, username: str | None = None) -> int:
        killed = 0
        for session in self.sessions.values():
            if session.realm != realm or not session.alive:
                continue
            if username is None or session.username.lower() == username.lower():
                session.alive = False
                killed += 1
        return killed
