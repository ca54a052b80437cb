"""The part of msgpack the wire uses, in plain Python, for dc-token's start-up: ``packb`` and ``unpackb``.

Importing the msgpack package costs a process more than the rest of dc-token together (its ``ext``
module imports datetime and collections), while dc-token sends one request and reads one reply.
So dc-token codes its few frames here; everything that lives longer than one request (the broker,
``TokenClient``, ``AsyncTokenClient``) uses msgpack's C extension (``dc_token.protocol`` picks).

The same bytes as ``msgpack.packb(obj, use_bin_type=True)`` for None, bool, int (-2**63..2**64-1),
float (always float 64), str, bytes, list, tuple and dict; the same values as ``msgpack.unpackb(data,
raw=False, strict_map_key=True)`` for every msgpack type but ext, which is refused (the wire has no
ext types), as msgpack would refuse it through the ext hook the wire sets. tests/test_minipack.py
checks both against msgpack itself, on any value (hypothesis).

Pure: no I/O, no imports (``dc_token.errorbase`` only to refuse an ext type: dc-token's path to a
token, ``dc_token.quick``, builds no class). Bad input raises ``ValueError`` (trailing bytes,
a truncated body, a reserved byte, a key that is not a string) or ``RemoteProtocolError`` (an ext
type); ``FrameDecoder`` turns every one of them into a ``RemoteProtocolError``.
"""

import sys

# dc-token imports this module on every run: typing, collections.abc and even __future__ cost it
# start-up time, so the annotations that name them are strings (no `from __future__ import annotations`)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    _Put = Callable[[bytes], object]

__all__ = ["packb", "unpackb"]

_TOO_DEEP = 100  # nesting deeper than this is refused (the wire nests 3 deep), well within any recursion limit
_SWAP = sys.byteorder == "little"  # msgpack's floats are big-endian


def packb(obj: object) -> bytes:
    """``msgpack.packb(obj, use_bin_type=True)`` for the types above; TypeError for any other."""
    out: list[bytes] = []
    _pack(obj, out.append, 0)
    return b"".join(out)


def _pack(obj: object, put: "_Put", depth: int) -> None:
    if depth > _TOO_DEEP:
        raise ValueError("nested too deeply")
    if obj is None:
        put(b"\xc0")
    elif obj is True:
        put(b"\xc3")
    elif obj is False:
        put(b"\xc2")
    elif isinstance(obj, int):
        put(_int(obj))
    elif isinstance(obj, float):
        put(b"\xcb" + _float64(obj))
    elif isinstance(obj, str):
        data = obj.encode("utf-8")
        n = len(data)
        put((bytes((0xA0 | n,)) if n < 32 else _length(n, b"\xd9", b"\xda", b"\xdb")) + data)
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        data = bytes(obj)
        put(_length(len(data), b"\xc4", b"\xc5", b"\xc6") + data)
    elif isinstance(obj, dict):
        n = len(obj)
        put(bytes((0x80 | n,)) if n < 16 else _length(n, None, b"\xde", b"\xdf"))
        for key, value in obj.items():
            _pack(key, put, depth + 1)
            _pack(value, put, depth + 1)
    elif isinstance(obj, (list, tuple)):
        n = len(obj)
        put(bytes((0x90 | n,)) if n < 16 else _length(n, None, b"\xdc", b"\xdd"))
        for item in obj:
            _pack(item, put, depth + 1)
    else:
        raise TypeError(f"can not serialize {type(obj).__name__!r} object")


def _int(n: int) -> bytes:
    if 0 <= n < 0x80:
        return bytes((n,))
    if -32 <= n < 0:
        return bytes((n & 0xFF,))
    if n > 0:
        for tag, size in ((0xCC, 1), (0xCD, 2), (0xCE, 4), (0xCF, 8)):
            if n < 1 << (8 * size):
                return bytes((tag,)) + n.to_bytes(size, "big")
    else:
        for tag, size in ((0xD0, 1), (0xD1, 2), (0xD2, 4), (0xD3, 8)):
            if n >= -(1 << (8 * size - 1)):
                return bytes((tag,)) + n.to_bytes(size, "big", signed=True)
    raise OverflowError("Integer value out of range")


def _length(n: int, tag8: bytes | None, tag16: bytes, tag32: bytes) -> bytes:
    if tag8 is not None and n < 0x100:
        return tag8 + bytes((n,))
    if n < 0x10000:
        return tag16 + n.to_bytes(2, "big")
    if n < 0x100000000:
        return tag32 + n.to_bytes(4, "big")
    raise ValueError("too long for msgpack")


