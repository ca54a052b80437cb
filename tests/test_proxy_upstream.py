"""The proxy's connections: ``RawStream`` (trio's stream contract over a non-blocking socket) and
``Upstream`` (h11 to the upstream: the route's parts, keep-alive reuse, a connection the upstream
closed while idle, answers that quote what they were sent).

The streams and upstreams here are real sockets in this trio run; the upstreams answer with exactly
the bytes a test needs."""

from __future__ import annotations

import base64
import contextlib
import queue
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial

import h11
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dc_broker.proxy.stream import CALLS_PER_CHECKPOINT, RawStream
from dc_broker.proxy.upstream import (
    KEEPALIVE_EXPIRY,
    ConnectError,
    RemoteProtocolError,
    Route,
    Unsendable,
    Upstream,
    Upstreams,
)
from tests.sockets import accept_in_thread, read_head, receive_head

SECRET = "eyJ-the-token-itself"


def test_the_route_s_parts() -> None:
    plain = Route.of("http://127.0.0.1:8080/api")
    assert (plain.authority, plain.prefix, plain.target(b"/x?y=1")) == (b"127.0.0.1:8080", b"/api", b"/api/x?y=1")
    default = Route.of("https://dc.example.com")
    assert (default.port, default.authority, default.target(b"/")) == (443, b"dc.example.com", b"/")
    assert default.connect == b"dc.example.com:443"  # a CONNECT target always names its port
    assert (Route.of("http://[::1]:80/").authority, Route.of("http://[::1]:80/").connect) == (b"[::1]", b"[::1]:80")
    assert Route.of("https://bücher.example:8443").authority == b"xn--bcher-kva.example:8443"
    assert Route.of("https://" + "a" * 70 + ".example").authority == b"a" * 70 + b".example"  # no IDNA limits on ASCII
    assert Route.of("https://[::1]:8443").authority == b"[::1]:8443"
    # an http upstream behind a proxy: the absolute form, the credentials (percent-decoded) as Basic
    forwarded = Route.of("http://dc.example.com:8080/api", "http://us%40er:p%3Ass@proxy.corp:3128")
    assert forwarded.target(b"/x") == b"http://dc.example.com:8080/api/x"
    assert (forwarded.via_host, forwarded.via_port, forwarded.tunnel) == ("proxy.corp", 3128, False)
    assert forwarded.via_auth == b"Basic " + base64.b64encode(b"us@er:p:ss")
    # an https upstream behind one: a tunnel, the origin form inside it
    tunnelled = Route.of("https://dc.example.com/api", "https://proxy.corp")
    assert (tunnelled.tunnel, tunnelled.via_tls, tunnelled.via_port, tunnelled.via_auth) == (True, True, 443, None)
    assert tunnelled.target(b"/x") == b"/api/x"


# ---------------------------------------------------------------- RawStream


@asynccontextmanager
async def pair() -> AsyncIterator[tuple[RawStream, socket.socket]]:
    ours, theirs = socket.socketpair()
    stream = RawStream(ours)
    try:
        yield stream, theirs
    finally:
        stream.close()
        theirs.close()


class Steps(trio.abc.Instrument):
    """Counts the times one task is scheduled (each is a pass through the scheduler)."""

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps += 1


async def test_a_stream_that_never_blocks_still_lets_others_run() -> None:
    steps = Steps(trio.lowlevel.current_task())
    async with pair() as (stream, theirs):
        theirs.sendall(b"x" * 4096)
        trio.lowlevel.add_instrument(steps)
        try:
            for call in (lambda: stream.receive_some(1), lambda: stream.send_all(b"y")):
                before = steps.steps
                for _ in range(CALLS_PER_CHECKPOINT - 1):
                    await call()
                assert steps.steps == before  # no pass through the scheduler while the socket is ready
                await call()
                assert steps.steps == before + 1  # the 16th lets the others run
        finally:
            trio.lowlevel.remove_instrument(steps)


async def test_a_pending_cancellation_is_taken_though_data_is_there() -> None:
    async with pair() as (stream, theirs):
        theirs.sendall(b"ready")
        with trio.CancelScope() as scope:
            scope.cancel()
            await stream.receive_some()
        assert scope.cancelled_caught
        assert await stream.receive_some() == b"ready"  # nothing was read by the cancelled call


async def test_it_parks_when_empty_and_wakes_for_data() -> None:
    async with pair() as (stream, theirs), trio.open_nursery() as nursery:
        got: list[bytes] = []

        async def read() -> None:
            got.append(await stream.receive_some())

        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        theirs.sendall(b"late")
        await trio.testing.wait_all_tasks_blocked()
        assert got == [b"late"]


async def test_closed_and_broken_streams_raise_trio_s_errors() -> None:
    async with pair() as (stream, theirs):
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        theirs.close()
        with pytest.raises(trio.BrokenResourceError):
            for _ in range(100):  # until the peer's close shows
                await stream.send_all(b"z" * 65536)
        stream.close()
        with pytest.raises(trio.ClosedResourceError):
            await stream.receive_some()


