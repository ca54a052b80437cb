"""`dc-broker proxy` alive whatever the upstream and the client do (issue 21's findings 4 and 5): a
truncated upstream body, an over-long URL, malformed requests and an upstream that pauses mid-body
each cost one request, never the process or the listener.

The truncation and the URLs go through the real proxy process (an upstream in a thread here answers
with exactly the bytes a test needs). The pauses run in-process on trio's autojump clock: the proxy
(``Proxy``, with a fixed token instead of a broker), an h11 upstream and the client on real sockets,
so a 61-second pause takes no real time.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path

import h11
import pytest
import trio
import trio.testing

from dc_broker.proxy.rules import MAX_URL, REPLAY_LIMIT, Limits, Rules
from dc_broker.proxy.serve import Proxy
from dc_broker.proxy.upstream import Upstreams
from tests.e2e import dev_broker
from tests.sockets import accept_in_thread, each_in_thread, read_head
from tests.test_proxy import curl, proxy_process

TRUNCATED = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000  # then the connection closes
#: chunked, with a Content-Length that disagrees (Transfer-Encoding wins: the body is "hello, world")
BOTH = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n"
)
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


@contextmanager
def raw_upstream() -> Iterator[str]:
    """An HTTP/1.1 upstream that answers ``/truncated`` with 1,000 of 100,000 promised bytes and then
    closes, ``/pause/N`` with 64 KiB of its body, a pause of N seconds, the other 64 KiB, and anything
    else with ``ok``; its base URL."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)

    def handle(conn: socket.socket) -> None:
        with conn:
            buf = b""
            while (read := read_head(conn, buf)) is not None:
                head, buf = read
                if head.split(b" ")[1].startswith(b"/truncated"):
                    conn.sendall(TRUNCATED)
                    return
                if head.split(b" ")[1].startswith(b"/pause/"):
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 131072\r\n\r\n" + b"p" * 65536)
                    time.sleep(float(head.split(b" ")[1].rsplit(b"/", 1)[1]))
                    conn.sendall(b"p" * 65536)
                    continue
                conn.sendall(BOTH if head.split(b" ")[1] == b"/both" else OK)

    accept_in_thread(listener, each_in_thread(handle))
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    with (
        dev_broker(tmp_path_factory.mktemp("proxy-faults")) as (sock, _, _),
        raw_upstream() as upstream,
        proxy_process(sock, upstream) as (addr, proc),
    ):
        yield addr, upstream
        assert proc.poll() is None, "the proxy died"


@pytest.mark.e2e
def test_a_truncated_upstream_body_costs_one_request(proxied: tuple[str, str]) -> None:
    addr, _ = proxied
    for _ in range(3):
        code, message = curl(f"http://{addr}/truncated")
        assert code == -18, message  # curl: "(18) transfer closed with 99000 bytes remaining to read"
        assert curl(f"http://{addr}/next")[0] == 200


@pytest.mark.e2e
@pytest.mark.slow
def test_a_60_second_pause_mid_body_costs_the_real_proxy_nothing(proxied: tuple[str, str]) -> None:
    """Finding 5 on the real `dc-broker proxy` process (an upstream that paused 60 s mid-body ended it
    with httpx.ReadTimeout): the answer comes whole after the pause, the next request is served, and
    the process lives (the fixture checks it at the end). The limits' edges are tested on trio's
    clock below; this is the real process, in real time."""
    addr, _ = proxied
    started = time.monotonic()
    out = subprocess.run(
        ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", f"http://{addr}/pause/61"], capture_output=True, timeout=180
    )
    assert out.returncode == 0, out.stderr
    body, _, code = out.stdout.rpartition(b"\n")
    assert (code, len(body), set(body)) == (b"200", 131072, {ord("p")})
    assert time.monotonic() - started >= 61
    assert curl(f"http://{addr}/next")[0] == 200


@pytest.mark.e2e
def test_an_answer_both_chunked_and_with_a_length_is_passed_on_as_it_was_read(proxied: tuple[str, str]) -> None:
    """The upstream's Content-Length is dropped with its Transfer-Encoding (as the proxy read the body
    chunked), so the client gets the whole body under the proxy's own framing, not a cut answer."""
    addr, _ = proxied
    assert curl(f"http://{addr}/both") == (200, "hello, world")
    assert curl(f"http://{addr}/next")[0] == 200


