"""What a profile holds: the tokens an IdP granted (``TokenSet``) and its long-lived secrets
(``Credentials``). Pure values: the vault stores them, sessions make and use them, the server reads
them; this module imports neither httpx nor trio nor anything of the broker but ``Secret``.

Must never: do I/O, know about the wire, or show a secret (every secret field is a ``Secret``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from dc_broker.secret import Secret


@dataclass(frozen=True, slots=True, weakref_slot=True)
class TokenSet:
    """What a token endpoint granted. Times are on the caller's clock (the one ``now`` came from)."""

    access_token: Secret
    obtained_at: float
    expires_at: float
    token_type: str = "Bearer"
    refresh_token: Secret | None = None
    refresh_expires_at: float | None = None
    scope: str | None = None
    id_token: Secret | None = None
    #: the profile's ``login_fingerprint`` when these tokens were stored (None: not recorded)
    issued_for: str | None = None
    #: what was odd about the answer that granted them (a missing ``expires_in``...), for the log;
    #: never stored, never a secret
    notes: tuple[str, ...] = ()

    @property
    def lifetime(self) -> float:
        return self.expires_at - self.obtained_at


@dataclass(frozen=True, slots=True)
class Credentials:
    """A profile's long-lived secrets. Any may be absent."""

    password: Secret | None = None
    client_secret: Secret | None = None
    refresh_token: Secret | None = None  # from an interactive (device) login
    #: the client's own private keys (private_key_jwt), a key set as ``dc_broker.idp.clientkeys``
    #: writes it: the one that signs and, during a rotation, the next one
    client_keys: Secret | None = None

    def held(self, fields: Iterable[str]) -> list[str]:
        """Which of ``fields`` (names of this class's fields) these credentials hold, sorted."""
        return sorted(f for f in set(fields) if getattr(self, f) is not None)

    def without(self, fields: Iterable[str]) -> Credentials:
        """These credentials with ``fields`` absent."""
        return replace(self, **dict.fromkeys(fields))
