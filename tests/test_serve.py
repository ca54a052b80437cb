"""The server's two ways through (issue 23): the first request answered without a task, a connection
that keeps talking given one, and every deadline kept by the one reaper: idle (with or without a
task) and a reply the client does not read.

In-process (a real Unix socket, trio sockets for the clients) where the test counts the tasks the
server makes; a real `dc-broker run` where it times what the reaper closes."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgpack
import pytest
import trio
import trio.testing

from dc_broker.access.caller import Caller
from dc_broker.config import Profile
from dc_broker.idp.transport import IdpTransport
from dc_broker.secret import Secret
from dc_broker.serve.ops import HANDLERS, BrokerState
from dc_broker.serve.server import BYTES_PER_WAKE, Limits, Server, _Connection
from dc_broker.sessions.registry import Sessions
from dc_broker.store import MemoryStore
from dc_broker.tokens import Credentials, TokenSet
from dc_token.protocol import Request, encode
from tests.conftest import CREDENTIALS, LockableStore, listening, registry, running
from tests.e2e import connections_on, start_run, stop, wait_for

TOKEN = encode(Request(1, "token", {"profile": "p", "min_ttl": 60}))


class Spawns(trio.abc.Instrument):
    """The names of the tasks spawned while it is installed (``with Spawns() as spawns:``)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def __enter__(self) -> Spawns:
        trio.lowlevel.add_instrument(self)
        return self

    def __exit__(self, *exc: object) -> None:
        trio.lowlevel.remove_instrument(self)

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.names.append(task.name)

    def connection_tasks(self) -> int:
        return sum(name.endswith("_Connection.run") for name in self.names)


@asynccontextmanager
async def serving(tmp_path: Path, **limits: float) -> AsyncIterator[tuple[str, Server]]:
    """A Server on a real socket, with one profile ``p`` whose stored token is good for 30 minutes."""
    profile = Profile(name="p", client_id="c", grant="client_credentials", token_url="http://127.0.0.1:9/token")
    store = MemoryStore({"p": Credentials(client_secret=Secret("s"))})
    now = time.time()
    tokens = TokenSet(Secret("tok-" + "x" * 600), now, now + 1800, issued_for=profile.login_fingerprint())
    await store.save_tokens("p", tokens)
    sessions = Sessions({"p": profile}, store, IdpTransport())
    path = str(tmp_path / "run" / "b.sock")
    server = Server(BrokerState(sessions=sessions, socket_path=path), limits=Limits(**limits))  # type: ignore[arg-type]
    async with listening(server, path, sessions.run):
        yield path, server


async def ask(client: trio.socket.SocketType, frame: bytes = TOKEN) -> dict[str, object]:
    await client.send(frame)
    buf = b""
    while len(buf) < 4 or len(buf) < 4 + int.from_bytes(buf[:4], "big"):
        data = await client.recv(65536)
        assert data, "the broker closed the connection"
        buf += data
    reply = msgpack.unpackb(buf[4:])
    assert isinstance(reply, dict)
    return reply


async def settled(server: Server, connections: int) -> None:
    while server.connections != connections:
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(0.01)


async def test_one_request_per_connection_makes_no_task(tmp_path: Path) -> None:
    async with serving(tmp_path) as (path, server):
        with Spawns() as spawns:
            for i in range(20):
                client = trio.socket.socket(socket.AF_UNIX)
                await client.connect(path)
                if i % 2:  # the request there at once, or only after the accept loop has looked
                    await trio.testing.wait_all_tasks_blocked()
                reply = await ask(client)
                assert reply["ok"] and str(reply["result"]["token"]).startswith("tok-")  # type: ignore[index]
                client.close()
            await settled(server, 0)
        assert spawns.connection_tasks() == 0, spawns.names
        assert server.connections == 0


async def test_a_connection_that_keeps_talking_is_served_without_a_task(tmp_path: Path) -> None:
    """A client that keeps its connection (TokenClient, the proxy) is answered inline request after
    request, the repeated ones from its ``Repeat``: no task, no trip through trio's scheduler each."""
    async with serving(tmp_path) as (path, server):
        with Spawns() as spawns:
            client = trio.socket.socket(socket.AF_UNIX)
            await client.connect(path)
            replies = [await ask(client, encode(Request(i, "token", {"profile": "p"}))) for i in range(1, 30)]
            assert [r["id"] for r in replies] == list(range(1, 30)) and all(r["ok"] for r in replies)
            assert len({r["result"]["token"] for r in replies}) == 1  # type: ignore[index]
            client.close()
            await settled(server, 0)
        assert spawns.connection_tasks() == 0, spawns.names
        assert server.counts.ok["token"] == 29


async def test_a_kept_connection_gets_its_task_when_a_request_must_wait(tmp_path: Path) -> None:
    """A request that waits (here a ``watch`` stream) gives the connection its task, for good; its
    other requests go on being answered, by that task, beside the stream."""
    async with serving(tmp_path) as (path, server):
        with Spawns() as spawns:
            client = trio.socket.socket(socket.AF_UNIX)
            await client.connect(path)
            for i in range(1, 4):
                assert (await ask(client, encode(Request(i, "token", {"profile": "p"}))))["ok"]
            assert spawns.connection_tasks() == 0
            streamed = await ask(client, encode(Request(4, "watch", {"profile": "p"})))
            assert streamed["id"] == 4 and streamed["more"] is True
            assert spawns.connection_tasks() == 1
            for i in range(5, 8):
                assert (await ask(client, encode(Request(i, "token", {"profile": "p"}))))["id"] == i
            client.close()
            await settled(server, 0)
        assert spawns.connection_tasks() == 1, spawns.names


