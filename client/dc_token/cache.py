"""What a client keeps between requests, and the pure rules around it: ``Token``, the in-process
``TokenCache``, the cache key of a (profile, scope), the ``token``/``watch`` arguments and when a
cached token expires (a watch stream's rules are ``dc_token.watch``'s). No socket, no lock, no
clock of its own beyond ``time.monotonic`` (patchable as ``_monotonic``). Both clients import it;
dc-token too.

The cache
    Per profile, the last token the broker gave us and the monotonic deadline at which it expires
    (measured from when the request was *sent*, so it errs early). ``token(p, min_ttl=t)`` is served
    from memory while ``deadline - now > t + CACHE_MARGIN``, and never past the moment the broker
    replaces the token (``refresh_in``: some IdPs revoke the old access token when they issue the
    new one). A token asked for with ``scope=`` is cached apart from the profile's own
    (``cache_key``). ``invalidate(p, token)`` drops that token from the cache before telling the broker.
"""

import time

from dc_token.errorbase import RemoteProtocolError
from dc_token.protocol import TokenArgs

# dc-token imports this module on every run: typing, collections.abc and even __future__ cost it
# start-up time, so the annotations that name them are strings (no `from __future__ import annotations`)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any, Final

__all__ = [
    "CACHE_MARGIN",
    "Token",
    "TokenCache",
    "cache_key",
    "cached_token",
    "remember",
    "token_args",
    "token_deadlines",
]

#: seconds of validity a cached token must have beyond the caller's min_ttl to be served from memory
CACHE_MARGIN: "Final" = 5.0
_monotonic = time.monotonic


def cache_key(profile: str, scope: str | None) -> str:
    """The cache entry of (profile, scope): the profile name for its own scope, else name + scope
    (a space never occurs in a profile name)."""
    return f"{profile} {scope}" if scope else profile


def token_args(profile: str, min_ttl: float, scope: str | None) -> "dict[str, Any]":
    """The ``token`` / ``watch`` request arguments, checked as the broker checks them (``TokenArgs``)."""
    return TokenArgs(profile, min_ttl, scope).to_wire()


class Token:
    """One access token as the broker handed it out. The token itself never appears in the repr.

    (A plain slotted class, not a dataclass: ``dataclasses`` costs dc-token milliseconds at start-up.)
    """

    __slots__ = ("expires_at", "profile", "scope", "token", "type")

    def __init__(self, token: str, type: str, expires_at: float, scope: str, profile: str) -> None:
        self.token = token
        self.type = type
        #: unix time (wall clock) at which the token expires
        self.expires_at = expires_at
        self.scope = scope
        self.profile = profile

    def __repr__(self) -> str:
        return (
            f"Token(profile={self.profile!r}, type={self.type!r}, expires_at={self.expires_at!r}, scope={self.scope!r})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Token):
            return NotImplemented
        return (self.token, self.type, self.expires_at, self.scope, self.profile) == (
            other.token,
            other.type,
            other.expires_at,
            other.scope,
            other.profile,
        )

    __hash__ = None  # type: ignore[assignment]

    @property
    def expires_in(self) -> float:
        """Seconds left, by the wall clock (may be negative)."""
        return self.expires_at - time.time()

    @property
    def header(self) -> str:
        """The ``Authorization`` header value."""
        return f"Bearer {self.token}"

    @classmethod
    def from_result(cls, result: "Mapping[str, Any]", profile: str) -> "Token":
        """Shape a ``token``/``watch`` result map; a map without a token string is the peer's fault."""
        token = result.get("token")
        expires_at = result.get("expires_at")
        if not isinstance(token, str) or not isinstance(expires_at, int | float) or isinstance(expires_at, bool):
            raise RemoteProtocolError("token result needs a 'token' string and a numeric 'expires_at'")
        return cls(
            token=token,
            type=str(result.get("type") or "Bearer"),
            expires_at=float(expires_at),
            scope=str(result.get("scope") or ""),
            profile=str(result.get("profile") or profile),
        )


def token_deadlines(result: "Mapping[str, Any]", sent_at: float) -> tuple[float, float]:
    """Monotonic (expiry, fresh-until) of a token, counted from when we asked (so both err early).
    Fresh-until is when the broker replaces it (``refresh_in``): the cache must not serve it past
    that, since some IdPs revoke the old access token when they issue the new one."""
    expires_in = result.get("expires_in")
    if not isinstance(expires_in, int | float) or isinstance(expires_in, bool):
        return sent_at, sent_at  # no lifetime given: never serve it from the cache
    refresh_in = result.get("refresh_in")
    if not isinstance(refresh_in, int | float) or isinstance(refresh_in, bool):
        refresh_in = expires_in
    return sent_at + float(expires_in), sent_at + min(float(refresh_in), float(expires_in))


class TokenCache:
    """Profile -> (monotonic expiry, monotonic fresh-until, Token). Reads take no lock; writes replace
    whole entries."""

    __slots__ = ("_entries", "margin")

    def __init__(self, margin: float = CACHE_MARGIN) -> None:
        self._entries: dict[str, tuple[float, float, Token]] = {}
        self.margin = margin

    def get(self, profile: str, min_ttl: float) -> "Token | None":
        entry = self._entries.get(profile)
        if entry is not None:
            now = _monotonic()
            if entry[0] - now > min_ttl + self.margin and now < entry[1]:
                return entry[2]
        return None

    def put(self, token: "Token", deadline: float, fresh_until: float | None = None, *, key: str | None = None) -> None:
        """Cache ``token`` until ``deadline`` (its expiry) but never past ``fresh_until`` (when the
        broker replaces it), under ``key`` (default: its profile; see ``cache_key``)."""
        key = token.profile if key is None else key
        old = self._entries.get(key)
        if old is None or deadline >= old[0]:  # never replace a newer token with an older one
            self._entries[key] = (deadline, deadline if fresh_until is None else fresh_until, token)

    def forget(self, profile: str, token: str | None = None) -> None:
        """Drop the profile's entries, every scope's (only those holding ``token``, when given)."""
        for key, entry in list(self._entries.items()):
            if (key == profile or key.startswith(profile + " ")) and (token is None or entry[2].token == token):
                self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()


def cached_token(cache: "TokenCache | None", profile: str, scope: str | None, min_ttl: float) -> "Token | None":
    """The cached token of (profile, scope) with more than ``min_ttl`` left, or None (also: no cache)."""
    return None if cache is None else cache.get(cache_key(profile, scope), min_ttl)


def remember(
    cache: "TokenCache | None", result: "Mapping[str, Any]", profile: str, scope: str | None, sent_at: float
) -> "Token":
    """The ``Token`` of a token result, cached (when there is a cache) until its deadlines, which are
    measured from ``sent_at``, when the request left (so they err early)."""
    tok = Token.from_result(result, profile)
    if cache is not None:
        cache.put(tok, *token_deadlines(result, sent_at), key=cache_key(profile, scope))
    return tok