def unpackb(data: "bytes | bytearray | memoryview") -> object:
    """``msgpack.unpackb(data, raw=False, strict_map_key=True)``, ext types refused."""
    buf = bytes(data)
    obj, end = _unpack(buf, 0, 0)
    if end != len(buf):
        raise ValueError(f"{len(buf) - end} bytes of extra data after the object")
    return obj


def _unpack(buf: bytes, pos: int, depth: int) -> tuple[object, int]:
    if depth > _TOO_DEEP:
        raise ValueError("nested too deeply")
    if pos >= len(buf):
        raise ValueError("truncated msgpack data")
    tag = buf[pos]
    pos += 1
    if tag < 0x80:
        return tag, pos
    if tag >= 0xE0:
        return tag - 0x100, pos
    if tag < 0x90:
        return _map(buf, pos, tag & 0x0F, depth)
    if tag < 0xA0:
        return _array(buf, pos, tag & 0x0F, depth)
    if tag < 0xC0:
        return _str(buf, pos, tag & 0x1F)
    if tag == 0xC0:
        return None, pos
    if tag == 0xC2:
        return False, pos
    if tag == 0xC3:
        return True, pos
    size = _SIZED.get(tag)
    if size is not None:
        kind, width = size
        if kind == "uint":
            return int.from_bytes(_take(buf, pos, width), "big"), pos + width
        if kind == "int":
            return int.from_bytes(_take(buf, pos, width), "big", signed=True), pos + width
        if kind == "float":
            return _float(_take(buf, pos, width)), pos + width
        n = int.from_bytes(_take(buf, pos, width), "big")
        pos += width
        if kind == "str":
            return _str(buf, pos, n)
        if kind == "bin":
            return _take(buf, pos, n), pos + n
        if kind == "array":
            return _array(buf, pos, n, depth)
        if kind == "map":
            return _map(buf, pos, n, depth)
        raise _no_ext()  # ext 8/16/32
    if 0xD4 <= tag <= 0xD8:
        raise _no_ext()  # fixext
    raise ValueError(f"reserved msgpack byte 0x{tag:02x}")


def _no_ext() -> Exception:
    from dc_token.errorbase import RemoteProtocolError

    return RemoteProtocolError("msgpack extension types are not allowed")


def _take(buf: bytes, pos: int, n: int) -> bytes:
    end = pos + n
    if end > len(buf):
        raise ValueError("truncated msgpack data")
    return buf[pos:end]


def _str(buf: bytes, pos: int, n: int) -> tuple[str, int]:
    return _take(buf, pos, n).decode("utf-8"), pos + n


def _array(buf: bytes, pos: int, n: int, depth: int) -> tuple[list[object], int]:
    items = []
    for _ in range(n):
        item, pos = _unpack(buf, pos, depth + 1)
        items.append(item)
    return items, pos


def _map(buf: bytes, pos: int, n: int, depth: int) -> tuple[dict[object, object], int]:
    out: dict[object, object] = {}
    for _ in range(n):
        key, pos = _unpack(buf, pos, depth + 1)
        if type(key) is not str and type(key) is not bytes:
            raise ValueError(f"{type(key).__name__} is not allowed for map key")
        out[key], pos = _unpack(buf, pos, depth + 1)
    return out, pos


def _float64(x: float) -> bytes:
    """IEEE 754 binary64, big-endian (what ``struct.pack(">d", x)`` gives, without loading _struct)."""
    cell = memoryview(bytearray(8)).cast("d")
    cell[0] = x
    raw = cell.cast("B").tobytes()
    return raw[::-1] if _SWAP else raw


def _float(raw: bytes) -> float:
    """A big-endian binary32 or binary64 as a float."""
    value: float = memoryview(raw[::-1] if _SWAP else raw).cast("f" if len(raw) == 4 else "d")[0]
    return value


#: tag -> (kind, bytes of its length or value)
_SIZED: dict[int, tuple[str, int]] = {
    0xC4: ("bin", 1),
    0xC5: ("bin", 2),
    0xC6: ("bin", 4),
    0xC7: ("ext", 1),
    0xC8: ("ext", 2),
    0xC9: ("ext", 4),
    0xCA: ("float", 4),
    0xCB: ("float", 8),
    0xCC: ("uint", 1),
    0xCD: ("uint", 2),
    0xCE: ("uint", 4),
    0xCF: ("uint", 8),
    0xD0: ("int", 1),
    0xD1: ("int", 2),
    0xD2: ("int", 4),
    0xD3: ("int", 8),
    0xD9: ("str", 1),
    0xDA: ("str", 2),
    0xDB: ("str", 4),
    0xDC: ("array", 2),
    0xDD: ("array", 4),
    0xDE: ("map", 2),
    0xDF: ("map", 4),
}
