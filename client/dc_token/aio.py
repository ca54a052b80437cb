"""``AsyncTokenClient``: the async client, for trio and asyncio alike (through anyio).

A thin I/O driver over ``dc_token.connection``, with the same contract as ``dc_token.sync.TokenClient``:
one reused connection (reconnected after a broker restart), the same in-process ``TokenCache`` (a
hit never awaits), the same errors, ``watch`` on a dedicated connection (reconnected by itself after
a broker restart, as the sync one). Requests on the shared connection are serialized by an
``anyio.Lock``; a request cancelled half-way drops the connection, so the next one starts on a clean
frame boundary.

One client belongs to one event loop (its connection and lock do); the cache may be shared by passing
another client's ``cache``. Importing this module imports anyio (not trio, not httpx).
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc

from dc_token.cache import (
    Token,
    TokenCache,
    cached_token,
    remember,
    token_args,
)
from dc_token.connection import ClientConnection, Closed, End, Failed, Result, may_retry
from dc_token.errors import BrokerTimeout, BrokerUnavailable
from dc_token.pages import merge_status
from dc_token.paths import default_socket_path, unreachable
from dc_token.watch import Reopen, WatchDedup, WatchFlow

_Watch = tuple[anyio.abc.SocketStream, ClientConnection]  # a watch's stream and its connection

_monotonic = time.monotonic  # this module's clock (the cache's is its own: tests patch each)

__all__ = ["AsyncTokenClient"]

_RECV = 65536
_CLOSED = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError)


class _Gone(Exception):
    """The connection died under a request."""


async def _next(stream: anyio.abc.SocketStream, conn: ClientConnection) -> Result | Failed | End | Closed:
    """The connection's next event, reading from ``stream`` as long as it needs data."""
    while True:
        event = conn.next_event()
        if isinstance(event, Result | Failed | End | Closed):
            return event
        try:
            data = await stream.receive(_RECV)
        except _CLOSED:
            data = b""
        conn.receive_data(data)


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
        self._conn = ClientConnection()
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
        self._conn = ClientConnection()
        if stream is not None:
            await anyio.aclose_forcefully(stream)

    async def _connect(self) -> anyio.abc.SocketStream:
        try:
            return await anyio.connect_unix(self.socket_path)
        except OSError as exc:
            raise unreachable(self.socket_path, exc) from None

    async def request(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one request and return its result map, or raise the error it came back with."""
        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock:
            while True:
                try:
                    return await self._roundtrip(op, args)
                except _Gone:
                    retry = may_retry(self._conn)  # the broker restarted since our last request
                    await self._drop()
                    if not retry:
                        raise BrokerUnavailable(f"the broker on {self.socket_path} closed the connection") from None

    async def _roundtrip(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        done = False
        try:
            with anyio.fail_after(math.inf if self.timeout is None else self.timeout):
                if self._stream is None:
                    self._stream = await self._connect()
                stream, conn = self._stream, self._conn
                rid, frame = conn.send_request(op, args)
                try:
                    await stream.send(frame)
                except _CLOSED:
                    done = True  # request() drops it, and decides on the retry first
                    raise _Gone from None
                while True:
                    event = await _next(stream, conn)
                    if isinstance(event, Closed):
                        done = True
                        raise _Gone
                    if isinstance(event, Failed):
                        if event.id != rid:
                            continue
                        done = not conn.closed  # an id-less error: the broker is closing on us
                        raise event.error
                    done = True
                    return {} if isinstance(event, End) else event.result
        except TimeoutError:
            raise BrokerTimeout(f"the broker on {self.socket_path} did not answer within {self.timeout} s") from None
        finally:
            if not done:  # timed out, cancelled or garbled mid-request: start clean next time
                await self._drop()

    # the ops -------------------------------------------------------------------------------

    async def hello(self) -> dict[str, Any]:
        return await self.request("hello")

    async def token_info(self, profile: str, *, min_ttl: float = 0.0, scope: str | None = None) -> Token:
        """The token and its metadata, with at least ``min_ttl`` seconds left (for ``scope``, if given)."""
        hit = cached_token(self.cache, profile, scope, min_ttl)
        if hit is not None:
            return hit
        sent_at = _monotonic()
        return remember(
            self.cache, await self.request("token", **token_args(profile, min_ttl, scope)), profile, scope, sent_at
        )

    async def token(self, profile: str, *, min_ttl: float = 0.0, scope: str | None = None) -> str:
        """A bearer token for ``profile`` (and ``scope``, if given) with at least ``min_ttl`` seconds left."""
        return (await self.token_info(profile, min_ttl=min_ttl, scope=scope)).token

    async def invalidate(self, profile: str, token: str) -> bool:
        """The API answered 401 to ``token``: forget it here, and have the broker refresh if it is the
        current one. Returns whether the broker started a refresh (it does so at most every 10 s)."""
        if self.cache is not None:
            self.cache.forget(profile, token)
        return bool((await self.request("invalidate", profile=profile, token=token)).get("refreshing"))

    async def status(self, profile: str | None = None, *, after: str | None = None) -> dict[str, Any]:
        """One status page (``TokenClient.status``); ``broker.next`` is the ``after`` for the next."""
        return await self.request("status", profile=profile, after=after)

    async def status_all(self, limit: int | None = None) -> dict[str, Any]:
        """Every profile this caller may see (at most ``limit``), following the broker's cursor."""
        first = await self.status()
        pages = [first]
        while pages[-1]["broker"].get("next") and (limit is None or sum(len(p["profiles"]) for p in pages) < limit):
            pages.append(await self.status(after=pages[-1]["broker"]["next"]))
        return merge_status(pages, limit)

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
        args = token_args(profile, min_ttl, scope)
        flow = WatchFlow(args, WatchDedup(profile, scope, self.cache), reconnect=reconnect, where=self.socket_path)
        watch = [await self._open_watch(flow)]
        try:
            yield self._watch_tokens(watch, flow)
        finally:
            await anyio.aclose_forcefully(watch[0][0])

    async def _open_watch(self, flow: WatchFlow) -> tuple[anyio.abc.SocketStream, ClientConnection]:
        stream = await self._connect()
        conn = ClientConnection()
        _, frame = conn.send_request("watch", flow.request)
        try:
            await stream.send(frame)
        except _CLOSED:
            await anyio.aclose_forcefully(stream)
            raise BrokerUnavailable(f"the broker on {self.socket_path} closed the watch on {flow.profile!r}") from None
        return stream, conn

    async def _watch_tokens(self, watch: list[_Watch], flow: WatchFlow) -> AsyncIterator[Token]:
        """The I/O of a watch; ``WatchFlow`` has its rules (dedup, reconnect, end)."""
        step = flow.send(None)
        while step is not None:
            if isinstance(step, Reopen):  # the broker went away: close, wait, open again
                await anyio.aclose_forcefully(watch[0][0])
                await anyio.sleep(step.delay)
                try:
                    watch[0] = await self._open_watch(flow)
                except BrokerUnavailable:
                    step = flow.send(False)
                else:
                    step = flow.send(True)
            elif isinstance(step, Token):
                yield step
                step = flow.send(None)
            else:  # READ (expires_in was measured just before the push)
                step = flow.send((await _next(*watch[0]), _monotonic()))