async def test_closing_wakes_a_parked_reader() -> None:
    async with pair() as (stream, _), trio.open_nursery() as nursery:
        raised: list[type[BaseException]] = []

        async def read() -> None:
            try:
                await stream.receive_some()
            except trio.ClosedResourceError as exc:
                raised.append(type(exc))

        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        stream.close()
    assert raised == [trio.ClosedResourceError]


# ---------------------------------------------------------------- Upstream


@asynccontextmanager
async def raw_upstream(answer: Callable[[bytes], bytes | None]) -> AsyncIterator[tuple[str, list[int]]]:
    """An upstream on loopback that answers each request head with ``answer(head)`` (None: close
    the connection at once, after the answer); yields its URL and a list that counts its accepted
    connections."""
    accepted: list[int] = []

    async def connection(stream: trio.SocketStream) -> None:
        accepted.append(1)
        buf = b""
        async with stream:
            while (read := await receive_head(stream, buf)) is not None:
                head, buf = read
                reply = answer(head)
                if reply is None:
                    return
                await stream.send_all(reply)
                if b"close-after" in head:
                    return

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, connection, 0, host="127.0.0.1"))
        yield f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}", accepted
        nursery.cancel_scope.cancel()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Trace-Id: 7\r\n\r\nok"


async def exchange(upstream: Upstream, path: bytes = b"/") -> tuple[h11.Response, bytes]:
    await upstream.send(b"GET", path, [(b"accept", b"*/*"), (b"authorization", f"Bearer {SECRET}".encode())], b"")
    head = await upstream.response()
    body = b""
    while (piece := await upstream.piece()) is not None:
        body += piece
    return head, body


async def test_one_connection_carries_request_after_request() -> None:
    heads: list[bytes] = []

    def answer(head: bytes) -> bytes:
        heads.append(head)
        return OK

    async with raw_upstream(answer) as (url, accepted):
        upstream = Upstreams(url + "/base", None).take()
        for n in range(3):
            head, body = await exchange(upstream, b"/n%d" % n)
            assert (head.status_code, body, upstream.idle) == (200, b"ok", True)
        assert (b"X-Trace-Id", b"7") in head.headers.raw_items()  # the answer's own spelling is kept
        upstream.close()
    assert len(accepted) == 1
    assert heads[0].split(b"\r\n")[:2] == [b"GET /base/n0 HTTP/1.1", b"host: 127.0.0.1:" + url.rsplit(":")[-1].encode()]


async def test_a_connection_the_upstream_closed_while_idle_is_replaced_not_failed() -> None:
    async with raw_upstream(lambda head: OK) as (url, accepted):
        upstream = Upstreams(url, None).take()
        assert (await exchange(upstream, b"/close-after"))[0].status_code == 200
        await trio.testing.wait_all_tasks_blocked()  # the upstream has closed its end
        assert upstream.idle  # as far as HTTP goes: only the socket tells
        assert (await exchange(upstream))[1] == b"ok"
        upstream.close()
    assert len(accepted) == 2


async def test_a_connection_idle_past_the_keep_alive_expiry_is_not_reused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with raw_upstream(lambda head: OK) as (url, accepted):
        upstream = Upstreams(url, None).take()
        await exchange(upstream)
        await trio.sleep(KEEPALIVE_EXPIRY - 1)
        await exchange(upstream)  # still fresh: the same connection
        assert len(accepted) == 1
        await trio.sleep(KEEPALIVE_EXPIRY + 1)
        await exchange(upstream)  # the server may be closing it just now: a new one
        upstream.close()
    assert len(accepted) == 2


async def test_an_answer_that_quotes_the_token_in_garbage_is_not_quoted_back() -> None:
    echoed = f"HTTP/1.1 2x0 Bearer {SECRET}\r\n\r\n".encode()
    async with raw_upstream(lambda head: echoed) as (url, _):
        upstream = Upstreams(url, None).take()
        with pytest.raises(RemoteProtocolError) as caught:
            await exchange(upstream)
        assert SECRET not in str(caught.value) and "status line" in str(caught.value), caught.value
        assert not upstream.idle  # broken: never reused


async def test_an_upstream_that_closes_without_answering() -> None:
    async with raw_upstream(lambda head: None) as (url, _):
        upstream = Upstreams(url, None).take()
        with pytest.raises(RemoteProtocolError, match="closed the connection without answering"):
            await exchange(upstream)


async def test_an_unsendable_header_is_refused_without_quoting_it() -> None:
    async with raw_upstream(lambda head: OK) as (url, _):
        upstream = Upstreams(url, None).take()
        with pytest.raises(Unsendable) as caught:
            await upstream.send(b"GET", b"/", [(b"authorization", f"Bearer {SECRET}\n".encode())], b"")
        assert SECRET not in str(caught.value)
        assert (await exchange(upstream))[1] == b"ok"  # the next request opens a clean connection


