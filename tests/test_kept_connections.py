"""A kept (keep-alive) connection the server closes just as a request leaves on it.

Servers close idle connections when their own keep-alive timeout runs out (Apache, Node.js and
hypercorn after 5 s, httpx's own expiry too), and a request that leaves on one at that moment breaks
before any answer: a reset, or a close without a word. The server never read it, and a new
connection would have served it. CI met it once: the dev IdP (hypercorn) closed the broker's kept
connection as a client_credentials grant left on it, and a caller got ``upstream_unavailable``.

Here a real server on loopback closes a kept connection exactly when the next request arrives on
it (the race, made certain), and the IdP transport and the proxy are held to:

- the IdP transport sends the token request again on another connection (a refresh too: its answer
  is the only copy of the next refresh token); never after a new connection broke, a timeout, or
  once an answer's head came;
- the proxy sends an idempotent request with a kept body again (RFC 9112 9.3.1), and answers a
  POST's 502 saying why it did not.
"""

from __future__ import annotations

import json
import socket
import struct
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import h11
import httpx
import jwt
import pytest
import trio
import trio.testing

from dc_broker.config import Profile
from dc_broker.errors import AnswerLost, UpstreamTransient
from dc_broker.idp import clientkeys, oidc
from dc_broker.idp.transport import IdpTransport, Timeouts
from dc_broker.proxy.rules import REPLAY_LIMIT, Limits
from dc_broker.proxy.upstream import RemoteProtocolError, Upstreams
from dc_broker.secret import Secret
from dc_broker.sessions.session import Session
from dc_broker.store import MemoryStore
from dc_broker.tokens import Credentials
from tests.sockets import receive_head
from tests.test_proxy_faults import in_process_proxy, read_answer

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@dataclass
class Closing:
    """What the server does with the ``n``th request (1-based) of its ``c``th connection: ``act(c, n)``
    is ``answer``, ``close`` (read it, close: a FIN), ``reset`` (read it, close with SO_LINGER 0: an
    RST), ``stall`` (read it, never answer), ``half`` (half a head, then close) or ``cut`` (a whole
    head, part of the body, then close)."""

    act: Callable[[int, int], str]
    answer: bytes = OK
    connections: int = 0
    requests: list[tuple[int, bytes]] = field(default_factory=list)  # (connection, request line)
    bodies: list[bytes] = field(default_factory=list)

    async def serve(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        c, n, buf = self.connections, 0, b""
        async with stream:
            while (read := await receive_head(stream, buf)) is not None:
                head, buf = read
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.lower().split(b"\r\n")
                        if line.startswith(b"content-length:")
                    ),
                    0,
                )
                while len(buf) < length:
                    if not (more := await stream.receive_some(65536)):
                        return
                    buf += more
                body, buf = buf[:length], buf[length:]
                n += 1
                self.requests.append((c, head.split(b"\r\n")[0]))
                self.bodies.append(body)
                act = self.act(c, n)
                if act == "answer":
                    await stream.send_all(self.answer)
                    continue
                if act == "reset":
                    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                elif act == "half":
                    await stream.send_all(OK[:12])
                elif act == "cut":
                    await stream.send_all(OK.replace(b"Length: 2", b"Length: 9"))
                elif act == "stall":
                    await trio.sleep_forever()
                return


@asynccontextmanager
async def closing(act: Callable[[int, int], str], answer: bytes = OK) -> AsyncIterator[tuple[str, Closing]]:
    server = Closing(act, answer)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, server.serve, 0, host="127.0.0.1"))
        yield f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}", server
        nursery.cancel_scope.cancel()


def second_on_first(how: str) -> Callable[[int, int], str]:
    """Answers everything but the second request on the first connection, which meets ``how``."""
    return lambda c, n: how if (c, n) == (1, 2) else "answer"


CLIENT = oidc.ClientCredentials("dc-service", "secret")


def refresh(url: str) -> oidc.HttpRequest:
    return oidc.build_refresh(url + "/token", CLIENT, Secret("the-refresh-token"))


