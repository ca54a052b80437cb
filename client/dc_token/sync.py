"""``TokenClient``: the blocking client, plus the pieces the async client shares (``Token``, ``TokenCache``).

Owns: one reused connection per client (reconnected after a broker restart), an in-process token
cache, and ``watch`` streams on dedicated connections. Must never: hold a secret in a repr, block a
cache hit on the lock or a socket, or import anything heavier than the standard library's cheapest,
msgpack and ``dc_token.protocol`` (dc-token imports this module on every run).

Thread-safety: requests on the shared connection are serialized by a lock (one in flight at a time);
a cache hit takes no lock at all (one dict read, atomic in CPython). Errors are the ``dc_token.errors``
tree: ``BrokerUnavailable`` when nothing listens, one ``BrokerError`` subclass per wire error code.

The cache
    Per profile, the last token the broker gave us and the monotonic deadline at which it expires
    (measured from when the request was *sent*, so it errs early). ``token(p, min_ttl=t)`` is served
    from memory while ``deadline - now > t + CACHE_MARGIN``; otherwise it asks the broker. The broker
    refreshes ahead of expiry, so a miss costs one round trip, never a wait on the identity provider.
    ``invalidate(p, token)`` drops that token from the cache before telling the broker.
    A token asked for with ``scope=`` is cached apart from the profile's own (key ``cache_key``).

Watch
    ``watch`` streams the current token and then each new one on a dedicated connection. When the
    broker goes away (a restart, an upgrade), the stream reconnects by itself: it waits
    ``reconnect_delay`` (0.1 s doubling to 5 s, jittered), connects again and goes on; the token the
    restarted broker serves is yielded only if it differs from the last one. ``reconnect=False``
    raises ``BrokerUnavailable`` instead. A broker that is not there when the watch starts is an
    error at once, not a wait.
"""

from __future__ import annotations

import _thread
import os
import socket
import time
from contextlib import contextmanager

from dc_token.errors import BrokerUnavailable, RemoteProtocolError, error_for_code
from dc_token.paths import default_socket_path
from dc_token.protocol import NEED_DATA, ErrorReply, FrameDecoder, Reply, Request, encode, reply_from_wire

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time (dc-token start-up)
if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping
    from typing import Any, Final

__all__ = ["CACHE_MARGIN", "Token", "TokenCache", "TokenClient", "cache_key", "reconnect_delay"]

_RECV: Final = 65536
#: seconds of validity a cached token must have beyond the caller's min_ttl to be served from memory
CACHE_MARGIN: Final = 5.0
_monotonic = time.monotonic
#: watch reconnects: the n-th consecutive failed attempt waits up to min(CAP, BASE * 2**n) seconds
RECONNECT_BASE: Final = 0.1
RECONNECT_CAP: Final = 5.0


def reconnect_delay(attempt: int, rand: float) -> float:
    """Seconds before watch reconnect attempt ``attempt`` (0 = the first); ``rand`` uniform in [0, 1).
    Jittered to half..all of the ceiling, so the clients of a restarted broker do not arrive at once."""
    return min(RECONNECT_CAP, RECONNECT_BASE * 2.0 ** min(attempt, 16)) * (0.5 + rand / 2)


def _rand() -> float:
    return (time.monotonic_ns() % 1_000_003) / 1_000_003  # jitter only; no random module at start-up


def cache_key(profile: str, scope: str | None) -> str:
    """The cache entry of (profile, scope): the profile name for its own scope, else name + scope
    (a space never occurs in a profile name)."""
    return f"{profile} {scope}" if scope else profile


def token_args(profile: str, min_ttl: float, scope: str | None) -> dict[str, Any]:
    """The ``token`` / ``watch`` request arguments (no ``scope`` key unless one is asked for)."""
    args: dict[str, Any] = {"profile": profile, "min_ttl": min_ttl}
    if scope:
        args["scope"] = scope
    return args


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
    def from_result(cls, result: Mapping[str, Any], profile: str) -> Token:
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


def _deadline(result: Mapping[str, Any], sent_at: float) -> tuple[float, float]:
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

    def get(self, profile: str, min_ttl: float) -> Token | None:
        entry = self._entries.get(profile)
        if entry is not None:
            now = _monotonic()
            if entry[0] - now > min_ttl + self.margin and now < entry[1]:
                return entry[2]
        return None

    def put(self, token: Token, deadline: float, fresh_until: float | None = None, *, key: str | None = None) -> None:
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


