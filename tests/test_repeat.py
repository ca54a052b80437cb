"""A token request repeated on a kept connection (``dc_broker.serve.repeat``) against the full path.

The promise: a ``Repeat`` answers only the request it was made from (any id), only while the token,
the profile and the request's ``min_ttl`` it was decided from still hold, with exactly the bytes
the full path would send at that moment; every request still counts (``ok``, the audit trail,
``last_use``); and it keeps no token alive. Each guard of ``Repeat.answer`` has a test here that
fails without it.

Driven through ``_Connection.feed`` with an injected clock (the server's own framing and dispatch),
beside a second connection that never repeats (its every request is taken as its first: the full
path every time).
"""

from __future__ import annotations

import dataclasses
import gc
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dc_broker.access.caller import Caller
from dc_broker.config import Profile
from dc_broker.idp.transport import IdpTransport
from dc_broker.secret import Secret
from dc_broker.serve import ops
from dc_broker.serve.ops import BrokerState
from dc_broker.serve.repeat import Repeat, request_id
from dc_broker.serve.server import Limits, Server, _Connection
from dc_broker.sessions.registry import Sessions
from dc_broker.sessions.session import Session
from dc_broker.store import MemoryStore
from dc_broker.tokens import Credentials, TokenSet
from dc_token.errors import Locked
from dc_token.protocol import MAX_FRAME, Request, encode

START = 1000.0
WALL = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


class Broker:
    """A server's state and two connections of one caller: ``kept`` (it talked before: it repeats) and
    ``full`` (each request taken as its first: the full path every time, ``full_feed``)."""

    def __init__(self, *, system: bool = False, allow: tuple[str, ...] = ()) -> None:
        self.clock = Clock()
        profile = Profile(
            name="p", client_id="c", grant="client_credentials", token_url="http://127.0.0.1:9/token", allow=allow
        )
        self.sessions = Sessions(
            {"p": profile}, MemoryStore({"p": Credentials(client_secret=Secret("s"))}), IdpTransport(), clock=self.clock
        )
        self.state = BrokerState(
            sessions=self.sessions, socket_path="/nonexistent/b.sock", clock=self.clock, system=system
        )
        self.server = Server(self.state, limits=Limits())
        self.socks: list[socket.socket] = []
        self.kept = self.connection(kept=True)
        self.full = self.connection(kept=False)

    @property
    def session(self) -> Session:
        return self.sessions.lookup("p")

    def connection(self, *, kept: bool) -> _Connection:
        a, b = socket.socketpair(socket.AF_UNIX)
        self.socks += [a, b]
        c = _Connection(self.server, a, Caller(os.getuid(), os.getgid(), os.getpid()), self.clock.now)
        self.server._activity[c] = None
        c.fed = kept
        return c

    def full_feed(self, data: bytes, now: float) -> bytes:
        self.full.fed = False
        self.full.repeat = None
        return self.full.feed(data, now)

    def give(self, token: str = "tok-" + "x" * 600, lifetime: float = 1800.0, **fields: Any) -> TokenSet:
        tok = TokenSet(Secret(token), self.clock.now, self.clock.now + lifetime, **fields)
        self.session.token = tok
        return tok

    def close(self) -> None:
        for s in self.socks:
            s.close()


@contextmanager
def broker(**kwargs: Any) -> Iterator[Broker]:
    b = Broker(**kwargs)
    try:
        with mock.patch.object(ops.time, "time", lambda: WALL):  # the full path's wall clock, fixed
            yield b
    finally:
        b.close()


def frame(rid: int = 1, profile: str = "p", min_ttl: float = 60, **more: Any) -> bytes:
    return encode(Request(rid, "token", {"profile": profile, "min_ttl": min_ttl, **more}))


def decode(out: bytes) -> dict[str, Any]:
    assert int.from_bytes(out[:4], "big") == len(out) - 4
    reply = msgpack.unpackb(out[4:])
    assert isinstance(reply, dict)
    return reply


