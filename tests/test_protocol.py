"""The wire contract: framing round trips at any split, garbage and oversize are refused, never hang."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dc_token.errors import LocalProtocolError, RemoteProtocolError, error_for_code
from dc_token.protocol import (
    MAX_FRAME,
    NEED_DATA,
    ErrorCode,
    ErrorReply,
    FrameDecoder,
    Reply,
    Request,
    RequestShapeError,
    encode,
    pack_frame,
    reply_from_wire,
    request_from_wire,
)

keys = st.text(min_size=1, max_size=12).filter(lambda k: k not in {"v", "id", "op"})
scalars = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=40)
)
values = st.recursive(
    scalars | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
requests = st.builds(
    Request,
    id=st.integers(0, 2**63 - 1),
    op=st.sampled_from(["hello", "token", "status", "invalidate", "watch", "x" * 64]),
    args=st.dictionaries(keys, values, max_size=6),
)
replies = st.one_of(
    st.builds(
        Reply, id=st.integers(0, 2**63 - 1), result=st.dictionaries(keys, values, max_size=6), more=st.booleans()
    ),
    st.builds(
        ErrorReply,
        id=st.none() | st.integers(0, 2**63 - 1),
        code=st.sampled_from(list(ErrorCode)),
        message=st.text(max_size=80),
        retry_after=st.none() | st.floats(0, 1e6),
    ),
)


def decode_all(chunks: list[bytes]) -> list[dict]:
    decoder = FrameDecoder()
    out = []
    for chunk in chunks:
        decoder.receive_data(chunk)
        while (frame := decoder.next_frame()) is not NEED_DATA:
            out.append(frame)
    decoder.check_eof()
    return out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


@given(st.lists(requests, min_size=1, max_size=5), st.lists(st.integers(0, 10_000), max_size=12))
@settings(max_examples=300)
def test_requests_survive_any_split(msgs: list[Request], cuts: list[int]) -> None:
    data = b"".join(encode(m) for m in msgs)
    frames = decode_all(split(data, cuts))
    assert [request_from_wire(f) for f in frames] == msgs


@given(st.lists(replies, min_size=1, max_size=5), st.lists(st.integers(0, 10_000), max_size=12))
@settings(max_examples=300)
def test_replies_survive_any_split(msgs: list[Reply | ErrorReply], cuts: list[int]) -> None:
    data = b"".join(encode(m) for m in msgs)
    frames = decode_all(split(data, cuts))
    assert [reply_from_wire(f) for f in frames] == msgs


@given(st.binary(max_size=300))
@settings(max_examples=500)
def test_garbage_raises_or_waits_never_hangs(data: bytes) -> None:
    decoder = FrameDecoder()
    decoder.receive_data(data)
    try:
        for _ in range(len(data) + 1):  # each frame eats >= 4 bytes: this bound cannot be reached
            frame = decoder.next_frame()
            if frame is NEED_DATA:
                break
            assert isinstance(frame, dict)
        else:
            pytest.fail("decoder looped")
    except RemoteProtocolError:
        pass


def test_oversized_frame_is_refused_from_its_header() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(struct.pack(">I", MAX_FRAME + 1))
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        decoder.next_frame()


def test_http_request_line_is_a_huge_frame() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(RemoteProtocolError, match="1195725856 bytes"):
        decoder.next_frame()


def test_frame_at_the_limit_is_accepted() -> None:
    overhead = len(msgpack.packb({"k": b"x" * 1000})) - 1000
    payload = b"x" * (MAX_FRAME - overhead)
    body = msgpack.packb({"k": payload})
    assert len(body) == MAX_FRAME
    decoder = FrameDecoder()
    decoder.receive_data(struct.pack(">I", len(body)) + body)
    assert decoder.next_frame() == {"k": payload}


@pytest.mark.parametrize(
    "body",
    [b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb("str"), msgpack.packb({1: 2}), msgpack.packb({"a": 1}) + b"x"],
    ids=["empty", "invalid-byte", "array", "string", "int-keys", "trailing-bytes"],
)
def test_non_map_bodies_are_refused(body: bytes) -> None:
    decoder = FrameDecoder()
    decoder.receive_data(struct.pack(">I", len(body)) + body)
    with pytest.raises(RemoteProtocolError):
        decoder.next_frame()


def test_ext_types_are_refused() -> None:
    body = msgpack.packb({"a": msgpack.ExtType(5, b"xx")})
    decoder = FrameDecoder()
    decoder.receive_data(struct.pack(">I", len(body)) + body)
    with pytest.raises(RemoteProtocolError, match="extension"):
        decoder.next_frame()


def test_eof_mid_frame_is_an_error_and_clean_eof_is_not() -> None:
    decoder = FrameDecoder()
    decoder.check_eof()
    decoder.receive_data(encode(Request(1, "hello"))[:-1])
    assert decoder.next_frame() is NEED_DATA
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        decoder.check_eof()


@pytest.mark.parametrize(
    ("wire", "code", "rid"),
    [
        ({"v": 1, "op": "hello"}, ErrorCode.BAD_REQUEST, None),
        ({"v": 1, "id": -1, "op": "hello"}, ErrorCode.BAD_REQUEST, None),
        ({"v": 1, "id": True, "op": "hello"}, ErrorCode.BAD_REQUEST, None),
        ({"v": 2, "id": 7, "op": "hello"}, ErrorCode.UNSUPPORTED_VERSION, 7),
        ({"id": 7, "op": "hello"}, ErrorCode.UNSUPPORTED_VERSION, 7),
        ({"v": 1, "id": 7}, ErrorCode.BAD_REQUEST, 7),
        ({"v": 1, "id": 7, "op": ""}, ErrorCode.BAD_REQUEST, 7),
    ],
)
def test_misshapen_requests_get_an_error_reply(wire: dict, code: ErrorCode, rid: int | None) -> None:
    with pytest.raises(RequestShapeError) as info:
        request_from_wire(wire)
    assert info.value.reply.code is code
    assert info.value.reply.id == rid


def test_local_mistakes_are_local_protocol_errors() -> None:
    with pytest.raises(LocalProtocolError):
        Request(-1, "hello")
    with pytest.raises(LocalProtocolError):
        Request(1, "token", {"id": 3})
    with pytest.raises(LocalProtocolError, match="frame limit"):
        pack_frame({"big": "x" * MAX_FRAME})
    with pytest.raises(LocalProtocolError, match="cannot be encoded"):
        pack_frame({"obj": object()})


def test_unknown_error_code_from_a_newer_broker_is_internal() -> None:
    reply = reply_from_wire({"id": 1, "ok": False, "error": {"code": "brand_new", "message": "m"}})
    assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.INTERNAL


def test_every_error_code_has_its_own_exception_class() -> None:
    classes = {error_for_code(code.value) for code in ErrorCode}
    assert len(classes) == len(ErrorCode)
    for code in ErrorCode:
        assert error_for_code(code.value).code == code.value
