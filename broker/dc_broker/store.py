"""Where a profile's secrets and its latest tokens live: the ``SecretStore`` interface and the
in-memory store that ``dc-broker dev`` and ``dc-broker run --secrets-stdin`` use.

Sessions depend only on ``SecretStore``. Token sets cross this interface with *wall-clock* times
(unix seconds), so what a store keeps stays meaningful after a restart. Its one hard rule:
``save_tokens`` returns only once the new tokens (above all a rotated refresh token) are as durable
as the store can make them, so a session drops the old refresh token only after the new one is
safe. The encrypted vault implements the same interface on disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from dc_broker.oidc import TokenSet
from dc_broker.secret import Secret


@dataclass(frozen=True, slots=True)
class Credentials:
    """A profile's long-lived secrets. Any may be absent."""

    password: Secret | None = None
    client_secret: Secret | None = None
    refresh_token: Secret | None = None  # from an interactive (device) login


class SecretStore(Protocol):
    def credentials(self, profile: str) -> Credentials: ...

    def set_credentials(self, profile: str, credentials: Credentials) -> None: ...

    async def save_tokens(self, profile: str, tokens: TokenSet) -> None: ...

    async def forget_tokens(self, profile: str) -> None: ...

    def saved_tokens(self, profile: str) -> TokenSet | None: ...


class MemoryStore:
    """Secrets only in this process's memory: gone when it exits, never written anywhere."""

    def __init__(self, credentials: dict[str, Credentials] | None = None) -> None:
        self._credentials: dict[str, Credentials] = dict(credentials or {})
        self._tokens: dict[str, TokenSet] = {}

    def __repr__(self) -> str:
        return f"MemoryStore(profiles={sorted(self._credentials)!r})"

    def set_credentials(self, profile: str, credentials: Credentials) -> None:
        self._credentials[profile] = credentials

    def credentials(self, profile: str) -> Credentials:
        return self._credentials.get(profile, Credentials())

    async def save_tokens(self, profile: str, tokens: TokenSet) -> None:
        self._tokens[profile] = tokens

    async def forget_tokens(self, profile: str) -> None:
        self._tokens.pop(profile, None)

    def saved_tokens(self, profile: str) -> TokenSet | None:
        return self._tokens.get(profile)
