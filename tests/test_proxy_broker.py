"""The proxy's link to the broker (dc_broker.proxy.broker.BrokerTokens), against fake brokers on real
Unix sockets in this trio run: every ask goes to the broker (no cache), error replies keep the
connection, a broker restart costs one retry and no error, a broker that is gone or silent is a clear
error for that request, and no more connections are opened than allowed."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from dc_broker.proxy.broker import BrokerTokens
from dc_token.errors import BrokerTimeout, BrokerUnavailable, Locked
from dc_token.protocol import ErrorCode, ErrorReply, FrameDecoder, Reply, encode

Answer = Callable[[dict[str, Any]], Reply | ErrorReply | None]  # None: never answer


class FakeBroker:
    """Answers each frame with ``answer(frame)``; counts connections and requests."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.requests: list[dict[str, Any]] = []

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        decoder = FrameDecoder()
        try:
            while data := await stream.receive_some(65536):
                decoder.receive_data(data)
                while isinstance(frame := decoder.next_frame(), dict):
                    self.requests.append(frame)
                    await trio.sleep(0.01)  # the broker takes a moment: concurrent asks overlap
                    reply = self.answer(frame)
                    if reply is not None:
                        await stream.send_all(encode(reply))
        except trio.BrokenResourceError:
            pass
        finally:
            self.open -= 1


@asynccontextmanager
async def fake_broker(path: str, answer: Answer) -> AsyncIterator[FakeBroker]:
    broker = FakeBroker(answer)
    sock = trio.socket.socket(socket.AF_UNIX)
    await sock.bind(path)
    sock.listen()
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, broker.handle, [trio.SocketListener(sock)])
        yield broker
        nursery.cancel_scope.cancel()


def numbered(frame: dict[str, Any]) -> Reply:
    return Reply(frame["id"], {"token": f"token-{frame['id']}"})


async def test_every_ask_goes_to_the_broker_and_errors_keep_the_connection(tmp_path: Path) -> None:
    path = str(tmp_path / "b.sock")
    locked = {"now": False}

    def answer(frame: dict[str, Any]) -> Reply | ErrorReply:
        if locked["now"]:
            return ErrorReply(frame["id"], ErrorCode.LOCKED, "the vault is locked")
        return numbered(frame)

    async with fake_broker(path, answer) as broker:
        tokens = BrokerTokens(path, "acme")
        assert [await tokens.token(30.0) for _ in range(3)] == ["token-1", "token-2", "token-3"]
        locked["now"] = True
        with pytest.raises(Locked, match="the vault is locked"):
            await tokens.token(30.0)
        locked["now"] = False
        assert await tokens.token(30.0) == "token-5"
        await tokens.invalidate("token-5")
        assert [r["op"] for r in broker.requests] == ["token"] * 5 + ["invalidate"]
        assert broker.requests[0]["profile"] == "acme" and broker.requests[0]["min_ttl"] == 30.0
        assert broker.connections == 1
        tokens.close()


async def test_a_restarted_broker_costs_one_retry_not_an_error(tmp_path: Path) -> None:
    path = str(tmp_path / "b.sock")
    tokens = BrokerTokens(path, "acme")
    async with fake_broker(path, numbered):
        assert await tokens.token(30.0) == "token-1"
    Path(path).unlink()
    async with fake_broker(path, numbered) as again:
        assert await tokens.token(30.0) == "token-1"  # the idle connection was dead: a new one, asked again
        assert again.connections == 1
    Path(path).unlink()
    with pytest.raises(BrokerUnavailable, match=f"no dc-broker is running on {path}"):
        await tokens.token(30.0)


async def test_a_broker_that_closes_a_new_connection_is_not_asked_twice(tmp_path: Path) -> None:
    path = str(tmp_path / "b.sock")

    async def hang_up(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        seen.append(1)

    seen: list[int] = []
    sock = trio.socket.socket(socket.AF_UNIX)
    await sock.bind(path)
    sock.listen()
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, hang_up, [trio.SocketListener(sock)])
        with pytest.raises(BrokerUnavailable, match="closed the connection"):
            await BrokerTokens(path, "acme").token(30.0)
        assert seen == [1]
        nursery.cancel_scope.cancel()


async def test_a_silent_broker_is_a_timeout_for_that_request(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = str(tmp_path / "b.sock")
    silent = {"now": True}
    async with fake_broker(path, lambda frame: None if silent["now"] else numbered(frame)) as broker:
        tokens = BrokerTokens(path, "acme", timeout=60.0)
        with pytest.raises(BrokerTimeout, match="did not answer within 60 s"):
            await tokens.token(30.0)
        await trio.sleep(1)
        assert broker.open == 0  # the connection was given up: a late reply must not answer the next ask
        silent["now"] = False
        assert await tokens.token(30.0) == "token-1"  # on a new connection (request ids start again)
        assert broker.connections == 2


async def test_no_more_connections_than_allowed(tmp_path: Path) -> None:
    path = str(tmp_path / "b.sock")
    async with fake_broker(path, numbered) as broker:
        tokens = BrokerTokens(path, "acme", connections=2)
        got: list[str] = []

        async def ask() -> None:
            got.append(await tokens.token(30.0))

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(ask)
        assert len(got) == 10 and broker.most_open == 2 and broker.connections == 2
        tokens.close()
