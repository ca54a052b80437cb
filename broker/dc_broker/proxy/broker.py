"""The broker's word, asked for every request: ``BrokerTokens`` gets each proxied request's token from
the broker's socket, so ``lock``, ``logout``, ``remove`` and an ``invalidate`` take effect on the very
next request. No token is kept here between requests.

A thin trio driver over ``dc_token.connection.ClientConnection`` (the one sans-IO client
conversation): a few connections kept open, each used by one request at a time, over the proxy's
``RawStream`` (non-blocking ``send`` and ``recv``, parking on trio's epoll only when the socket is
empty, as the broker's own server does), so a token answered from the broker's memory costs one
round trip: tens of microseconds of work, and two processes waking. A connection that served before
and is found closed (the broker restarted) is replaced and the request sent once more
(``may_retry``); a broker that does not answer within ``timeout`` is an error for that request.

Must never: keep a token after its request; log one.
"""

from __future__ import annotations

import math
import socket
from typing import Any

import trio

from dc_broker.proxy.stream import RawStream
from dc_token.connection import ClientConnection, Closed, End, Failed, Result, may_retry
from dc_token.errors import BrokerError, BrokerTimeout, BrokerUnavailable, RemoteProtocolError
from dc_token.paths import unreachable

_RECV = 65536


class _Link:
    """One connection to the broker and its conversation."""

    __slots__ = ("conn", "stream")

    def __init__(self, sock: socket.socket) -> None:
        self.stream = RawStream(sock)
        self.conn = ClientConnection()

    async def ask(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """One request and its reply; ``_Gone`` if the connection died under it."""
        _, frame = self.conn.send_request(op, args)
        try:
            await self.stream.send_all(frame)
        except trio.BrokenResourceError:
            raise _Gone from None
        # the broker is another process: it has not answered yet, so no recv is tried before this
        await trio.lowlevel.wait_readable(self.stream.socket)
        while True:
            event = self.conn.next_event()
            if isinstance(event, Result):
                return event.result
            if isinstance(event, End):
                return {}
            if isinstance(event, Failed):
                raise event.error
            if isinstance(event, Closed):
                raise _Gone
            try:
                data = await self.stream.receive_some(_RECV)
            except trio.BrokenResourceError:
                data = b""
            self.conn.receive_data(data)


class _Gone(Exception):
    """The connection died under a request."""


class BrokerTokens:
    """Tokens of one profile from the broker on ``socket_path``, asked anew for every request."""

    def __init__(self, socket_path: str, profile: str, *, connections: int = 8, timeout: float = 60.0) -> None:
        self.socket_path = socket_path
        self.profile = profile
        self.timeout = timeout
        self._idle: list[_Link] = []
        self._open = 0  # links in use or idle
        self._limit = connections
        self._freed = trio.lowlevel.ParkingLot()

    async def token(self, min_ttl: float) -> str:
        result = await self.request("token", profile=self.profile, min_ttl=min_ttl)
        return str(result["token"])

    async def invalidate(self, token: str) -> None:
        """The upstream refused ``token`` (401): the broker refreshes if it is still the current one."""
        await self.request("invalidate", profile=self.profile, token=token)

    async def request(self, op: str, **args: Any) -> dict[str, Any]:
        """One request on a free connection; its result, or the error it came back with."""
        limit = math.inf if self.timeout is None else self.timeout
        with trio.CancelScope(deadline=trio.current_time() + limit):  # not fail_after: per request
            return await self._request(op, args)
        raise BrokerTimeout(f"the broker on {self.socket_path} did not answer within {limit:g} s")

    async def _request(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        while not self._idle and self._open >= self._limit:
            await self._freed.park()  # all connections busy: the next one given back
        if self._idle:
            link: _Link | None = self._idle.pop()
        else:
            self._open += 1
            link = None
        try:
            if link is None:
                link = await self._connect()
            retried = False
            while True:
                try:
                    result = await link.ask(op, args)
                except _Gone:
                    link.stream.close()
                    served, link = may_retry(link.conn), None
                    if retried or not served:
                        raise BrokerUnavailable(f"the broker on {self.socket_path} closed the connection") from None
                    link, retried = await self._connect(), True  # the broker restarted since it served: once more
                    continue
                except BrokerError:
                    if link.conn.closed:
                        link.stream.close()
                        link = None
                    raise  # else an error reply: the conversation is intact
                return result
        except RemoteProtocolError as exc:
            raise BrokerUnavailable(f"the broker on {self.socket_path} sent garbage: {exc}") from None
        except BaseException as exc:
            if link is not None and not isinstance(exc, BrokerError):
                link.stream.close()  # timed out, cancelled or garbled mid-request: its reply would confuse the next
                link = None
            raise
        finally:
            # back to the idle list, or its place freed; an ask waiting for a connection goes on
            if link is None:
                self._open -= 1
            else:
                self._idle.append(link)
            self._freed.unpark()

    async def _connect(self) -> _Link:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(self.socket_path)  # trio waits out a full backlog
        except OSError as exc:
            sock.close()
            raise unreachable(self.socket_path, exc) from None
        return _Link(socket.socket(fileno=sock.detach()))

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for link in idle:
            link.stream.close()
