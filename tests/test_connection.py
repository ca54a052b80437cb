"""The sans-IO client connection, stepped by hand: bytes in, events out, no socket."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dc_token.connection import NEED_DATA, ClientConnection, Closed, End, Failed, Result, may_retry
from dc_token.errors import LoginRequired, RemoteProtocolError, UnknownProfile
from dc_token.protocol import ErrorCode, ErrorReply, FrameDecoder, Reply, encode, request_from_wire


def sent(frame: bytes) -> tuple[int, str, dict[str, object]]:
    decoder = FrameDecoder()
    decoder.receive_data(frame)
    obj = decoder.next_frame()
    assert isinstance(obj, dict)
    req = request_from_wire(obj)
    return req.id, req.op, dict(req.args)


def events(conn: ClientConnection) -> list[object]:
    out = []
    while (ev := conn.next_event()) is not NEED_DATA:
        out.append(ev)
        if isinstance(ev, Closed):
            break
    return out


def test_ids_are_allocated_and_none_args_dropped() -> None:
    conn = ClientConnection()
    a, fa = conn.send_request("token", {"profile": "acme", "scope": None, "min_ttl": 5.0})
    b, _ = conn.send_request("status")
    assert (a, b) == (1, 2) and conn.pending == (1, 2)
    assert sent(fa) == (1, "token", {"profile": "acme", "min_ttl": 5.0})


def test_replies_match_their_requests_in_any_order() -> None:
    conn = ClientConnection()
    a, _ = conn.send_request("token", {"profile": "a"})
    b, _ = conn.send_request("token", {"profile": "b"})
    conn.receive_data(encode(Reply(b, {"token": "tb"})) + encode(Reply(a, {"token": "ta"})))
    got = events(conn)
    assert [(e.id, e.result["token"]) for e in got if isinstance(e, Result)] == [(b, "tb"), (a, "ta")]
    assert conn.pending == () and conn.served


def test_error_replies_become_their_exception_class() -> None:
    conn = ClientConnection()
    rid, _ = conn.send_request("token", {"profile": "x"})
    conn.receive_data(encode(ErrorReply(rid, ErrorCode.UNKNOWN_PROFILE, "no profile 'x'")))
    (ev,) = events(conn)
    assert isinstance(ev, Failed) and ev.id == rid
    assert isinstance(ev.error, UnknownProfile) and str(ev.error) == "no profile 'x'"


def test_late_replies_are_dropped_and_unknown_ids_are_the_peers_fault() -> None:
    conn = ClientConnection()
    rid, _ = conn.send_request("token", {"profile": "a"})
    conn.forget(rid)  # e.g. the caller timed out
    conn.receive_data(encode(Reply(rid, {"token": "late"})))
    assert events(conn) == []
    conn.receive_data(encode(Reply(99, {})))
    with pytest.raises(RemoteProtocolError, match="request 99, which was never sent"):
        conn.next_event()


def test_streams_yield_items_then_end() -> None:
    conn = ClientConnection()
    rid, _ = conn.send_request("watch", {"profile": "a"})
    conn.receive_data(encode(Reply(rid, {"token": "t1"}, more=True)) + encode(Reply(rid, {"token": "t2"}, more=True)))
    assert [e.result["token"] for e in events(conn) if isinstance(e, Result)] == ["t1", "t2"]
    assert conn.pending == (rid,)
    conn.receive_data(encode(Reply(rid, {"end": True})))
    (end,) = events(conn)
    assert isinstance(end, End) and end.id == rid and conn.pending == ()


def test_an_idless_error_fails_every_pending_request_and_closes() -> None:
    conn = ClientConnection()
    a, _ = conn.send_request("token", {"profile": "a"})
    b, _ = conn.send_request("watch", {"profile": "b"})
    conn.receive_data(encode(ErrorReply(None, ErrorCode.BAD_REQUEST, "frame is not valid msgpack")))
    *failed, closed = events(conn)
    assert [(type(e).__name__, e.id) for e in failed] == [("Failed", a), ("Failed", b)]
    assert isinstance(closed, Closed) and closed.pending == () and conn.closed
    with pytest.raises(RemoteProtocolError, match="closed"):
        conn.send_request("hello")


def test_eof_at_a_boundary_is_closed_mid_frame_is_an_error() -> None:
    conn = ClientConnection()
    rid, _ = conn.send_request("token", {"profile": "a"})
    conn.receive_data(b"")
    (ev,) = events(conn)
    assert isinstance(ev, Closed) and ev.pending == (rid,)
    torn = ClientConnection()
    torn.send_request("hello")
    torn.receive_data(encode(Reply(1, {"server": "dc-broker"}))[:5])
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        torn.receive_data(b"")


def test_retry_only_on_a_connection_that_had_served() -> None:
    fresh = ClientConnection()
    fresh.send_request("hello")
    fresh.receive_data(b"")
    assert not may_retry(fresh)  # a new connection that dies is the broker's answer
    used = ClientConnection()
    rid, _ = used.send_request("hello")
    used.receive_data(encode(Reply(rid, {})))
    events(used)
    used.send_request("token", {"profile": "a"})
    used.receive_data(b"")
    assert may_retry(used)  # the broker restarted since: one more try on a new connection


@given(st.lists(st.sampled_from(["ok", "more", "error"]), min_size=1, max_size=8), st.data())
def test_any_byte_split_gives_the_same_events(kinds: list[str], data: st.DataObject) -> None:
    conn = ClientConnection()
    wire = b""
    ids = [conn.send_request("watch" if k == "more" else "token", {"profile": "p"})[0] for k in kinds]
    for rid, kind in zip(ids, kinds, strict=True):
        if kind == "error":
            wire += encode(ErrorReply(rid, ErrorCode.LOGIN_REQUIRED, "log in"))
        else:
            wire += encode(Reply(rid, {"n": rid}, more=kind == "more"))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    got = []
    start = 0
    for cut in [*cuts, len(wire)]:
        conn.receive_data(wire[start:cut]) if cut > start else None
        start = max(start, cut)
        got += events(conn)
    assert [e.id for e in got] == ids
    for e, kind in zip(got, kinds, strict=True):
        assert isinstance(e, Failed if kind == "error" else Result)
        if isinstance(e, Failed):
            assert isinstance(e.error, LoginRequired)
        else:
            assert e.more == (kind == "more")


def test_a_refused_connect_names_the_group_of_a_shared_broker(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import grp
    import os
    import socket

    from dc_token.paths import unreachable

    shared = str(tmp_path / "shared.sock")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(shared)
        os.chmod(shared, 0o660)
        group = grp.getgrgid(os.stat(shared).st_gid).gr_name
        msg = str(unreachable(shared, PermissionError(13, "Permission denied")))
    assert msg.startswith(f"no permission to use the broker socket {shared}: the shared broker there admits")
    assert f"members of group {group!r}" in msg and f"`usermod -aG {group} $USER`" in msg
    private = str(tmp_path / "private.sock")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(private)
        os.chmod(private, 0o600)
        msg = str(unreachable(private, PermissionError(13, "Permission denied")))
    assert msg.endswith(f"(it is private to uid {os.getuid()}; run your own broker: `dc-broker run`)")
    assert str(unreachable(private, FileNotFoundError())) == f"no dc-broker is running on {private}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"profile": ""}, "'profile' must be a non-empty string"),
        ({"profile": "x" * 20000}, "is not a profile name"),
        ({"profile": "-x"}, "is not a profile name"),
        ({"profile": "a b"}, "is not a profile name"),
        ({"profile": "acme", "min_ttl": -1}, "'min_ttl' must be a number of seconds between 0 and 86400"),
        ({"profile": "acme", "min_ttl": 100000}, "'min_ttl' must be a number of seconds between 0 and 86400"),
        ({"profile": "acme", "min_ttl": float("nan")}, "'min_ttl' must be a number"),
        ({"profile": "acme", "min_ttl": True}, "'min_ttl' must be a number"),
        ({"profile": "acme", "scope": "openid  email"}, "'scope' must be space-separated OAuth scope tokens"),
        ({"profile": "acme", "scope": 'a"b'}, "'scope' must be space-separated OAuth scope tokens"),
        ({"profile": "acme", "scope": 7}, "'scope' must be space-separated OAuth scope tokens"),
    ],
)
def test_token_args_are_checked_the_same_on_both_sides(args: dict[str, object], message: str) -> None:
    from dc_token.cache import token_args
    from dc_token.errors import BadRequest
    from dc_token.protocol import TokenArgs

    with pytest.raises(BadRequest, match=message.replace("(", r"\(")):
        TokenArgs.from_wire(args)  # the broker's side
    with pytest.raises(BadRequest, match=message.replace("(", r"\(")):
        token_args(args["profile"], args.get("min_ttl", 0.0), args.get("scope"))  # type: ignore[arg-type]


def test_token_args_round_trip() -> None:
    from dc_token.protocol import TokenArgs

    args = TokenArgs("acme.prod_1", 60, "openid email")
    assert args.to_wire() == {"profile": "acme.prod_1", "min_ttl": 60.0, "scope": "openid email"}
    assert TokenArgs.from_wire(args.to_wire()) == args
    assert TokenArgs.from_wire({"profile": "acme", "scope": ""}).to_wire() == {"profile": "acme", "min_ttl": 0.0}


# a bad argument of every op that has arguments: (op, args, the message both sides give)
BAD_OP_ARGS = [
    ("invalidate", {"profile": "demo"}, "'token' must be the access token the API rejected"),
    ("invalidate", {"profile": "demo", "token": ""}, "'token' must be the access token the API rejected"),
    ("status", {"after": 3}, "'after' must be the profile name a previous status reply gave as 'next'"),
    ("status", {"profile": "a b"}, "is not a profile name"),
    ("login", {}, "'profile' must be a non-empty string"),
    ("login", {"profile": "demo", "password": ""}, "'password' must be a non-empty string"),
    ("login", {"profile": "demo", "password": 5}, "'password' must be a non-empty string"),
    ("unlock", {"passphrase": ""}, "'passphrase' must be a non-empty string"),
    ("set_secrets", {"profile": "demo", "client_secret": ["x"]}, "'client_secret' must be a non-empty string"),
    ("set_secrets", {"profile": "demo", "verify": "yes"}, "'verify' must be true or false"),
    ("logout", {"profile": 7}, "'profile' must be a non-empty string"),
    ("logout", {"profile": "demo", "forget": "yes"}, "'forget' must be true or false"),
    ("watch", {"profile": "demo", "min_ttl": -1}, "'min_ttl' must be a number of seconds between 0 and 86400"),
]


@pytest.mark.parametrize(("op", "args", "message"), BAD_OP_ARGS)
def test_op_args_are_checked_from_the_one_table(op: str, args: dict[str, object], message: str) -> None:
    from dc_token.errors import BadRequest
    from dc_token.protocol import OpArgs

    with pytest.raises(BadRequest, match=message.replace("(", r"\(")):
        OpArgs(op, **args)  # the client's side
    with pytest.raises(BadRequest, match=message.replace("(", r"\(")):
        OpArgs.from_wire(op, args)  # the broker's side


def test_the_table_is_the_contract() -> None:
    from dc_token.protocol import ARGS, OPS, OpArgs, TokenArgs

    assert frozenset(ARGS) == OPS
    for op, fields in ARGS.items():  # every required argument is named when it is missing
        for key in [k for k, (required, _) in fields.items() if required]:
            with pytest.raises(Exception, match=f"'{key}'"):
                OpArgs(op, **{k: "demo" for k in fields if k != key and fields[k][0]})
    # TokenArgs and the table agree on token/watch
    assert OpArgs("token", profile="a", min_ttl=5, scope="openid").to_wire() == TokenArgs("a", 5, "openid").to_wire()


def test_op_args_keep_only_what_the_table_names_and_never_show_values() -> None:
    from dc_token.protocol import OpArgs

    args = OpArgs("login", profile="demo", password="hunter2-secret", colour="blue", extra=None)
    assert args.to_wire() == {"profile": "demo", "password": "hunter2-secret"}  # a newer peer's extras dropped
    assert "hunter2" not in repr(args) and "hunter2" not in str(args)
    assert OpArgs("status").to_wire() == {} and OpArgs("status", profile=None).get("profile") is None