async def test_a_frame_that_waits_gets_a_task_and_its_deadline(tmp_path: Path) -> None:
    async with serving(tmp_path, partial_frame_timeout=0.3) as (path, server):
        client = trio.socket.socket(socket.AF_UNIX)
        await client.connect(path)
        await client.send(TOKEN[:5])
        t0 = trio.current_time()
        assert await client.recv(100) == b""  # closed by the reaper, not by a cancel scope of its own
        assert 0.25 < trio.current_time() - t0 < 2.0
        await settled(server, 0)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("serve")
    text = "[daemon]\nidle_timeout = 1.0\n"
    text += '[profiles.p]\ntoken_url = "http://127.0.0.1:9/token"\nclient_id = "c"\ngrant = "client_credentials"\n'
    (tmp / "config.toml").write_text(text)
    sock = str(tmp / "run" / "b.sock")
    proc = start_run(tmp / "config.toml", sock, '[p]\nclient_secret = "s"\n', stderr=subprocess.DEVNULL)
    try:
        yield sock
    finally:
        stop(proc)


def test_a_connection_with_a_task_that_goes_idle_is_closed(broker: str) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(broker)
    first = encode(Request(0, "hello"))
    s.sendall(first[:5])  # a frame sent in two parts gives the connection a task
    time.sleep(0.2)
    s.sendall(first[5:])
    assert s.recv(65536)
    for i in range(1, 3):
        s.sendall(encode(Request(i, "hello")))
        assert s.recv(65536)
    t0 = time.monotonic()
    assert s.recv(100) == b""  # closed by the broker after idle_timeout (1 s)
    assert 0.9 < time.monotonic() - t0 < 5
    s.close()


def test_a_client_that_does_not_read_its_replies_is_closed(broker: str) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.connect(broker)
    s.settimeout(10)
    t0 = time.monotonic()
    # ~3 MB of replies that are never read: the broker's writes block, then it stops reading, and
    # this send blocks in turn until the broker gives up on the connection
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        s.sendall(b"".join(encode(Request(i, "hello")) for i in range(20_000)))
    assert 0.9 < time.monotonic() - t0 < 10  # idle_timeout (1 s) after its replies stopped moving
    wait_for(lambda: connections_on(broker, accepted_only=True) == 0, 10, "the broker closing the connection")
    s.close()


async def test_flooding_connections_do_not_hold_the_watcher_for_the_others_turns() -> None:
    """One wake of the parked connections' watcher reads at most BYTES_PER_WAKE: three connections
    that each sent a frame of 60 KB use it up, and the two that sent a small request are served at
    the next wake (after trio has run the other tasks), both of them, not in the same one."""
    profile = Profile(name="p", client_id="c", grant="client_credentials", token_url="http://127.0.0.1:9/token")
    sessions = Sessions({"p": profile}, MemoryStore({"p": Credentials(client_secret=Secret("s"))}), IdpTransport())
    server = Server(BrokerState(sessions=sessions, socket_path="/nonexistent/b.sock", clock=lambda: 1.0))
    epoll = server._epoll = select.epoll()
    peers = []
    try:
        for size in (60_000, 60_000, 60_000, 0, 0):
            ours, theirs = socket.socketpair(socket.AF_UNIX)
            peers.append(theirs)
            c = _Connection(server, ours, Caller(os.getuid(), os.getgid(), os.getpid()), 1.0)
            server._activity[c] = None
            server.connections += 1
            server._park(c)
            theirs.sendall(encode(Request(1, "hello", {"pad": "x" * size})))
        assert 2 * 60_000 < BYTES_PER_WAKE < 3 * 60_000
        assert server._serve_parked(epoll) == 3
        for small in peers[3:]:
            small.setblocking(False)
            with pytest.raises(BlockingIOError):
                small.recv(65536)  # not answered in this wake
        assert server._serve_parked(epoll) == 2
        for peer in peers:
            peer.setblocking(True)
            assert peer.recv(65536)
    finally:
        for peer in peers:
            peer.close()
        for c in list(server._parked.values()):
            c.close()
        epoll.close()


async def test_a_lock_cut_short_while_a_refresh_is_at_the_idp_still_locks_the_vault(make_idp, autojump_clock) -> None:
    """`lock` takes the tokens out of memory at once, then waits for a refresh at the IdP to store its
    answer before it locks the store. Its connection closes during that wait (the client gave up:
    its handler is cancelled): the store locks all the same once the refresh is in, instead of
    every profile showing locked while the vault's key stays in memory."""
    idp = make_idp(access_lifespan=60, rotate_refresh_tokens=True)
    store = LockableStore({"demo": CREDENTIALS["demo"]})
    sessions = registry(idp, "demo", store=store)
    state = BrokerState(sessions=sessions, socket_path="unused")
    owner = Caller(os.getuid(), os.getgid(), os.getpid())
    async with running(sessions.run):
        demo = sessions.lookup("demo")
        await demo.get()
        idp.faults.latency = 3.0
        tok = demo.token
        assert tok is not None and demo.invalidate(tok.access_token.reveal())
        while not demo.busy:
            await trio.sleep(0.01)
        started = trio.current_time()
        with trio.move_on_after(1.0):
            pending = HANDLERS["lock"](state, owner, {}, started)
            assert not isinstance(pending, dict | AsyncIterator)
            await pending
        assert demo.token is None  # out of memory at once
        await trio.sleep(10)
        assert store.locked, "the lock was cut short: the store never locked"
        assert trio.current_time() - started < 15
        store.unlock()
        saved = store.saved_tokens("demo")
        assert saved is not None and saved.refresh_token != tok.refresh_token  # the rotation was stored first
    assert idp.stats.refresh_reuse == 0
