"""The watch stream's rules, sans-IO: what a driver does next on a watch, whatever its I/O.

``WatchFlow`` wraps a generator (httpx's auth flows are the model): each ``send`` returns what to
do, ``READ`` (send back the next connection event and when it arrived), a ``Token`` (hand it to the
caller; send back None) or a ``Reopen`` (close the connection, wait ``delay`` seconds, open a new
watch; send back whether that worked), and None once the stream has ended. The blocking and the
async client are thin drivers of it; the rules live here once:

- every pushed token refreshes the cache; a token equal to the last one (a restarted broker serves
  the unchanged token again) is not news and is not handed out;
- an error reply ends the stream by raising its ``BrokerError``; the end of a stream returns;
- a broker that goes away is reconnected to, after ``reconnect_delay`` (0.1 s doubling to 5 s,
  jittered to half..all, so the clients of a restarted broker do not arrive at once), for as long as
  it takes; with ``reconnect=False`` that raises ``BrokerUnavailable`` instead.

No socket, no lock, no clock: the driver says when an event arrived.
"""

from __future__ import annotations

import time

from dc_token.cache import Token, TokenCache, remember
from dc_token.connection import Closed, End, Failed, Result
from dc_token.errors import BrokerUnavailable

TYPE_CHECKING = False  # typing costs dc-token start-up time; annotations only
if TYPE_CHECKING:
    from collections.abc import Generator, Mapping
    from typing import Any, Final

#: what a connection gives a watch: a result, an error reply, the stream's end, or the broker gone
Event = Result | Failed | End | Closed

__all__ = ["READ", "Reopen", "WatchDedup", "WatchFlow", "jitter", "reconnect_delay"]

#: watch reconnects: the n-th consecutive failed attempt waits up to min(CAP, BASE * 2**n) seconds
RECONNECT_BASE: Final = 0.1
RECONNECT_CAP: Final = 5.0


def reconnect_delay(attempt: int, rand: float) -> float:
    """Seconds before watch reconnect attempt ``attempt`` (0 = the first); ``rand`` uniform in [0, 1).
    Jittered to half..all of the ceiling, so the clients of a restarted broker do not arrive at once."""
    return min(RECONNECT_CAP, RECONNECT_BASE * 2.0 ** min(attempt, 16)) * (0.5 + rand / 2)


def jitter() -> float:
    """A number in [0, 1) for ``reconnect_delay`` (jitter only; no random module at start-up)."""
    return (time.monotonic_ns() % 1_000_003) / 1_000_003


class _Read:
    __slots__ = ()

    def __repr__(self) -> str:
        return "READ"


#: a ``WatchFlow`` wants the next event of the connection: send back ``(event, received_at)``
READ: Final = _Read()


class Reopen:
    """A ``WatchFlow`` wants a new watch: close the connection, wait ``delay`` s, open one again and
    send back whether that worked (``BrokerUnavailable``: False)."""

    __slots__ = ("delay",)

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def __repr__(self) -> str:
        return f"Reopen(delay={self.delay:.3f})"


class WatchDedup:
    """One watch's memory across reconnects: a restarted broker serves the unchanged token again,
    which is not news. ``accept`` caches every pushed token and says whether to yield it."""

    __slots__ = ("_last", "cache", "profile", "scope")

    def __init__(self, profile: str, scope: str | None, cache: TokenCache | None) -> None:
        self.profile, self.scope, self.cache = profile, scope, cache
        self._last: str | None = None

    def step(self, event: Event, received_at: float) -> tuple[Token | None, bool]:
        """What one watch event means: (a token to yield or None, whether the stream goes on). A
        ``Closed`` goes on with no token (the driver reconnects); an error reply is raised."""
        if isinstance(event, Failed):
            raise event.error
        if isinstance(event, End):
            return None, False
        if isinstance(event, Closed):
            return None, True
        return self.accept(event.result, received_at), event.more

    def accept(self, result: Mapping[str, Any], received_at: float) -> Token | None:
        tok = remember(self.cache, result, self.profile, self.scope, received_at)
        if tok.token == self._last:
            return None
        self._last = tok.token
        return tok


class WatchFlow:
    """One watch, as steps for a driver: ``send(reply)`` returns the next step (``READ``, a
    ``Token`` or a ``Reopen``) or None when the stream has ended. The first call sends None; after a
    ``Token`` send None, after ``READ`` ``(event, received_at)``, after a ``Reopen`` whether the new
    watch is open. ``request`` is the watch's arguments, for every (re)open."""

    __slots__ = ("_steps", "dedup", "request")

    def __init__(self, request: dict[str, Any], dedup: WatchDedup, *, reconnect: bool, where: str) -> None:
        self.request, self.dedup = request, dedup
        self._steps = _steps(dedup, reconnect, where)

    @property
    def profile(self) -> str:
        return self.dedup.profile

    def send(self, reply: tuple[Event, float] | bool | None) -> _Read | Token | Reopen | None:
        try:
            return self._steps.send(reply)
        except StopIteration:
            return None


def _steps(
    dedup: WatchDedup, reconnect: bool, where: str
) -> Generator[_Read | Token | Reopen, tuple[Event, float] | bool | None, None]:
    while True:
        reply = yield READ
        assert isinstance(reply, tuple), "send (event, received_at) after READ"
        event, received_at = reply
        tok, more = dedup.step(event, received_at)
        if tok is not None:
            yield tok
        if isinstance(event, Closed):
            if not reconnect:
                raise BrokerUnavailable(f"the broker on {where} closed the watch on {dedup.profile!r}")
            attempt = 0
            while not (yield Reopen(reconnect_delay(attempt, jitter()))):
                attempt += 1
        elif not more:
            return