async def test_nothing_listening_is_a_connect_error() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    upstream = Upstreams(f"http://127.0.0.1:{port}", None).take()
    with pytest.raises(ConnectError, match=r"refused|failed"):
        await exchange(upstream)


async def test_an_answer_given_before_the_body_was_read_is_relayed_not_a_write_error() -> None:
    """An upstream that answers 413 as soon as it has the head and closes without reading the body:
    the body's writes fail, and the 413 is the answer (as httpcore reads it too), not a 502."""
    refused = b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 9\r\nConnection: close\r\n\r\ntoo large"

    async def body() -> AsyncIterator[bytes]:
        for _ in range(256):  # 16 MiB: more than the sockets' buffers hold
            yield b"b" * 65536

    async with raw_upstream(lambda head: refused) as (url, _):
        upstream = Upstreams(url, None).take()
        await upstream.send(b"POST", b"/close-after", [], body())
        head = await upstream.response()
        assert (head.status_code, await upstream.piece(), await upstream.piece()) == (413, b"too large", None)
        assert not upstream.idle  # the request was never finished: not reused


# ---------------------------------------------------------------- any order of what an upstream does


class Scripted:
    """A blocking upstream in threads: each request head gets the next answer the test queued
    (``SILENT``: close without answering). ``vanish`` closes every connection it holds, as a server
    ending idle keep-alive connections does."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.answers: queue.Queue[bytes] = queue.Queue()
        self.accepted = 0
        self.live: dict[socket.socket, threading.Thread] = {}
        accept_in_thread(self.listener, self._take)

    def _take(self, conn: socket.socket) -> None:
        self.accepted += 1
        thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
        self.live[conn] = thread
        thread.start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        try:
            while (read := read_head(conn, buf)) is not None:
                buf = read[1]  # GETs only, but for the early answer
                answer = self.answers.get(timeout=10)
                if answer is not SILENT:
                    conn.sendall(answer)
                if answer is SILENT or b"connection: close" in answer.lower():
                    return  # a body still coming is not read: the close resets it
        except OSError:
            return
        finally:
            conn.close()
            self.live.pop(conn, None)

    def vanish(self) -> None:
        for conn, thread in list(self.live.items()):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # wakes its thread's recv, which closes it
            thread.join(10)

    def close(self) -> None:
        self.listener.close()
        self.vanish()


SILENT = b""
#: what the upstream does with one request, what the client gets, whether the connection lives on
SCRIPT = {
    "ok": (OK, (200, b"ok"), True),
    "close": (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbye", (200, b"bye"), False),
    "garbage": (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", RemoteProtocolError, False),
    "silent": (SILENT, RemoteProtocolError, False),
    "early": (b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", (413, b""), False),
}


@pytest.fixture(scope="module")
def scripted() -> Iterator[Scripted]:
    server = Scripted()
    yield server
    server.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.sampled_from([*SCRIPT, "vanish"]), max_size=12))
async def test_any_order_of_answers_and_closes_reuses_exactly_the_sound_connections(
    scripted: Scripted, steps: list[str]
) -> None:
    """Whatever the upstream does in whatever order (answers, answers and closes, garbage, silence,
    an answer before the body was read, dropping idle connections): each request gets what was
    answered or a named error, a new connection is opened exactly when the last one cannot carry
    another request, and a failure is ``stale`` (may be sent again) exactly when a kept connection
    was closed on the request unanswered."""

    async def streamed() -> AsyncIterator[bytes]:
        for _ in range(64):  # 4 MiB, most of it never read
            yield b"b" * 65536

    upstream = Upstreams(scripted.url, None).take()
    accepted, connected, opened = scripted.accepted, False, 0
    try:
        for step in steps:
            if step == "vanish":
                scripted.vanish()
                connected = False
                continue
            answer, expected, lives = SCRIPT[step]
            opened += not connected
            scripted.answers.put(answer)
            body: bytes | AsyncIterator[bytes] = streamed() if step == "early" else b""
            with trio.fail_after(10):
                try:
                    await upstream.send(b"POST" if step == "early" else b"GET", b"/" + step.encode(), [], body)
                    head = await upstream.response()
                    got: object = (head.status_code, b"".join([p async for p in _pieces(upstream)]))
                except RemoteProtocolError:
                    got = RemoteProtocolError
            assert got == expected, (step, got)
            if got is RemoteProtocolError:  # stale exactly when it met a kept connection closing unanswered
                assert upstream.stale is (step == "silent" and connected), (steps, step)
            connected = lives
            assert upstream.idle is lives, step
            assert scripted.accepted - accepted == opened, (steps, step)
    finally:
        upstream.close()
        scripted.vanish()


async def _pieces(upstream: Upstream) -> AsyncIterator[bytes]:
    while (piece := await upstream.piece()) is not None:
        yield piece
