"""``AsyncTokenClient``: the async client, for trio and asyncio alike (through anyio).

Same contract as ``dc_token.sync.TokenClient``: one reused connection (reconnected after a broker
restart), the same in-process ``TokenCache`` (a hit never awaits), the same errors, ``watch`` on a
dedicated connection (reconnected by itself after a broker restart, as the sync one). Requests on
the shared connection are serialized by an ``anyio.Lock``; a request cancelled half-way drops the
connection, so the next one starts on a clean frame boundary.

One client belongs to one event loop (its connection and lock do); the cache may be shared by passing
another client's ``cache``. Importing this module imports anyio (not trio, not httpx).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc

from dc_token.errors import BrokerUnavailable, error_for_code
from dc_token.paths import default_socket_path
from dc_token.protocol import NEED_DATA, ErrorReply, FrameDecoder, Reply, Request, encode, reply_from_wire
from dc_token.sync import (
    Token,
    TokenCache,
    _deadline,
    _monotonic,
    _rand,
    _watch_reply,
    cache_key,
    reconnect_delay,
    token_args,
)

__all__ = ["AsyncTokenClient"]

_RECV = 65536
_CLOSED = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError)


class AsyncTokenClient:
    """Async client for one broker socket.

    >>> async with AsyncTokenClient() as broker:
    ...     token = await broker.token("acme", min_ttl=60)
    """

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        timeout: float | None = 60.0,
        cache: bool | TokenCache = True,
    ) -> None:
        self.socket_path = socket_path or default_socket_path()
        self.timeout = timeout
        self.cache: TokenCache | None = cache if isinstance(cache, TokenCache) else TokenCache() if cache else None
        self._stream: anyio.abc.SocketStream | None = None
        self._decoder = FrameDecoder()
        self._next_id = 1
        self._lock: anyio.Lock | None = None

    def __repr__(self) -> str:
        return f"AsyncTokenClient({self.socket_path!r})"

    async def __aenter__(self) -> AsyncTokenClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the shared connection (the next request opens a new one). The cache is kept."""
        await self._drop()

    async def _drop(self) -> None:
        stream, self._stream = self._stream, None
        self._decoder = FrameDecoder()
        if stream is not None:
            await anyio.aclose_forcefully(stream)

    async def _connect(self) -> anyio.abc.SocketStream:
        try:
            return await anyio.connect_unix(self.socket_path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise BrokerUnavailable(f"no dc-broker is running on {self.socket_path}") from None
        except PermissionError:
            raise BrokerUnavailable(f"no permission to use the broker socket {self.socket_path}") from None
        except OSError as exc:
            raise BrokerUnavailable(f"cannot connect to {self.socket_path}: {exc.strerror or exc}") from None

    async def request(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one request and return its result map, or raise the error it came back with."""
        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock:
            rid = self._next_id
            self._next_id += 1
            frame = encode(Request(rid, op, args))
            fresh = self._stream is None
            try:
                return await self._roundtrip(rid, frame)
            except _CLOSED:
                await self._drop()
                if fresh:
                    raise BrokerUnavailable(f"the broker on {self.socket_path} closed the connection") from None
            # the broker restarted since our last request: one fresh attempt on a new connection
            try:
                return await self._roundtrip(rid, frame)
            except _CLOSED:
                await self._drop()
                raise BrokerUnavailable(f"the broker on {self.socket_path} closed the connection") from None

    async def _roundtrip(self, rid: int, frame: bytes) -> dict[str, Any]:
        done = False
        try:
            with anyio.fail_after(math.inf if self.timeout is None else self.timeout):
                if self._stream is None:
                    self._stream = await self._connect()
                stream = self._stream
                await stream.send(frame)
                while True:
                    obj = self._decoder.next_frame()
                    if obj is NEED_DATA:
                        self._decoder.receive_data(await stream.receive(_RECV))
                        continue
                    assert isinstance(obj, dict)
                    reply = reply_from_wire(obj)
                    if isinstance(reply, ErrorReply):
                        if reply.id not in (rid, None):
                            continue
                        done = reply.id is not None  # an id-less error means the broker is closing on us
                        raise error_for_code(reply.code.value)(reply.message, retry_after=reply.retry_after)
                    if reply.id != rid:
                        continue  # a late reply to a request we gave up on
                    done = True
                    return dict(reply.result)
        except TimeoutError:
            raise BrokerUnavailable(
                f"the broker on {self.socket_path} did not answer within {self.timeout} s"
            ) from None
        finally:
            if not done:  # timed out, cancelled, closed or garbled mid-request: start clean next time
                await self._drop()

    # the ops -------------------------------------------------------------------------------

    async def hello(self) -> dict[str, Any]:
        return await self.request("hello")

    async def token_info(self, profile: str, *, min_ttl: float = 0.0, scope: str | None = None) -> Token:
        """The token and its metadata, with at least ``min_ttl`` seconds left (for ``scope``, if given)."""
        cache = self.cache
        key = cache_key(profile, scope)
        if cache is not None:
            hit = cache.get(key, min_ttl)
            if hit is not None:
                return hit
        sent_at = _monotonic()
        result = await self.request("token", **token_args(profile, min_ttl, scope))
        tok = Token.from_result(result, profile)
        if cache is not None:
            cache.put(tok, *_deadline(result, sent_at), key=key)
        return tok

    async def token(self, profile: str, *, min_ttl: float = 0.0, scope: str | None = None) -> str:
        """A bearer token for ``profile`` (and ``scope``, if given) with at least ``min_ttl`` seconds left."""
        return (await self.token_info(profile, min_ttl=min_ttl, scope=scope)).token

    async def invalidate(self, profile: str, token: str) -> bool:
        """The API answered 401 to ``token``: forget it here, and have the broker refresh if it is the
        current one. Returns whether the broker started a refresh (it does so at most every 10 s)."""
        if self.cache is not None:
            self.cache.forget(profile, token)
        return bool((await self.request("invalidate", profile=profile, token=token)).get("refreshing"))

    async def status(self, profile: str | None = None) -> dict[str, Any]:
        return await (self.request("status", profile=profile) if profile else self.request("status"))

    @asynccontextmanager
    async def watch(
        self, profile: str, *, min_ttl: float = 0.0, scope: str | None = None, reconnect: bool = True
    ) -> AsyncIterator[AsyncIterator[Token]]:
        """Stream the profile's current token, then each new one, on a dedicated connection.

        >>> async with broker.watch("acme") as tokens:
        ...     async for tok in tokens:
        ...         service.set_token(tok.token)

        Leaving the block closes the stream. An error reply ends it by raising its ``BrokerError``; a
        broker that goes away is waited for and reconnected to (``reconnect=False``: raises
        ``BrokerUnavailable``). Every token also refreshes the cache.
        """
        frame = encode(Request(1, "watch", token_args(profile, min_ttl, scope)))
        conn = [await self._open_watch(frame, profile)]
        try:
            yield self._watch_tokens(conn, frame, profile, scope, reconnect)
        finally:
            await anyio.aclose_forcefully(conn[0])

    async def _open_watch(self, frame: bytes, profile: str) -> anyio.abc.SocketStream:
        stream = await self._connect()
        try:
            await stream.send(frame)
        except _CLOSED:
            await anyio.aclose_forcefully(stream)
            raise BrokerUnavailable(f"the broker on {self.socket_path} closed the watch on {profile!r}") from None
        return stream

    async def _watch_tokens(
        self, conn: list[anyio.abc.SocketStream], frame: bytes, profile: str, scope: str | None, reconnect: bool
    ) -> AsyncIterator[Token]:
        last: str | None = None
        while True:
            try:
                async for tok in self._watch_stream(conn[0], profile, scope):
                    if tok.token != last:  # after a reconnect the unchanged token comes again: skip it
                        last = tok.token
                        yield tok
                return
            except BrokerUnavailable:
                if not reconnect:
                    raise
            await anyio.aclose_forcefully(conn[0])
            attempt = 0
            while True:
                await anyio.sleep(reconnect_delay(attempt, _rand()))
                attempt += 1
                try:
                    conn[0] = await self._open_watch(frame, profile)
                    break
                except BrokerUnavailable:
                    continue

    async def _watch_stream(
        self, stream: anyio.abc.SocketStream, profile: str, scope: str | None = None
    ) -> AsyncIterator[Token]:
        decoder = FrameDecoder()
        received_at = _monotonic()
        key = cache_key(profile, scope)
        while True:
            obj = decoder.next_frame()
            if obj is NEED_DATA:
                try:
                    decoder.receive_data(await stream.receive(_RECV))
                except _CLOSED:
                    raise BrokerUnavailable(
                        f"the broker on {self.socket_path} closed the watch on {profile!r}"
                    ) from None
                received_at = _monotonic()
                continue
            assert isinstance(obj, dict)
            reply = reply_from_wire(obj)
            for tok in _watch_reply(reply, profile, self.cache, received_at, key):
                yield tok
            if isinstance(reply, Reply) and not reply.more:
                return