ids = st.one_of(
    st.sampled_from([0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1]),
    st.integers(0, 2**63 - 1),
)


@settings(max_examples=150, deadline=None)
@given(
    rids=st.lists(ids, min_size=1, max_size=6),
    min_ttl=st.one_of(st.integers(0, 900), st.floats(0, 900)),
    token=st.text(min_size=1, max_size=70000).filter(lambda t: len(t.encode()) < 60000),
    scope=st.one_of(st.none(), st.text(max_size=300)),
    token_type=st.sampled_from(["Bearer", "bearer", "DPoP", "N_A"]),
    lifetime=st.floats(901, 86400),
    steps=st.lists(st.floats(0, 1), min_size=1, max_size=6),
)
def test_a_repeat_sends_the_full_paths_bytes(
    rids: list[int], min_ttl: float, token: str, scope: str | None, token_type: str, lifetime: float, steps: list[float]
) -> None:
    with broker() as b:
        tok = b.give(token, lifetime, scope=scope, token_type=token_type)
        first = b.kept.feed(frame(1, min_ttl=min_ttl), b.clock.now)
        assert decode(first)["result"]["token"] == token
        repeat = b.kept.repeat
        assert repeat is not None
        for rid, step in zip(rids * len(steps), sorted(steps) * len(rids), strict=True):
            b.clock.now = START + step * (tok.expires_at - START - min_ttl) * 0.999
            full = b.full_feed(frame(rid, min_ttl=min_ttl), b.clock.now)
            assert b.kept.repeat is repeat
            fast = repeat.answer(frame(rid, min_ttl=min_ttl)[4:], b.clock.now)
            assert fast == full
            assert b.kept.feed(frame(rid, min_ttl=min_ttl), b.clock.now) == full


@pytest.mark.parametrize(
    ("token", "scope"),
    [
        ("t" * 0x101, None),  # its length is written 0x01 0x01, the first filler's byte, just before it
        ("ab", "\x01\x01"),  # another field holds the first filler's stand-in
    ],
)
def test_a_token_whose_stand_in_is_found_twice_still_repeats_exactly(token: str, scope: str | None) -> None:
    """The token's stand-in while the reply is laid out must be found exactly once; else the next
    filler is used."""
    with broker() as b:
        b.give(token, scope=scope)
        b.kept.feed(frame(), b.clock.now)
        repeat = b.kept.repeat
        assert repeat is not None
        b.clock.now += 5
        assert repeat.answer(frame(7)[4:], b.clock.now) == b.full_feed(frame(7), b.clock.now)


def test_a_reply_near_the_frame_limit_does_not_repeat() -> None:
    """A larger id than the first one's could push the reply past the frame limit, where the full
    path answers with an error instead."""
    with broker() as b:
        b.give("t")
        size = len(b.full_feed(frame(), b.clock.now)) - 4  # the reply's body with a one-byte id
        b.give("t" * (MAX_FRAME - size - 2))  # (the token's header grows by 2 bytes too)
        reply = b.kept.feed(frame(), b.clock.now)
        assert MAX_FRAME - 8 < len(reply) - 4 <= MAX_FRAME
        assert b.kept.repeat is None
        assert decode(b.full_feed(frame(2**40), b.clock.now))["error"]["code"] == "internal"


def test_every_request_counts_on_the_repeat_as_on_the_full_path() -> None:
    with broker() as b:
        b.give()
        for i in range(5):
            b.clock.now += 1
            b.kept.feed(frame(i), b.clock.now)
        assert b.kept.repeat is not None
        assert b.server.ok_counts["token"] == 5
        assert b.state.last_use == b.clock.now
        assert sum(b.state.audit._counts.values()) == 5


def test_a_connections_first_request_makes_no_repeat() -> None:
    """One request per connection (dc-token): making a Repeat would be work never used."""
    with broker() as b:
        b.give()
        b.full_feed(frame(), b.clock.now)
        assert b.full.repeat is None
        b.full.feed(frame(2), b.clock.now)  # it talks again: it is kept
        assert b.full.repeat is not None