# ---------------------------------------------------------------- the IdP transport


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_a_kept_connection_the_idp_closed_is_left_for_another(how: str) -> None:
    async with closing(second_on_first(how)) as (url, server):
        transport = IdpTransport()
        try:
            assert (await transport.send(refresh(url))).status == 200
            assert (await transport.send(refresh(url))).status == 200  # the same refresh, again
        finally:
            await transport.aclose()
    assert server.connections == 2
    assert [c for c, _ in server.requests] == [1, 1, 2]


async def test_a_request_sent_again_carries_a_new_client_assertion() -> None:
    """A server that read the request before the connection broke may have spent the assertion's
    single-use ``jti`` (Keycloak: "Token reuse detected", which reads as a rejected key): the
    request goes again with an assertion made anew, and the answer's text is redacted of both."""
    token = json.dumps({"access_token": "at", "token_type": "Bearer", "expires_in": 300}).encode()
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(token),
        token,
    )
    keys = clientkeys.KeySet(clientkeys.generate("ec", now=time.time()))
    async with closing(second_on_first("close"), answer) as (url, server):
        profile = Profile(
            name="svc", client_id="svc", grant="client_credentials", server=url, tenant="demo",
            legacy_paths=False, auth_method="private_key_jwt",
        )  # fmt: skip
        transport = IdpTransport()
        session = Session(profile, MemoryStore({"svc": Credentials(client_keys=keys.to_secret())}), transport)
        try:
            await session.verify()
            await session.verify()  # its first sending meets the closed connection
        finally:
            await transport.aclose()
    assert [c for c, _ in server.requests] == [1, 1, 2]
    sent = [dict(urllib.parse.parse_qsl(body.decode()))["client_assertion"] for body in server.bodies]
    jtis = [jwt.decode(a, options={"verify_signature": False})["jti"] for a in sent]
    assert len(set(jtis)) == 3 and len(set(sent)) == 3


async def test_every_kept_connection_closed_at_once_is_left_until_a_new_one_answers() -> None:
    """Three kept connections (three requests at once made them), all closed by the server as the
    next request meets them: the request goes on until a new connection serves it."""
    async with closing(lambda c, n: "answer" if n == 1 else "close") as (url, server):
        transport = IdpTransport()
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(transport.send, refresh(url))
            assert server.connections == 3
            assert (await transport.send(refresh(url))).status == 200
        finally:
            await transport.aclose()
    assert server.connections == 4


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_a_new_connection_that_breaks_is_not_sent_again(how: str) -> None:
    async with closing(lambda c, n: how) as (url, server):
        transport = IdpTransport()
        try:
            with pytest.raises(AnswerLost, match="unreachable"):  # a refresh that went out: in doubt
                await transport.send(refresh(url))
            password = oidc.build_password(url + "/token", CLIENT, "alice", Secret("pw"))
            with pytest.raises(UpstreamTransient) as caught:
                await transport.send(password)
            assert not isinstance(caught.value, AnswerLost)
        finally:
            await transport.aclose()
    assert len(server.requests) == 2  # each once


async def test_a_request_through_another_transport_is_sent_once() -> None:
    """Only httpcore's trace says a connection was kept: a test's ``MockTransport`` says nothing,
    and its failure is not taken for a closed kept connection."""
    calls = []

    def fail(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)

    transport = IdpTransport(transport=httpx.MockTransport(fail))
    with pytest.raises(AnswerLost):
        await transport.send(refresh("http://127.0.0.1:1"))
    assert len(calls) == 1


async def test_a_kept_connection_that_times_out_or_gives_an_answer_s_head_is_not_sent_again() -> None:
    """httpcore does not tell a head begun from none (a ``half`` head is sent again: no trace event says
    a byte came), so only a whole head is "answered"; a token request is safe to send again anyway."""
    for how, error in (("stall", "timed out"), ("cut", "unreachable")):
        async with closing(second_on_first(how)) as (url, server):
            transport = IdpTransport(Timeouts(patient_read=1.0))
            try:
                await transport.send(refresh(url))
                with pytest.raises(AnswerLost, match=error):
                    await transport.send(refresh(url))
            finally:
                await transport.aclose()
        assert len(server.requests) == 2, how


