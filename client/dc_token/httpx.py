"""``BrokerAuth``: an ``httpx.Auth`` that takes bearer tokens from dc-broker, for ``Client`` and ``AsyncClient``.

    client = httpx.Client(auth=BrokerAuth("acme"))
    client.get("https://dc.example.com/dp/api/v1/aiconnections/types")

The flow is one pure generator (``BrokerAuth.steps``) that yields what it needs: a token, an
invalidate, or a request to send. Two small drivers run it, one with a ``TokenClient``, one with an
``AsyncTokenClient``, so the sync and async paths cannot drift apart, and tests step it by hand.

On a 401 it reports the rejected token (``invalidate``), takes a fresh one and retries once. If the
retry is answered 401 too, or the broker has nothing newer to give, that response is returned: one
retry at most, never a loop. Other statuses (403 included: a valid token without permission) pass.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import httpx

from dc_token.sync import TokenCache, TokenClient

if TYPE_CHECKING:
    from dc_token.aio import AsyncTokenClient

__all__ = ["RETRY_MIN_TTL", "BrokerAuth"]

#: min_ttl for the token taken after a 401 (any fresh token will do; it was issued a moment ago)
RETRY_MIN_TTL: Final = 1.0


@dataclass(frozen=True, slots=True)
class GetToken:
    """Step: give me a token for the profile with at least ``min_ttl`` seconds left (send back a str)."""

    min_ttl: float


@dataclass(frozen=True, slots=True)
class Invalidate:
    """Step: tell the broker the API rejected ``token`` (send back whether it refreshes)."""

    token: str


Step = GetToken | Invalidate | httpx.Request


class BrokerAuth(httpx.Auth):
    """Sets ``Authorization: Bearer <token>`` from the broker's ``profile``; on 401 invalidates and
    retries once.

    ``min_ttl``: seconds the token must still be valid when the request leaves (default 30).
    ``client`` / ``async_client``: clients to use (default: made on first use, on ``socket_path``,
    sharing one in-process token cache).
    """

    def __init__(
        self,
        profile: str,
        *,
        min_ttl: float = 30.0,
        socket_path: str | None = None,
        client: TokenClient | None = None,
        async_client: AsyncTokenClient | None = None,
    ) -> None:
        self.profile = profile
        self.min_ttl = min_ttl
        self.socket_path = socket_path
        self._client = client
        self._async_client = async_client
        self._own_async_client = async_client is None
        self._async_loop: object = None
        self._cache = TokenCache()

    def __repr__(self) -> str:
        return f"BrokerAuth({self.profile!r})"

    def steps(self, request: httpx.Request) -> Generator[Step, object, None]:
        """The whole policy, no I/O: yields steps and is sent each step's answer."""
        token = yield GetToken(self.min_ttl)
        assert isinstance(token, str)
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        assert isinstance(response, httpx.Response)
        if response.status_code != 401:
            return
        yield Invalidate(token)
        fresh = yield GetToken(RETRY_MIN_TTL)
        assert isinstance(fresh, str)
        if fresh == token:  # the broker has nothing newer (it refreshes at most every 10 s): no retry
            return
        request.headers["Authorization"] = f"Bearer {fresh}"
        yield request

    # the drivers -----------------------------------------------------------------------------

    def _sync_client(self) -> TokenClient:
        if self._client is None:
            self._client = TokenClient(self.socket_path, cache=False)
            self._client.cache = self._cache
        return self._client

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        client = self._sync_client()
        flow = self.steps(request)
        answer: object = None
        while True:
            try:
                step = flow.send(answer)
            except StopIteration:
                return
            if isinstance(step, httpx.Request):
                answer = yield step
            elif isinstance(step, GetToken):
                answer = client.token(self.profile, min_ttl=step.min_ttl)
            else:
                answer = client.invalidate(self.profile, step.token)

    def _aclient(self) -> AsyncTokenClient:
        from dc_token.aio import AsyncTokenClient

        loop = _current_loop()
        if self._async_client is None or (self._own_async_client and loop is not self._async_loop):
            # a client's connection and lock belong to one event loop; the cache is shared
            self._async_client = AsyncTokenClient(self.socket_path, cache=self._cache)
            self._async_loop = loop
        return self._async_client

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        client = self._aclient()
        flow = self.steps(request)
        answer: object = None
        while True:
            try:
                step = flow.send(answer)
            except StopIteration:
                return
            if isinstance(step, httpx.Request):
                answer = yield step
            elif isinstance(step, GetToken):
                answer = await client.token(self.profile, min_ttl=step.min_ttl)
            else:
                answer = await client.invalidate(self.profile, step.token)


def _current_loop() -> object:
    """The running event loop (asyncio loop or trio token), or None if anyio cannot tell."""
    try:
        from anyio.lowlevel import current_token

        return current_token().native_token
    except Exception:  # anyio < 4.11, or no loop anyone knows
        return None