def test_ids_written_unlike_msgpack_would_go_the_full_path() -> None:
    with broker() as b:
        b.give()
        b.kept.feed(frame(), b.clock.now)
        assert b.kept.repeat is not None
        body = frame(5)[4:]
        odd = body.replace(b"\xa2id\x05", b"\xa2id\xcc\x05")  # 5 as a uint8: valid msgpack, not msgpack's own
        assert request_id(odd) is None
        odd_frame = len(odd).to_bytes(4, "big") + odd
        assert b.kept.repeat.answer(odd, b.clock.now) is None
        assert decode(b.kept.feed(odd_frame, b.clock.now))["id"] == 5


def test_other_bytes_go_the_full_path() -> None:
    with broker() as b:
        b.give()
        b.kept.feed(frame(min_ttl=60), b.clock.now)
        repeat = b.kept.repeat
        assert repeat is not None
        for other in (frame(min_ttl=61), frame(profile="q"), frame(scope="openid")):
            assert repeat.answer(other[4:], b.clock.now) is None
        assert decode(b.kept.feed(frame(profile="q"), b.clock.now))["ok"] is False
        two = frame(1) + frame(2)  # two requests in one read: each its own, by the full path
        assert [r["id"] for r in replies(b.kept.feed(two, b.clock.now))] == [1, 2]
        half = frame(3)
        assert b.kept.feed(half[:10], b.clock.now) == b""
        assert decode(b.kept.feed(half[10:], b.clock.now))["id"] == 3
        assert b.kept.repeat is None  # none of these made one
        b.kept.feed(frame(4), b.clock.now)
        assert b.kept.repeat is not None
        body = frame(4)[4:]
        more = bytes([body[0] + 1]) + body[1:]  # a map said to hold one entry more than it does
        assert b.kept.repeat.answer(more, b.clock.now) is None
        reply = decode(b.kept.feed(len(more).to_bytes(4, "big") + more, b.clock.now))
        assert reply["ok"] is False and reply["error"]["code"] == "bad_request" and b.kept.broken


def test_a_request_after_half_a_frame_is_not_taken_for_a_whole_one() -> None:
    """After three bytes of a frame, a whole request's bytes are the rest of that frame, whatever
    they look like: the framing is broken, and the connection is told so."""
    with broker() as b:
        b.give()
        b.kept.feed(frame(), b.clock.now)
        assert b.kept.repeat is not None
        assert b.kept.feed(b"\x00\x00\x00", b.clock.now) == b""
        reply = decode(b.kept.feed(frame(2), b.clock.now))
        assert reply["ok"] is False and reply["id"] is None and b.kept.broken


def replies(out: bytes) -> list[dict[str, Any]]:
    found = []
    while out:
        n = 4 + int.from_bytes(out[:4], "big")
        found.append(decode(out[:n]))
        out = out[n:]
    return found


def test_a_scoped_request_never_repeats() -> None:
    """The scoped session is chosen (and paid for) per request: a scoped token, even one whose text
    is the profile's own, is not repeated."""
    with broker() as b:
        base = b.give("same-token", scope="openid profile")
        b.kept.feed(frame(scope="openid"), b.clock.now)  # a narrowed token: asked of the IdP first
        for _, _, waiting in b.kept.todo:
            waiting.close()  # type: ignore[union-attr]
        b.kept.todo.clear()
        child = b.sessions.lookup_scoped(b.session, "openid")
        assert child is not b.session
        child.token = dataclasses.replace(base, scope="openid")
        reply = decode(b.kept.feed(frame(2, scope="openid"), b.clock.now))
        assert reply["result"]["scope"] == "openid"
        assert b.kept.repeat is None


def test_a_new_token_is_served_at_once() -> None:
    """The session's token replaced (a refresh): the next request carries the new one."""
    with broker() as b:
        b.give("old-token")
        b.kept.feed(frame(), b.clock.now)
        b.give("new-token")
        assert decode(b.kept.feed(frame(2), b.clock.now))["result"]["token"] == "new-token"
        assert decode(b.kept.feed(frame(3), b.clock.now))["result"]["token"] == "new-token"