# ---------------------------------------------------------------- the proxy


async def test_the_upstream_connection_is_stale_only_when_kept_and_closed_unanswered() -> None:
    async with closing(lambda c, n: {(1, 2): "close", (2, 1): "close", (3, 2): "half"}.get((c, n), "answer")) as (
        url,
        _,
    ):
        upstream = Upstreams(url, None).take()
        for expected in (None, True, False, None, False):  # ok; kept, closed; new, closed; ok; kept, half
            try:
                await upstream.send(b"GET", b"/", [], b"")
                await upstream.response()
                while await upstream.piece() is not None:
                    pass
                assert expected is None
            except RemoteProtocolError:
                assert upstream.stale is expected
        upstream.close()


async def two_requests(path: str, method: str, body: bytes) -> list[tuple[int, bytes]]:
    """A GET, then ``method`` with ``body``, on one client connection (so on one kept upstream
    connection): each one's status and body."""
    answers = []
    async with await trio.open_unix_socket(path) as stream:
        conn = h11.Connection(h11.CLIENT)
        for verb, data in (("GET", b""), (method, body)):
            headers = [("host", "localhost"), ("content-length", str(len(data)))]
            await stream.send_all(
                conn.send(h11.Request(method=verb, target="/", headers=headers))
                + conn.send(h11.Data(data=data))
                + conn.send(h11.EndOfMessage())
            )
            status, got, complete = await read_answer(stream, conn)
            assert complete, (verb, status, got)
            answers.append((status, got))
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                break
            conn.start_next_cycle()
    return answers


async def test_a_request_on_a_new_connection_that_breaks_is_not_sent_again(tmp_path: Path) -> None:
    async with closing(lambda c, n: "close") as (url, server), in_process_proxy(tmp_path, upstream=url) as path:
        [(status, body)] = await two_requests(path, "GET", b"")  # a 502 ends the client's connection
    assert status == 502 and b"closed the connection without answering" in body, body
    assert b"kept connection" not in body
    assert server.requests == [(1, b"GET / HTTP/1.1")]


@pytest.mark.parametrize(("method", "how"), [("GET", "close"), ("PUT", "reset"), ("DELETE", "close")])
async def test_an_idempotent_request_that_meets_a_closing_kept_connection_goes_again(
    method: str, how: str, tmp_path: Path
) -> None:
    async with closing(second_on_first(how)) as (url, server), in_process_proxy(tmp_path, upstream=url) as path:
        assert await two_requests(path, method, b"a=b" if method == "PUT" else b"") == [(200, b"ok"), (200, b"ok")]
    assert [c for c, _ in server.requests] == [1, 1, 2]


@pytest.mark.parametrize(
    ("method", "size", "why"),
    [("POST", 3, "it is not idempotent"), ("PUT", REPLAY_LIMIT + 1, "its body was streamed, not kept")],
)
async def test_a_request_that_may_not_go_again_gets_a_502_saying_why(
    method: str, size: int, why: str, tmp_path: Path
) -> None:
    async with closing(second_on_first("close")) as (url, server), in_process_proxy(tmp_path, upstream=url) as path:
        [first, (status, body)] = await two_requests(path, method, b"x" * size)
    assert first == (200, b"ok")
    assert status == 502, body
    assert f"closed a kept connection as this {method} left on it; {why}".encode() in body, body
    assert [c for c, _ in server.requests] == [1, 1]  # sent once


async def test_a_request_whose_answer_is_late_on_a_kept_connection_is_not_sent_again(tmp_path: Path) -> None:
    """The upstream has it and is slow: a 504, and the upstream saw it once."""
    limits = Limits(response_head=1.0)
    async with (
        closing(second_on_first("stall")) as (url, server),
        in_process_proxy(tmp_path, limits, upstream=url) as path,
    ):
        [first, (status, body)] = await two_requests(path, "GET", b"")
    assert (first, status) == ((200, b"ok"), 504), body
    assert body.endswith(b"failed: no answer within 1 s\n"), body
    assert [c for c, _ in server.requests] == [1, 1]
