"""dc_token.minipack against msgpack itself: the same bytes out, the same values in, the same refusals."""

from __future__ import annotations

import math
import struct

import msgpack
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dc_token import minipack
from dc_token.errors import RemoteProtocolError
from dc_token.protocol import FrameDecoder, Request, encode, minipack_codec, msgpack_codec

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text()
    | st.binary()
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=20) | st.dictionaries(st.text(), inner, max_size=20),
    max_leaves=60,
)
# lengths across every msgpack width: fixstr/str8/str16, fixarray/array16, fixmap/map16
wide = st.one_of(
    st.text(min_size=30, max_size=70_000),
    st.binary(min_size=250, max_size=70_000),
    st.lists(st.integers(min_value=-(2**63), max_value=2**64 - 1), min_size=14, max_size=70),
    st.dictionaries(st.text(max_size=3), st.booleans(), min_size=14, max_size=70),
)


def same(a: object, b: object) -> bool:
    """Equal, with NaN equal to NaN."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@given(values | wide)
@settings(max_examples=200)
def test_packb_gives_msgpacks_bytes(value: object) -> None:
    assert minipack.packb(value) == msgpack.packb(value, use_bin_type=True)


@given(values | wide, st.booleans())
@settings(max_examples=200)
def test_unpackb_reads_what_msgpack_writes(value: object, single_float: bool) -> None:
    try:
        data = msgpack.packb(value, use_bin_type=True, use_single_float=single_float)
    except OverflowError:  # a float too big for float 32
        assume(False)
    assert same(minipack.unpackb(data), msgpack.unpackb(data, raw=False, strict_map_key=True))


def _msgpack_reads(data: bytes) -> tuple[bool, object]:
    def refuse(code: int, body: bytes) -> object:
        raise ValueError("ext")

    try:
        return True, msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=refuse)
    except Exception:  # msgpack's many refusal types
        return False, None


@given(st.binary(max_size=60) | values.map(lambda v: msgpack.packb(v, use_bin_type=True)).map(lambda b: b[:-1]))
@settings(max_examples=500)
def test_garbage_is_refused_where_msgpack_refuses_it(data: bytes) -> None:
    ok, expected = _msgpack_reads(data)
    if isinstance(expected, msgpack.Timestamp) or (ok and "Timestamp" in repr(expected)):
        ok = False  # msgpack decodes ext -1 as a Timestamp; the wire has no ext types: refused here
    try:
        got = minipack.unpackb(data)
    except (ValueError, RemoteProtocolError):
        assert not ok, f"minipack refused what msgpack reads: {data!r} -> {expected!r}"
        return
    assert ok, f"minipack read what msgpack refuses: {data!r} -> {got!r}"
    assert same(got, expected)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x81\x01\x02", "not allowed for map key"),  # {1: 2}
        (b"\xc1", "reserved"),
        (b"\x01\x02", "extra data"),
        (b"\xd9\x05ab", "truncated"),
        (b"\xa2\xff\xfe", "utf-8"),
        (b"\xd4\x01\x00", "extension"),
        (b"\xc7\x01\x05\x00", "extension"),
        (b"\x91" * 150 + b"\xc0", "too deeply"),
    ],
)
def test_each_refusal_names_its_reason(data: bytes, why: str) -> None:
    with pytest.raises((ValueError, RemoteProtocolError), match=why):
        minipack.unpackb(data)


def test_what_cannot_be_packed_is_refused_like_msgpack() -> None:
    for bad, error in (
        (object(), TypeError),
        ({1.5j: 1}, TypeError),
        (2**64, OverflowError),
        (-(2**63) - 1, OverflowError),
    ):
        with pytest.raises(error):
            msgpack.packb(bad, use_bin_type=True)
        with pytest.raises(error):
            minipack.packb(bad)


def test_floats_are_big_endian_doubles() -> None:
    assert minipack.packb(1.5) == b"\xcb" + struct.pack(">d", 1.5)
    assert minipack.unpackb(b"\xca" + struct.pack(">f", 0.25)) == 0.25


@given(st.dictionaries(st.text().filter(lambda k: k not in ("v", "id", "op")), values, max_size=8), st.integers(1, 40))
@settings(max_examples=200)
def test_frames_decode_the_same_with_either_codec(args: dict[str, object], cut: int) -> None:
    frames = b"".join(encode(Request(i, "token", args)) for i in range(3))
    assert frames == b"".join(encode(Request(i, "token", args), minipack_codec()) for i in range(3))
    decoded = {}
    for codec in (msgpack_codec(), minipack_codec()):
        decoder = FrameDecoder(codec=codec)
        got = []
        for start in range(0, len(frames), cut):  # split at any byte boundary
            decoder.receive_data(frames[start : start + cut])
            while isinstance(frame := decoder.next_frame(), dict):
                got.append(frame)
        decoded[codec.name] = got
    assert same(decoded["msgpack"], decoded["minipack"]) and len(decoded["msgpack"]) == 3