class _ClosedByPeer(Exception):
    pass


class TokenClient:
    """Blocking, thread-safe client for one broker socket.

    >>> with TokenClient() as broker:
    ...     token = broker.token("acme", min_ttl=60)

    ``cache=False`` sends every ``token`` request to the broker. ``timeout`` bounds each request
    (``None``: wait forever); ``watch`` streams have no timeout.
    """

    def __init__(self, socket_path: str | None = None, *, timeout: float | None = 60.0, cache: bool = True) -> None:
        self.socket_path = socket_path or default_socket_path()
        self.timeout = timeout
        self.cache: TokenCache | None = TokenCache() if cache else None
        self._sock: socket.socket | None = None
        self._pid = os.getpid()
        self._decoder = FrameDecoder()
        self._next_id = 1
        self._lock = _thread.allocate_lock()

    def __repr__(self) -> str:
        return f"TokenClient({self.socket_path!r})"

    def __enter__(self) -> TokenClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the shared connection (the next request opens a new one). The cache is kept."""
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._decoder = FrameDecoder()

    def _connect(self, timeout: float | None) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(self.socket_path)
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            raise BrokerUnavailable(f"no dc-broker is running on {self.socket_path}") from None
        except PermissionError:
            sock.close()
            raise BrokerUnavailable(f"no permission to use the broker socket {self.socket_path}") from None
        except OSError as exc:
            sock.close()
            raise BrokerUnavailable(f"cannot connect to {self.socket_path}: {exc.strerror or exc}") from None
        return sock

    def request(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one request and return its result map, or raise the error it came back with."""
        with self._lock:
            if self._pid != os.getpid():  # forked: the connection belongs to the parent
                self._sock, self._decoder, self._pid = None, FrameDecoder(), os.getpid()
            rid = self._next_id
            self._next_id += 1
            frame = encode(Request(rid, op, args))
            fresh = self._sock is None
            try:
                return self._roundtrip(rid, frame)
            except (BrokenPipeError, ConnectionResetError, _ClosedByPeer):
                self._drop()
                if fresh:
                    raise BrokerUnavailable(f"the broker on {self.socket_path} closed the connection") from None
            # the broker restarted since our last request: one fresh attempt on a new connection
            try:
                return self._roundtrip(rid, frame)
            except (BrokenPipeError, ConnectionResetError, _ClosedByPeer):
                self._drop()
                raise BrokerUnavailable(f"the broker on {self.socket_path} closed the connection") from None

    def _roundtrip(self, rid: int, frame: bytes) -> dict[str, Any]:
        if self._sock is None:
            self._sock = self._connect(self.timeout)
        sock = self._sock
        try:
            sock.sendall(frame)
            while True:
                obj = self._decoder.next_frame()
                if obj is NEED_DATA:
                    data = sock.recv(_RECV)
                    if not data:
                        raise _ClosedByPeer
                    self._decoder.receive_data(data)
                    continue
                assert isinstance(obj, dict)
                reply = reply_from_wire(obj)
                if isinstance(reply, ErrorReply):
                    if reply.id not in (rid, None):
                        continue
                    if reply.id is None:
                        self._drop()
                    raise error_for_code(reply.code.value)(reply.message, retry_after=reply.retry_after)
                if reply.id != rid:
                    continue  # a late reply to a request we gave up on
                return dict(reply.result)
        except TimeoutError:
            self._drop()
            raise BrokerUnavailable(
                f"the broker on {self.socket_path} did not answer within {self.timeout} s"
            ) from None
        except RemoteProtocolError:
            self._drop()
            raise

    # the ops -------------------------------------------------------------------------------

    def hello(self) -> dict[str, Any]:
        return self.request("hello")

    def token_info(self, profile: str, *, min_ttl: float = 0.0, scope: str | None = None) -> Token:
        """The token and its metadata, with at least ``min_ttl`` seconds left. ``scope``: a narrower
        scope than the profile's (space-separated; the broker narrows the profile's login to it)."""
        cache = self.cache
        key = cache_key(profile, scope)
        if cache is not None:
            hit = cache.get(key, min_ttl)
            if hit is not None:
                return hit
        sent_at = _monotonic()
        result = self.request("token", **token_args(profile, min_ttl, scope))
        tok = Token.from_result(result, profile)
        if cache is not None:
            cache.put(tok, *_deadline(result, sent_at), key=key)
        return tok

    def token(self, profile: str, *, min_ttl: float = 0.0, scope: str | None = None) -> str:
        """A bearer token for ``profile`` (and ``scope``, if given) with at least ``min_ttl`` seconds left."""
        cache = self.cache
        if cache is not None:  # the hot path, inlined: no lock, no socket
            hit = cache.get(cache_key(profile, scope) if scope else profile, min_ttl)
            if hit is not None:
                return hit.token
        return self.token_info(profile, min_ttl=min_ttl, scope=scope).token

    def invalidate(self, profile: str, token: str) -> bool:
        """The API answered 401 to ``token``: forget it here, and have the broker refresh if it is the
        current one. Returns whether the broker started a refresh (it does so at most every 10 s)."""
        if self.cache is not None:
            self.cache.forget(profile, token)
        return bool(self.request("invalidate", profile=profile, token=token).get("refreshing"))

    def status(self, profile: str | None = None) -> dict[str, Any]:
        return self.request("status", profile=profile) if profile else self.request("status")

    @contextmanager
    def watch(
        self, profile: str, *, min_ttl: float = 0.0, scope: str | None = None, reconnect: bool = True
    ) -> Iterator[Iterator[Token]]:
        """Stream the profile's current token, then each new one, on a dedicated connection.

        >>> with broker.watch("acme") as tokens:
        ...     for tok in tokens:
        ...         service.set_token(tok.token)

        Leaving the ``with`` block closes the stream. An error reply ends it by raising its
        ``BrokerError``. A broker that goes away is waited for and reconnected to (see the module
        docstring); with ``reconnect=False`` that raises ``BrokerUnavailable`` instead. Every token
        also refreshes this client's cache.
        """
        frame = encode(Request(1, "watch", token_args(profile, min_ttl, scope)))
        conn = [self._open_watch(frame, profile)]  # the current connection, replaced on reconnect
        try:
            yield self._watch_tokens(conn, frame, profile, scope, reconnect)
        finally:
            conn[0].close()

    def _open_watch(self, frame: bytes, profile: str) -> socket.socket:
        sock = self._connect(None)
        try:
            sock.sendall(frame)
        except OSError as exc:
            sock.close()
            raise BrokerUnavailable(f"the watch on {self.socket_path} failed: {exc.strerror or exc}") from None
        return sock

    def _watch_tokens(
        self, conn: list[socket.socket], frame: bytes, profile: str, scope: str | None, reconnect: bool
    ) -> Iterator[Token]:
        last: str | None = None
        while True:
            try:
                for tok in self._stream(conn[0], profile, scope):
                    if tok.token != last:  # after a reconnect the unchanged token comes again: skip it
                        last = tok.token
                        yield tok
                return
            except BrokerUnavailable:
                if not reconnect:
                    raise
            conn[0].close()
            attempt = 0
            while True:
                time.sleep(reconnect_delay(attempt, _rand()))
                attempt += 1
                try:
                    conn[0] = self._open_watch(frame, profile)
                    break
                except BrokerUnavailable:
                    continue

    def _stream(self, sock: socket.socket, profile: str, scope: str | None = None) -> Iterator[Token]:
        decoder = FrameDecoder()
        received_at = _monotonic()
        key = cache_key(profile, scope)
        while True:
            obj = decoder.next_frame()
            if obj is NEED_DATA:
                try:
                    data = sock.recv(_RECV)
                except OSError:
                    data = b""
                received_at = _monotonic()  # a push's expires_in was measured just before it was sent
                if not data:
                    raise BrokerUnavailable(f"the broker on {self.socket_path} closed the watch on {profile!r}")
                decoder.receive_data(data)
                continue
            assert isinstance(obj, dict)
            reply = reply_from_wire(obj)
            yield from _watch_reply(reply, profile, self.cache, received_at, key)
            if isinstance(reply, Reply) and not reply.more:
                return


def _watch_reply(
    reply: Reply | ErrorReply, profile: str, cache: TokenCache | None, sent_at: float, key: str | None = None
) -> Iterator[Token]:
    """What one watch message means: a token to yield (and cache), or the error that ends the stream."""
    if isinstance(reply, ErrorReply):
        raise error_for_code(reply.code.value)(reply.message, retry_after=reply.retry_after)
    tok = Token.from_result(reply.result, profile)
    if cache is not None:
        cache.put(tok, *_deadline(reply.result, sent_at), key=key)
    yield tok