@pytest.mark.e2e
def test_an_over_long_url_is_refused_and_the_proxy_lives(proxied: tuple[str, str]) -> None:
    addr, upstream = proxied
    target = "/" + "a" * (MAX_URL - len(upstream))  # one character more than goes upstream
    code, body = curl(f"http://{addr}{target}")
    assert code == 414 and body == (
        f"dc-broker proxy: the URL is {MAX_URL + 1} characters long; at most {MAX_URL} go upstream\n"
    )
    assert curl(f"http://{addr}/next")[0] == 200
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as s:  # a head that is still not over at 192 KiB
        s.sendall(b"GET /" + b"a" * 192 * 1024)
        assert s.recv(65536).startswith(b"HTTP/1.1 431 ")
    assert curl(f"http://{addr}/next")[0] == 200


@pytest.mark.e2e
def test_malformed_requests_get_400_and_the_proxy_lives(proxied: tuple[str, str]) -> None:
    addr, _ = proxied
    host, port = addr.rsplit(":", 1)
    for garbage in (
        b"GET / HTTP/1.1\r\nHost: " + addr.encode() + b"\r\nContent-Length: x\r\n\r\n",
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: " + addr.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ):
        with socket.create_connection((host, int(port))) as s:
            s.sendall(garbage)
            s.settimeout(10)
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        assert b"dc-broker proxy: bad request" in answer
    assert curl(f"http://{addr}/next")[0] == 200


# ---------------------------------------------------------------- pauses, on the autojump clock


class FixedToken:
    """The token source of an in-process proxy: always the same token."""

    async def token(self, min_ttl: float) -> str:
        return "fixed-test-token"

    async def invalidate(self, token: str) -> None:
        return None


async def h11_upstream(stream: trio.SocketStream, seen: list[str] | None = None) -> None:
    """``/pause/N``: 64 KiB of the body, a pause of N seconds, the other 64 KiB. ``/head/N``: the
    answer starts after N seconds. ``/upload``: reads the body, answers how many bytes came.
    ``/size/N``: N bytes, 64 KiB at a time. ``seen``: each request's target, then ``end`` once its
    body is whole."""
    conn = h11.Connection(h11.SERVER)
    received = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
            continue
        if isinstance(event, h11.Request):
            target, received = event.target.decode(), 0
            if seen is not None:
                seen.append(target)
        elif isinstance(event, h11.Data):
            received += len(event.data)
        elif isinstance(event, h11.EndOfMessage):
            if seen is not None:
                seen.append("end")
            if target.startswith("/size/"):
                size = int(target.rsplit("/", 1)[1])
                await stream.send_all(conn.send(h11.Response(status_code=200, headers=[("content-length", str(size))])))
                piece = b"s" * 65536
                for _ in range(size // len(piece)):
                    await stream.send_all(conn.send(h11.Data(data=piece)))
                await stream.send_all(conn.send(h11.EndOfMessage()))
            elif target == "/upload":
                body = str(received).encode()
                head = h11.Response(status_code=200, headers=[("content-length", str(len(body)))])
                await stream.send_all(conn.send(head) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
            elif target.startswith("/head/"):
                await trio.sleep(float(target.rsplit("/", 1)[1]))
                head = h11.Response(status_code=200, headers=[("content-length", "2")])
                await stream.send_all(conn.send(head) + conn.send(h11.Data(data=b"ok")) + conn.send(h11.EndOfMessage()))
            else:
                half = b"p" * 65536
                await stream.send_all(conn.send(h11.Response(status_code=200, headers=[("content-length", "131072")])))
                await stream.send_all(conn.send(h11.Data(data=half)))
                await trio.sleep(float(target.rsplit("/", 1)[1]))
                await stream.send_all(conn.send(h11.Data(data=half)) + conn.send(h11.EndOfMessage()))
            conn.start_next_cycle()
        else:
            return


@asynccontextmanager
async def in_process_proxy(
    tmp_path: Path,
    limits: Limits | None = None,
    upstream: str = "",
    handler: Callable[[trio.SocketStream], Awaitable[None]] = h11_upstream,
) -> AsyncIterator[str]:
    """A proxy in this trio run in front of ``upstream`` (by default ``handler``, ``h11_upstream``,
    started here too); yields the proxy's Unix socket path."""
    async with trio.open_nursery() as nursery:
        if not upstream:
            listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
            upstream = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        path = str(tmp_path / "proxy.sock")
        raw = socket.socket(socket.AF_UNIX)
        raw.bind(path)
        raw.listen()
        proxy = Proxy(
            "demo",
            upstream,
            tokens=FixedToken(),
            http=Upstreams(upstream, None),
            rules=Rules(os.geteuid()),
            limits=limits or Limits(),
        )
        await nursery.start(proxy.serve, [raw])
        yield path
        nursery.cancel_scope.cancel()


async def fetch(path: str, target: str, body: list[bytes] | None = None, pace: float = 0) -> tuple[int, bytes, bool]:
    """A request through the proxy (GET, or a chunked POST of ``body``, one piece every ``pace``
    seconds): status, the body received, whether it ended complete."""
    stream = await trio.open_unix_socket(path)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        headers = [("host", "localhost")] + ([("transfer-encoding", "chunked")] if body is not None else [])
        request = h11.Request(method="GET" if body is None else "POST", target=target, headers=headers)
        await stream.send_all(conn.send(request))
        for piece in body or []:
            await trio.sleep(pace)
            await stream.send_all(conn.send(h11.Data(data=piece)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
        return await read_answer(stream, conn)


async def read_answer(stream: trio.abc.ReceiveStream, conn: h11.Connection) -> tuple[int, bytes, bool]:
    """The answer to the request ``conn`` sent: status, the body received, whether it ended complete."""
    status, received = 0, b""
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:  # closed mid-body
            return status, received, False
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
            continue
        if isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            received += event.data
        elif isinstance(event, h11.EndOfMessage):
            return status, received, True
        else:
            return status, received, False


async def test_a_60_second_pause_mid_body_is_waited_out(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with in_process_proxy(tmp_path) as path:
        started = trio.current_time()
        status, body, complete = await fetch(path, "/pause/61")
        assert (status, len(body), complete) == (200, 131072, True)
        assert trio.current_time() - started >= 61
        assert (await fetch(path, "/pause/0"))[2]  # and the next request is served


async def test_a_pause_past_the_idle_limit_cuts_that_answer_only(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with in_process_proxy(tmp_path) as path:
        started = trio.current_time()
        status, body, complete = await fetch(path, f"/pause/{Limits().idle + 60:g}")
        assert (status, len(body), complete) == (200, 65536, False)  # cut: the client sees it truncated
        assert Limits().idle <= trio.current_time() - started < Limits().idle + 60
        status, body, complete = await fetch(path, "/pause/1")
        assert (status, len(body), complete) == (200, 131072, True)


async def test_an_answer_that_does_not_start_in_time_is_a_504(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    limit = Limits().response_head
    async with in_process_proxy(tmp_path) as path:
        started = trio.current_time()
        status, body, _ = await fetch(path, f"/head/{limit + 60:g}")
        assert status == 504 and body.startswith(b"dc-broker proxy: upstream http://127.0.0.1:"), body
        assert body.endswith(f"failed: no answer within {limit:g} s\n".encode())
        assert limit <= trio.current_time() - started < limit + 60
        assert (await fetch(path, f"/head/{limit - 10:g}"))[:2] == (200, b"ok")


async def test_a_slow_upload_is_not_cut_by_the_answer_deadline(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A streamed body (over REPLAY_LIMIT) that takes longer than ``response_head`` to send, in
    pieces well within ``idle``: the deadline for the answer starts when the body ends."""
    limits = Limits()
    pieces = [b"u" * (512 * 1024)] * 8  # 4 MiB: the first three (over 1 MiB) are read, then it streams
    pace = (limits.response_head + 60) / 5  # the five streamed pieces take longer than response_head
    assert pace < limits.idle
    async with in_process_proxy(tmp_path) as path:
        status, body, complete = await fetch(path, "/upload", pieces, pace)
        assert (status, body, complete) == (200, b"4194304", True)


async def read_all(stream: trio.SocketStream) -> bytes:
    got = b""
    while data := await stream.receive_some(65536):
        got += data
    return got


async def test_a_head_that_stops_half_way_gets_408_and_an_idle_connection_is_closed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    limits = Limits()
    async with in_process_proxy(tmp_path) as path:
        started = trio.current_time()
        async with await trio.open_unix_socket(path) as stream:
            await stream.send_all(b"GET /pause/0 HTTP/1.1\r\nHost: loc")
            answer = await read_all(stream)
        assert answer.startswith(b"HTTP/1.1 408 ") and b"the request head did not arrive in time" in answer
        assert trio.current_time() - started == pytest.approx(limits.request_head, abs=limits.linger + 0.1)
        async with await trio.open_unix_socket(path) as stream:
            await stream.send_all(b"GET /pause/0 HTTP/1.1\r\nHost: localhost\r\n\r\n")
            started = trio.current_time()
            answer = await read_all(stream)  # the answer, then nothing until the keep-alive limit closes it
        assert answer.startswith(b"HTTP/1.1 200 ") and len(answer.split(b"\r\n\r\n", 1)[1]) == 131072
        assert limits.keep_alive <= trio.current_time() - started < limits.keep_alive + limits.linger + 0.1


async def test_the_owners_connections_beyond_its_slots_get_503(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with in_process_proxy(tmp_path, Limits(connections=2)) as path:
        held = [await trio.open_unix_socket(path) for _ in range(2)]
        await trio.sleep(1)  # both accepted and waiting for their heads
        async with await trio.open_unix_socket(path) as third:
            answer = await read_all(third)
        assert answer.startswith(b"HTTP/1.1 503 ") and b"2 connections are open already" in answer
        for stream in held:
            await stream.aclose()
        await trio.sleep(Limits().linger + 1)  # the slots are free again once the proxy has closed them
        assert (await fetch(path, "/pause/0"))[:1] == (200,)


# ---------------------------------------------------------------- the client's pace, on the autojump clock


def cut_off(seen: list[str]) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """``h11_upstream`` recording into ``seen``, for answers and requests the proxy cuts: the
    connection it then closes ends the upstream's exchange, not the test."""

    async def handle(stream: trio.SocketStream) -> None:
        try:
            await h11_upstream(stream, seen)
        except (trio.BrokenResourceError, h11.RemoteProtocolError):
            seen.append("cut")

    return handle


async def test_a_client_that_stops_reading_is_cut_after_the_idle_limit(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """An answer far larger than the sockets' buffers, and a client that reads its head and then
    nothing: once nothing has moved for ``idle`` the proxy cuts that answer (its framing tells the
    client it is short), closes the upstream's connection, and serves the next request."""
    idle, size = Limits().idle, 64 * 1024 * 1024
    seen: list[str] = []
    cut = re.compile(rf"GET http://127\.0\.0\.1:\d+/size/{size}: the client read nothing for 300 s; cut")
    with caplog.at_level("WARNING", logger="dc_broker.proxy"), trio.fail_after(idle + 60):
        async with in_process_proxy(tmp_path, handler=cut_off(seen)) as path:
            async with await trio.open_unix_socket(path) as stream:
                conn = h11.Connection(h11.CLIENT)
                request = h11.Request(method="GET", target=f"/size/{size}", headers=[("host", "x")])
                await stream.send_all(conn.send(request))
                await trio.sleep(idle - 2)  # it reads nothing
                assert not [m for m in caplog.messages if "; cut" in m], caplog.messages
                await trio.sleep(3)
                cuts = [m for m in caplog.messages if "; cut" in m]
                assert len(cuts) == 1 and cut.fullmatch(cuts[0]), caplog.messages
                status, body, complete = await read_answer(stream, conn)  # what was on its way, then the end
            assert (status, complete) == (200, False) and 0 < len(body) < size
            assert seen == [f"/size/{size}", "end", "cut"]  # the upstream's connection was closed too
            assert await fetch(path, "/pause/0") == (200, b"p" * 131072, True)


@pytest.mark.parametrize(
    ("sent", "kept"),
    [(b"k" * 1000, True), (b"s" * (REPLAY_LIMIT + 65536), False)],
    ids=["kept-body", "streamed-body"],
)
async def test_a_request_body_that_stalls_past_the_idle_limit_gets_408(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, sent: bytes, kept: bool
) -> None:
    """A request body that stops coming for ``idle``: the client is told 408 (and the connection is
    closed). A body small enough to be kept never went upstream; a streamed one went, unfinished,
    and its upstream connection is closed."""
    idle = Limits().idle
    seen: list[str] = []
    with trio.fail_after(idle + 60):
        async with in_process_proxy(tmp_path, handler=cut_off(seen)) as path:
            async with await trio.open_unix_socket(path) as stream:
                conn = h11.Connection(h11.CLIENT)
                length = str(len(sent) + 10)  # 10 bytes more than ever come
                request = h11.Request(
                    method="POST", target="/upload", headers=[("host", "x"), ("content-length", length)]
                )
                await stream.send_all(conn.send(request) + conn.send(h11.Data(data=sent)))
                started = trio.current_time()
                answer = await read_answer(stream, conn)
                assert answer == (408, b"dc-broker proxy: the request body stalled for 300 s\n", True)
                assert idle <= trio.current_time() - started < idle + 1
                assert await stream.receive_some(65536) == b""  # and closed
            await trio.sleep(1)  # the proxy's side of the upstream connection is closed in its own time
            assert seen == ([] if kept else ["/upload", "cut"])
            assert await fetch(path, "/upload", [b"ok"]) == (200, b"2", True)
