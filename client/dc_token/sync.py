"""``TokenClient``: the blocking client, a thin I/O driver over ``dc_token.connection``.

Owns: one reused socket per client (reconnected after a broker restart), the in-process
``TokenCache`` (``dc_token.cache``), ``watch`` and other streams on dedicated sockets, and the
blocking socket I/O. The conversation itself (ids, reply matching, error replies -> exceptions,
stream ends, the retry-once rule) is ``ClientConnection``'s. Must never: hold a secret in a repr,
block a cache hit on the lock or a socket, or import anything heavier than the standard library's
cheapest, msgpack and ``dc_token.protocol`` (dc-token imports this module on every run).

Thread-safety: requests on the shared socket are serialized by a lock (one in flight at a time); a
cache hit takes no lock at all (one dict read, atomic in CPython). Errors are the ``dc_token.errors``
tree: ``BrokerUnavailable`` when nothing listens, one ``BrokerError`` subclass per wire error code.

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
import struct
import time
from contextlib import contextmanager

from dc_token.cache import (
    CACHE_MARGIN,
    Token,
    TokenCache,
    cache_key,
    cached_token,
    remember,
    token_args,
)
from dc_token.connection import ClientConnection, Closed, End, Failed, Result, may_retry
from dc_token.errors import BrokerTimeout, BrokerUnavailable, RemoteProtocolError
from dc_token.pages import collect_status
from dc_token.paths import default_socket_path, unreachable

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time (dc-token start-up)
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any, Final

    from dc_token.watch import WatchFlow

__all__ = ["CACHE_MARGIN", "Token", "TokenCache", "TokenClient", "cache_key"]

_RECV: Final = 65536
#: struct timeval (SO_RCVTIMEO, SO_SNDTIMEO): seconds, microseconds
_TIMEVAL: Final = struct.Struct("@ll")
_monotonic = time.monotonic


class _Gone(Exception):
    """The socket died under a request (reset, broken pipe, EOF)."""


def connect(path: str, timeout: float | None) -> socket.socket:
    """A blocking Unix socket to the broker; every failure is ``BrokerUnavailable`` saying what to do.

    ``timeout`` bounds the connect, then each send and receive: once connected, by the kernel
    (``SO_SNDTIMEO``/``SO_RCVTIMEO`` on a blocking socket) rather than by Python's socket timeout,
    which polls before every send and receive (two more system calls and a wake-up per request:
    about a third of a cached token's round trip). A receive that times out raises TimeoutError
    either way (``_next``)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise unreachable(path, exc) from None
    if timeout is not None and timeout > 0:
        seconds = int(timeout)
        micro = int((timeout - seconds) * 1e6) or (0 if seconds else 1)  # (0, 0) would mean no limit
        limit = _TIMEVAL.pack(seconds, micro)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
        sock.settimeout(None)
    return sock


def _next(sock: socket.socket, conn: ClientConnection) -> Result | Failed | End | Closed:
    """The connection's next event, reading from ``sock`` as long as it needs data."""
    while True:
        event = conn.next_event()
        if isinstance(event, Result | Failed | End | Closed):
            return event
        try:
            data = sock.recv(_RECV)
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        except BlockingIOError:  # SO_RCVTIMEO ran out (``connect``)
            raise TimeoutError("timed out") from None
        conn.receive_data(data)


def _send(sock: socket.socket, frame: bytes) -> None:
    try:
        sock.sendall(frame)
    except BlockingIOError:  # SO_SNDTIMEO ran out (``connect``)
        raise TimeoutError("timed out") from None


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
        self._conn = ClientConnection()
        self._pid = os.getpid()
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
        self._conn = ClientConnection()

    def request(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one request and return its result map, or raise the error it came back with."""
        with self._lock:
            if self._pid != os.getpid():  # forked: the connection belongs to the parent
                self._sock, self._conn, self._pid = None, ClientConnection(), os.getpid()
            while True:
                try:
                    return self._roundtrip(op, args)
                except _Gone:
                    retry = may_retry(self._conn)  # the broker restarted since our last request
                    self._drop()
                    if not retry:
                        raise BrokerUnavailable(f"the broker on {self.socket_path} closed the connection") from None

    def _roundtrip(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        if self._sock is None:
            self._sock = connect(self.socket_path, self.timeout)
        sock, conn = self._sock, self._conn
        rid, frame = conn.send_request(op, args)
        try:
            _send(sock, frame)
            while True:
                event = _next(sock, conn)
                if isinstance(event, Closed):
                    raise _Gone
                if isinstance(event, Failed):
                    if conn.closed:  # the broker could not read our frame: start clean
                        self._drop()
                    if event.id == rid:
                        raise event.error
                    continue
                if isinstance(event, End):
                    return {}
                return event.result
        except (BrokenPipeError, ConnectionResetError):
            raise _Gone from None
        except TimeoutError:
            self._drop()
            raise BrokerTimeout(f"the broker on {self.socket_path} did not answer within {self.timeout} s") from None
        except RemoteProtocolError:
            self._drop()
            raise

    def stream(self, op: str, **args: Any) -> Iterator[dict[str, Any]]:
        """One request on a dedicated connection; yield each result of its reply (a stream such as
        ``login`` yields several) until the last. ``timeout`` bounds each wait for the next one."""
        sock = connect(self.socket_path, self.timeout)
        conn = ClientConnection()
        try:
            _, frame = conn.send_request(op, args)
            try:
                _send(sock, frame)
                while True:
                    event = _next(sock, conn)
                    if isinstance(event, Failed):
                        raise event.error
                    if isinstance(event, Closed):
                        raise BrokerUnavailable(f"the broker on {self.socket_path} closed the connection")
                    if isinstance(event, End):
                        return
                    yield event.result
                    if not event.more:
                        return
            except (BrokenPipeError, ConnectionResetError):
                raise BrokerUnavailable(f"the broker on {self.socket_path} closed the connection") from None
        finally:
            sock.close()

    # the ops -------------------------------------------------------------------------------

    def hello(self) -> dict[str, Any]:
        return self.request("hello")

    def token_info(self, profile: str, *, min_ttl: float = 0.0, scope: str | None = None) -> Token:
        """The token and its metadata, with at least ``min_ttl`` seconds left. ``scope``: a narrower
        scope than the profile's (space-separated; the broker narrows the profile's login to it)."""
        hit = cached_token(self.cache, profile, scope, min_ttl)
        if hit is not None:
            return hit
        sent_at = _monotonic()
        return remember(
            self.cache, self.request("token", **token_args(profile, min_ttl, scope)), profile, scope, sent_at
        )

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

    def status(self, profile: str | None = None, *, after: str | None = None) -> dict[str, Any]:
        """One status page: the broker and the profiles after ``after`` (name order) that fit one
        reply; its ``broker.next`` is the ``after`` for the next page (None: that was the last)."""
        return self.request("status", profile=profile, after=after)

    def status_all(self, limit: int | None = None) -> dict[str, Any]:
        """Every profile this caller may see (at most ``limit``), following the broker's cursor: one
        status result whose ``broker.truncated`` counts those ``limit`` left out."""
        return collect_status(self.status, limit)

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
        from dc_token.watch import WatchDedup, WatchFlow  # not on dc-token's path: imported when used

        args = token_args(profile, min_ttl, scope)
        flow = WatchFlow(args, WatchDedup(profile, scope, self.cache), reconnect=reconnect, where=self.socket_path)
        watch = [self._open_watch(flow)]  # the current (socket, connection), replaced on reconnect
        try:
            yield self._watch_tokens(watch, flow)
        finally:
            watch[0][0].close()

    def _open_watch(self, flow: WatchFlow) -> tuple[socket.socket, ClientConnection]:
        sock = connect(self.socket_path, None)
        conn = ClientConnection()
        _, frame = conn.send_request("watch", flow.request)
        try:
            sock.sendall(frame)
        except OSError as exc:
            sock.close()
            raise BrokerUnavailable(f"the watch on {self.socket_path} failed: {exc.strerror or exc}") from None
        return sock, conn

    def _reopen_watch(self, watch: list[tuple[socket.socket, ClientConnection]], flow: WatchFlow, delay: float) -> bool:
        watch[0][0].close()
        time.sleep(delay)
        try:
            watch[0] = self._open_watch(flow)
        except BrokerUnavailable:
            return False
        return True

    def _watch_tokens(self, watch: list[tuple[socket.socket, ClientConnection]], flow: WatchFlow) -> Iterator[Token]:
        """The I/O of a watch; ``WatchFlow`` has its rules (dedup, reconnect, end)."""
        from dc_token.watch import Reopen

        step = flow.send(None)
        while step is not None:
            if isinstance(step, Token):
                yield step
                step = flow.send(None)
            elif isinstance(step, Reopen):  # the broker went away: close, wait, open again
                step = flow.send(self._reopen_watch(watch, flow, step.delay))
            else:  # READ (expires_in was measured just before the push)
                step = flow.send((_next(*watch[0]), _monotonic()))