def test_an_invalidated_token_is_not_served_again() -> None:
    with broker() as b:
        b.give("rejected-token")
        b.kept.feed(frame(), b.clock.now)
        b.clock.now += 120  # past the invalidation rate limit
        assert b.session.invalidate("rejected-token")
        assert b.kept.feed(frame(2), b.clock.now) == b""  # waits for a refresh: the connection's task
        assert [op for _, op, _ in b.kept.todo] == ["token"]
        b.kept.todo.pop()[2].close()  # type: ignore[union-attr]


def test_a_locked_broker_serves_nothing_and_the_repeat_holds_no_token() -> None:
    with broker() as b:
        b.give("secret-token-value")
        b.kept.feed(frame(), b.clock.now)
        repeat = b.kept.repeat
        assert repeat is not None
        assert not any(b"secret-token-value" in piece for piece in (*repeat._pieces, repeat.head, repeat.tail))
        b.sessions.locked()
        gc.collect()
        assert repeat.tok() is None  # nothing of the token stays alive in the connection
        assert b.kept.feed(frame(2), b.clock.now) == b""  # the full path: it waits, and is told
        assert b.kept.repeat is None  # a repeat found out of date is dropped, not kept on the connection
        _, _, waiting = b.kept.todo.pop()
        with pytest.raises(Locked):
            waiting.send(None)  # type: ignore[union-attr]


def test_a_removed_profile_is_not_served() -> None:
    with broker() as b:
        b.give()
        b.kept.feed(frame(), b.clock.now)
        b.sessions.remove("p")
        reply = decode(b.kept.feed(frame(2), b.clock.now))
        assert reply["ok"] is False and reply["error"]["code"] == "unknown_profile"


def test_a_caller_taken_off_the_allow_list_is_refused_on_its_next_request() -> None:
    """A reload that changes only who may use the profile keeps the login and the session, and
    replaces the profile: the repeat must not outlive the rule it was decided by."""
    me = f"uid:{os.getuid()}"
    with broker(system=True, allow=(me,)) as b:
        b.give()
        b.kept.feed(frame(), b.clock.now)
        assert b.kept.repeat is not None
        session = b.session
        b.sessions.reload({"p": dataclasses.replace(session.profile, allow=("uid:4242",))})
        assert b.session is session and session.token is not None  # same login, same session
        reply = decode(b.kept.feed(frame(2), b.clock.now))
        assert reply["ok"] is False and reply["error"]["code"] == "forbidden"


def test_a_token_too_short_for_min_ttl_goes_the_full_path() -> None:
    with broker() as b:
        tok = b.give(lifetime=1800)
        b.kept.feed(frame(min_ttl=600), b.clock.now)
        repeat = b.kept.repeat
        assert repeat is not None
        b.clock.now = tok.expires_at - 600  # exactly min_ttl left: no longer more than it
        assert repeat.answer(frame(2, min_ttl=600)[4:], b.clock.now) is None
        b.clock.now = tok.expires_at - 600.001
        assert repeat.answer(frame(2, min_ttl=600)[4:], b.clock.now) is not None


def test_a_reply_with_a_shortfall_never_repeats() -> None:
    """min_ttl beyond half the lifetime: the reply says by how much it falls short, which changes
    with every request."""
    with broker() as b:
        b.give(lifetime=1000)
        reply = decode(b.kept.feed(frame(min_ttl=1200), b.clock.now))
        assert "min_ttl_shortfall" in reply["result"]
        assert b.kept.repeat is None


def test_repeats_are_made_per_connection() -> None:
    with broker(system=True, allow=(f"uid:{os.getuid()}",)) as b:
        b.give()
        b.kept.feed(frame(), b.clock.now)
        other = b.connection(kept=True)
        assert other.repeat is None
        assert isinstance(b.kept.repeat, Repeat) and b.kept.repeat.caller is b.kept.caller
