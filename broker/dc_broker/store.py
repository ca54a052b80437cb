"""Where a profile's secrets and its latest tokens live: the ``SecretStore`` interface and the
in-memory store that ``dc-broker dev`` and ``dc-broker run --secrets-stdin`` use.

Sessions depend only on ``SecretStore``. Token sets cross this interface with *wall-clock* times
(unix seconds), so what a store keeps stays meaningful after a restart. Its one hard rule:
``save_tokens`` returns only once the new tokens (above all a rotated refresh token) are as durable
as the store can make them, so a session drops the old refresh token only after the new one is
safe. The encrypted vault implements the same interface on disk.

The interface is complete: locking (``lockable``, ``locked``, ``lock``, ``unlock``,
``failed_unlocks``) and ``close`` are part of it, so nothing above a store asks what kind it is. The
memory store never locks (``lockable`` is False; ``lock``/``unlock`` change nothing) and has nothing
to close.

Must never: return from ``save_tokens`` before the tokens are as durable as it can make them; keep a
secret anywhere but in ``Secret`` values.
"""

from __future__ import annotations

from typing import Protocol

from dc_broker.secret import Secret
from dc_broker.tokens import Credentials, TokenSet
from dc_token.errors import BrokerError


class SecretStore(Protocol):
    #: wrong passphrases since the last unlock (the daemon slows the next attempt by it)
    failed_unlocks: int

    @property
    def lockable(self) -> bool:
        """Whether ``lock`` can take the secrets away (the vault) or is a no-op (the memory store)."""
        ...

    @property
    def locked(self) -> bool: ...

    def lock(self) -> None: ...

    def unlock(self, passphrase: Secret | None = None) -> None: ...

    def close(self) -> None: ...

    def credentials(self, profile: str) -> Credentials: ...

    def set_credentials(self, profile: str, credentials: Credentials) -> None: ...

    async def save_tokens(self, profile: str, tokens: TokenSet) -> None: ...

    async def forget_tokens(self, profile: str) -> None: ...

    def saved_tokens(self, profile: str) -> TokenSet | None: ...

    def remove(self, profile: str) -> bool:
        """Forget every record of the profile (credentials of any kind, saved tokens); whether there
        was one. A profile stored again later starts with nothing of these."""
        ...

    def saved_tokens_all(self) -> dict[str, TokenSet | BrokerError]:
        """Every profile's saved tokens at once (a profile whose record cannot be read: its error)."""
        ...


class MemoryStore:
    """Secrets only in this process's memory: gone when it exits, never written anywhere."""

    failed_unlocks = 0

    def __init__(self, credentials: dict[str, Credentials] | None = None) -> None:
        self._credentials: dict[str, Credentials] = dict(credentials or {})
        self._tokens: dict[str, TokenSet] = {}

    def __repr__(self) -> str:
        return f"MemoryStore(profiles={sorted(self._credentials)!r})"

    @property
    def lockable(self) -> bool:
        return False

    @property
    def locked(self) -> bool:
        return False

    def lock(self) -> None:
        """Nothing to lock: the secrets are this process's memory (``lockable`` is False)."""

    def unlock(self, passphrase: Secret | None = None) -> None:
        """Never locked."""

    def close(self) -> None:
        """Nothing to close."""

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

    def saved_tokens_all(self) -> dict[str, TokenSet | BrokerError]:
        return dict(self._tokens)

    def remove(self, profile: str) -> bool:
        had = self._credentials.pop(profile, None) is not None
        return self._tokens.pop(profile, None) is not None or had
