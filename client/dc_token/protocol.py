"""THE wire contract between dc-broker and its clients: framing, message shapes, error codes.

Pure: bytes in, messages out. No socket, no trio, no clock. Both sides import this module; the broker
depends on it, never the reverse.

Framing
    Each message is a 4-byte big-endian unsigned length followed by exactly that many bytes holding
    one msgpack map. A frame body longer than ``MAX_FRAME`` (64 KiB) is refused as soon as its header
    is seen, so a peer can never make us buffer more than that. (An HTTP request line read as a header
    is a ~1 GB length: a browser cannot drive the socket.)

Requests (client -> broker)
    ``{"v": 1, "id": <int>, "op": <str>, ...op arguments}``. ``id`` is chosen by the client and echoed
    in the reply; several requests may be in flight on one connection (pipelining) and replies may
    come back in any order.

Replies (broker -> client)
    ``{"id": <int>, "ok": true, "result": {...}}`` or
    ``{"id": <int|None>, "ok": false, "error": {"code": <ErrorCode>, "message": <str>,
    "retry_after": <float, optional>}}``. A streaming op (``watch``) sends several replies with the
    same id; every one but the last carries ``"more": true``.

Codecs
    A frame's body is msgpack. Whatever serves or asks more than once (the broker, ``TokenClient``,
    ``AsyncTokenClient``) codes it with msgpack's C extension (``msgpack_codec()``, the default);
    dc-token, one request per process, with ``dc_token.minipack`` (``minipack_codec()``): the same
    bytes, without the cost of importing msgpack. Nothing here imports msgpack until a frame is coded
    with it, and ``ErrorCode`` (an enum) is imported the first time an error code is needed.

Invariants
    * ``FrameDecoder`` never holds more than one partial frame of at most ``MAX_FRAME`` bytes plus
      whatever whole frames the caller has not yet taken.
    * Every decoding failure is a ``RemoteProtocolError``; every encoding failure (our bug) is a
      ``LocalProtocolError``. Nothing here blocks or loops on its own.
    * Error codes are the closed set ``ErrorCode``; ``dc_token.errors`` maps each to one exception.
    * The argument checks (``TokenArgs``, ``ARGS``, ``request_parts``, and the value checks they
      apply, in ``dc_token.contract``) are the only definition of a valid request; the broker's fast
      path and dc-token's (``dc_token.quick``) call them, they never re-state them.
"""

from dc_token.contract import (
    HEADER_SIZE,
    MAX_FRAME,
    MAX_ID,
    MAX_MIN_TTL,
    NUMBER,
    PROTOCOL_VERSION,
    min_ttl_problem,
    profile_problem,
    scope_problem,
)
from dc_token.errorbase import LocalProtocolError, RemoteProtocolError

# dc-token imports this module on every run: typing, collections.abc and even __future__ cost it
# start-up time, so the annotations that name them are strings (no `from __future__ import annotations`)
TYPE_CHECKING = False
if TYPE_CHECKING:  # typing and collections.abc cost dc-token start-up time; annotations only
    from collections.abc import Callable, Mapping
    from typing import Any, Final

    from dc_token.codes import ErrorCode

__all__ = [
    "ARGS",
    "MAX_FRAME",
    "MAX_MIN_TTL",
    "NEED_DATA",
    "OPS",
    "PROTOCOL_VERSION",
    "Codec",
    "ErrorCode",
    "ErrorReply",
    "FrameDecoder",
    "OpArgs",
    "Reply",
    "Request",
    "TokenArgs",
    "args_problem",
    "encode",
    "min_ttl_problem",
    "minipack_codec",
    "msgpack_codec",
    "pack_frame",
    "reply_frame",
    "reply_from_wire",
    "request_from_wire",
    "request_parts",
]


def __getattr__(name: str) -> object:
    if name == "ErrorCode":  # built on first use: see dc_token.codes
        from dc_token.codes import ErrorCode

        return ErrorCode
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_RESERVED_REQUEST_KEYS: "Final" = frozenset({"v", "id", "op"})


class NeedData:
    """The type of ``NEED_DATA`` (h11's sentinel pattern): a decoder's "no whole frame yet"."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


#: returned by ``FrameDecoder.next_frame`` when no whole frame is buffered yet
NEED_DATA: "Final" = NeedData()


class _Message:
    """Frozen, slotted value object (hand-written: ``dataclasses`` costs dc-token ~5 ms to import)."""

    __slots__: tuple[str, ...] = ()

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def _fields(self) -> tuple[object, ...]:
        return tuple(getattr(self, f) for f in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._fields() == other._fields()  # type: ignore[attr-defined,unused-ignore]

    def __hash__(self) -> int:
        return hash((type(self).__name__, *(repr(f) for f in self._fields())))

    def __repr__(self) -> str:
        inner = ", ".join(f"{f}={getattr(self, f)!r}" for f in self.__slots__)
        return f"{type(self).__name__}({inner})"


class Request(_Message):
    """One request. ``args`` are the op's arguments (every key except v/id/op)."""

    __slots__ = ("args", "id", "op", "v")
    id: int
    op: str
    args: "Mapping[str, Any]"
    v: int

    def __init__(self, id: int, op: str, args: "Mapping[str, Any] | None" = None, v: int = PROTOCOL_VERSION) -> None:
        if type(id) is not int or not 0 <= id <= MAX_ID:
            raise LocalProtocolError(f"request id must be an int in 0..2**63-1, not {id!r}")
        if not isinstance(op, str) or not 0 < len(op) <= 64:
            raise LocalProtocolError(f"op must be a non-empty string, not {op!r}")
        args = {} if args is None else args
        if _RESERVED_REQUEST_KEYS.intersection(args):
            raise LocalProtocolError("request args may not use the keys v, id or op")
        object.__setattr__(self, "id", id)
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "v", v)

    def to_wire(self) -> "dict[str, Any]":
        wire: dict[str, Any] = {"v": self.v, "id": self.id, "op": self.op}
        wire.update(self.args)
        return wire


class Reply(_Message):
    """A successful reply. ``more`` is true on every message of a stream but the last."""

    __slots__ = ("id", "more", "result")
    id: int
    result: "Mapping[str, Any]"
    more: bool

    def __init__(self, id: int, result: "Mapping[str, Any]", more: bool = False) -> None:
        object.__setattr__(self, "id", id)
        object.__setattr__(self, "result", result)
        object.__setattr__(self, "more", more)

    def to_wire(self) -> "dict[str, Any]":
        return _reply_map(self.id, self.result, self.more)


def _reply_map(rid: int, result: "Mapping[str, Any]", more: bool) -> "dict[str, Any]":
    wire: dict[str, Any] = {"id": rid, "ok": True, "result": result}
    if more:
        wire["more"] = True
    return wire


class ErrorReply(_Message):
    """A failed request. ``id`` is None when the request was too broken to have one."""

    __slots__ = ("code", "id", "message", "retry_after")
    id: int | None
    code: "ErrorCode"
    message: str
    retry_after: float | None

    def __init__(self, id: int | None, code: "ErrorCode", message: str, retry_after: float | None = None) -> None:
        from dc_token.codes import ErrorCode

        if not isinstance(code, ErrorCode):
            raise LocalProtocolError(f"unknown error code {code!r}")
        object.__setattr__(self, "id", id)
        object.__setattr__(self, "code", code)
        object.__setattr__(self, "message", message)
        object.__setattr__(self, "retry_after", retry_after)

    def to_wire(self) -> "dict[str, Any]":
        error: dict[str, Any] = {"code": self.code.value, "message": self.message}
        if self.retry_after is not None:
            error["retry_after"] = float(self.retry_after)
        return {"id": self.id, "ok": False, "error": error}


def _bad_request(message: str) -> Exception:
    """``BadRequest(message)``; its class is made the first time one is needed (dc_token.errors)."""
    from dc_token.errors import BadRequest

    return BadRequest(message)


class TokenArgs:
    """The arguments of ``token`` and ``watch``, checked when built: the client builds them to send,
    the broker from what it received (``from_wire``), so both sides apply the same bounds. A bad
    value is ``BadRequest`` on either side.

    A plain slotted class (the broker builds one per token request): treat it as a value."""

    __slots__ = ("min_ttl", "profile", "scope")
    profile: str
    min_ttl: float
    scope: str | None

    def __init__(self, profile: str, min_ttl: float = 0.0, scope: str | None = None) -> None:
        problem = profile_problem(profile)
        if problem is not None:
            raise _bad_request(f"'profile' {problem}")
        problem = min_ttl_problem(min_ttl)
        if problem is not None:
            raise _bad_request(f"'min_ttl' {problem}")
        if scope is not None:
            problem = scope_problem(scope)
            if problem is not None:
                raise _bad_request(f"'scope' {problem}")
        self.profile = profile
        self.min_ttl = float(min_ttl)
        self.scope = scope or None

    @classmethod
    def from_wire(cls, args: "Mapping[str, Any]") -> "TokenArgs":
        profile: Any = args.get("profile")  # checked in __init__, whatever it is
        min_ttl = args.get("min_ttl")
        scope = args.get("scope")
        return cls(profile, 0.0 if min_ttl is None else min_ttl, scope if scope != "" else None)

    def to_wire(self) -> "dict[str, Any]":
        """The request arguments (no ``scope`` key unless one is asked for)."""
        wire: dict[str, Any] = {"profile": self.profile, "min_ttl": self.min_ttl}
        if self.scope:
            wire["scope"] = self.scope
        return wire

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TokenArgs):
            return NotImplemented
        return (self.profile, self.min_ttl, self.scope) == (other.profile, other.min_ttl, other.scope)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"TokenArgs(profile={self.profile!r}, min_ttl={self.min_ttl!r}, scope={self.scope!r})"


def _text_problem(value: object) -> str | None:
    return None if isinstance(value, str) and value else "must be a non-empty string"


def _flag_problem(value: object) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def _rejected_token_problem(value: object) -> str | None:
    return None if isinstance(value, str) and value else "must be the access token the API rejected"


def _key_type_problem(value: object) -> str | None:
    return None if value in ("ec", "rsa") else "must be 'ec' or 'rsa'"


def _after_problem(value: object) -> str | None:
    return None if isinstance(value, str) else "must be the profile name a previous status reply gave as 'next'"


#: (required, what is wrong with a value) of one op argument
_Arg = tuple[bool, "Callable[[object], str | None]"]
_PROFILE: "Final[_Arg]" = (True, profile_problem)
_TOKEN_ARGS: "Final[dict[str, _Arg]]" = {
    "profile": _PROFILE,
    "min_ttl": (False, min_ttl_problem),
    "scope": (False, scope_problem),
}

#: every op of this protocol version and its arguments: the one table both sides check against.
#: An absent (or null) optional argument is its default; a key not named here is ignored (a newer
#: peer's extra), so adding an optional argument never breaks an older broker.
ARGS: "Final[dict[str, dict[str, _Arg]]]" = {
    "hello": {},
    "token": _TOKEN_ARGS,
    "watch": _TOKEN_ARGS,
    "invalidate": {"profile": _PROFILE, "token": (True, _rejected_token_problem)},
    "status": {"profile": (False, profile_problem), "after": (False, _after_problem)},
    "login": {"profile": _PROFILE, "password": (False, _text_problem)},
    "unlock": {"passphrase": (False, _text_problem)},
    "lock": {},
    "reload": {},
    "set_secrets": {
        "profile": _PROFILE,
        "password": (False, _text_problem),
        "client_secret": (False, _text_problem),
        "verify": (False, _flag_problem),
        # private_key_jwt: the broker makes a key of this type ("ec" or "rsa"), the next one if it has
        # one; activate_key: the next key signs from now on (after the IdP accepted it, with verify)
        "new_key": (False, _key_type_problem),
        "activate_key": (False, _flag_problem),
    },
    # forget: after the logout, the broker also removes every record it holds for the profile (its
    # client secret and keys too: `dc-broker remove`); the answer has "forgot_profile": true. A broker
    # that predates it ignores the key (a plain logout) and its answer has no "forgot_profile".
    "logout": {"profile": _PROFILE, "forget": (False, _flag_problem)},
    # the Prometheus exposition of the broker's metrics (text), for a textfile collector or a timer
    "metrics": {},
    # the ID token of the profile's login (OIDC; scope openid), e.g. for Kubernetes' OIDC authenticator
    "id_token": {"profile": _PROFILE, "min_ttl": (False, min_ttl_problem)},
}
#: the operations this protocol version defines (the broker may implement a subset and answer
#: ``unknown_op`` for the rest)
OPS: "Final" = frozenset(ARGS)


def args_problem(op: str, args: "Mapping[str, Any]") -> str | None:
    """What is wrong with ``op``'s arguments (the first bad or missing one, named), or None."""
    for key, (required, problem) in ARGS[op].items():
        value = args.get(key)
        if value is None and not required:
            continue
        found = problem(value)
        if found is not None:
            return f"'{key}' {found}"
    return None


class OpArgs(_Message):
    """One op's arguments, checked against ``ARGS`` when built: the client builds them to send
    (``OpArgs("login", profile=..., password=...)``), the broker from what it received
    (``from_wire``), so both sides apply the same rules. A bad value is ``BadRequest`` either side.
    Only the keys the table names are kept; values may be secrets, so the repr shows keys only."""

    __slots__ = ("op", "values")
    op: str
    values: "dict[str, Any]"

    def __init__(self, op: str, /, **values: "Any") -> None:
        self._check(op, values)

    @classmethod
    def from_wire(cls, op: str, args: "Mapping[str, Any]") -> "OpArgs":
        built = cls.__new__(cls)
        built._check(op, args)
        return built

    def _check(self, op: str, values: "Mapping[str, Any]") -> None:
        if op not in ARGS:
            raise _bad_request(f"op {op!r} is not a dc-broker op")
        problem = args_problem(op, values)
        if problem is not None:
            raise _bad_request(problem)
        known = ARGS[op]
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "values", {k: v for k, v in values.items() if k in known and v is not None})

    def to_wire(self) -> "dict[str, Any]":
        return dict(self.values)

    def get(self, key: str, default: "Any" = None) -> "Any":
        return self.values.get(key, default)

    def __getitem__(self, key: str) -> "Any":
        return self.values[key]

    def __repr__(self) -> str:
        return f"OpArgs({self.op!r}, keys={sorted(self.values)!r})"


class Codec:
    """How a frame's body is made and read: ``packb(map) -> bytes`` and ``unpackb(bytes) -> object``
    (which may raise anything on garbage: ``FrameDecoder`` makes it a ``RemoteProtocolError``)."""

    __slots__ = ("name", "packb", "unpackb")

    def __init__(self, name: str, packb: "Callable[[Any], bytes]", unpackb: "Callable[[Any], Any]") -> None:
        self.name = name
        self.packb = packb
        self.unpackb = unpackb

    def __repr__(self) -> str:
        return f"Codec({self.name!r})"


_CODECS: "dict[str, Codec]" = {}


def _refuse_ext(code: int, data: bytes) -> "Any":
    raise RemoteProtocolError(f"msgpack extension type {code} is not allowed")


def msgpack_codec() -> "Codec":
    """msgpack's C extension (the default): fast per message; imported on first use."""
    codec = _CODECS.get("msgpack")
    if codec is None:
        from functools import partial

        import msgpack

        unpackb = partial(msgpack.unpackb, raw=False, ext_hook=_refuse_ext, strict_map_key=True)
        codec = _CODECS["msgpack"] = Codec("msgpack", msgpack.Packer(use_bin_type=True, autoreset=True).pack, unpackb)
    return codec


def minipack_codec() -> "Codec":
    """``dc_token.minipack``: the same bytes in plain Python, cheap to import (dc-token's codec)."""
    codec = _CODECS.get("minipack")
    if codec is None:
        import dc_token.minipack as minipack

        codec = _CODECS["minipack"] = Codec("minipack", minipack.packb, minipack.unpackb)
    return codec


def pack_frame(obj: "Mapping[str, Any]", codec: "Codec | None" = None) -> bytes:
    """Frame one msgpack map. Raises LocalProtocolError if it cannot be encoded or is too big."""
    try:
        body: bytes = (codec or msgpack_codec()).packb(obj)
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(f"message cannot be encoded: {exc}") from exc
    if len(body) > MAX_FRAME:
        raise LocalProtocolError(f"message of {len(body)} bytes exceeds the {MAX_FRAME}-byte frame limit")
    return len(body).to_bytes(4, "big") + body


def encode(message: "Request | Reply | ErrorReply", codec: "Codec | None" = None) -> bytes:
    """Bytes to send for one message."""
    return pack_frame(message.to_wire(), codec)


def reply_frame(rid: int, result: "Mapping[str, Any]", more: bool = False, codec: "Codec | None" = None) -> bytes:
    """``encode(Reply(rid, result, more))`` without building the Reply (the broker's path for every
    reply). Raises LocalProtocolError like ``pack_frame``."""
    wire: dict[str, Any] = {"id": rid, "ok": True, "result": result}
    if more:
        wire["more"] = True
    return pack_frame(wire, codec)


class FrameDecoder:
    """Incremental decoder: feed bytes with ``receive_data``, take maps with ``next_frame``.

    Frames are returned as plain dicts; ``request_from_wire`` / ``reply_from_wire`` give them shape.
    Raises RemoteProtocolError on an oversized frame, a body that is not exactly one msgpack map, or
    (via ``check_eof``) a connection closed mid-frame. After an error the decoder is unusable.
    """

    __slots__ = ("_buf", "_max_frame", "_unpackb")

    def __init__(self, max_frame: int = MAX_FRAME, codec: "Codec | None" = None) -> None:
        self._buf = bytearray()
        self._max_frame = max_frame
        self._unpackb = (codec or msgpack_codec()).unpackb

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames (a partial frame, if non-zero)."""
        return len(self._buf)

    def receive(self, data: bytes) -> "tuple[list[dict[str, Any]], RemoteProtocolError | None]":
        """``receive_data(data)``, then every whole frame now held, in order, and the error that
        stopped the reading (None if none; after one the decoder is unusable): the frames before a
        bad one are still the peer's requests. One call per read, for servers."""
        if not self._buf and len(data) > HEADER_SIZE:  # nothing held back and one whole frame: no copy
            length = int.from_bytes(data[:HEADER_SIZE], "big")
            if length <= self._max_frame and len(data) == HEADER_SIZE + length:
                try:
                    return [self._decode(data[HEADER_SIZE:])], None
                except RemoteProtocolError as exc:
                    return [], exc
        self._buf += data
        frames: list[dict[str, Any]] = []
        try:
            while (frame := self.next_frame()) is not NEED_DATA:
                frames.append(frame)  # type: ignore[arg-type]
        except RemoteProtocolError as exc:
            return frames, exc
        return frames, None

    def next_frame(self) -> "dict[str, Any] | NeedData":
        buf = self._buf
        if len(buf) < HEADER_SIZE:
            return NEED_DATA
        length = int.from_bytes(buf[:HEADER_SIZE], "big")
        if length > self._max_frame:
            raise RemoteProtocolError(
                f"frame of {length} bytes exceeds the {self._max_frame}-byte limit "
                "(is something other than a dc-broker client talking to the socket?)"
            )
        end = HEADER_SIZE + length
        if len(buf) < end:
            return NEED_DATA
        body = buf[HEADER_SIZE:end]
        del buf[:end]
        return self._decode(body)

    def _decode(self, body: bytes | bytearray) -> "dict[str, Any]":
        try:
            obj = self._unpackb(body)
        except RemoteProtocolError:
            raise
        except Exception as exc:  # msgpack raises many types for garbage; all mean the same here
            raise RemoteProtocolError(f"frame is not valid msgpack: {type(exc).__name__}") from None
        if obj.__class__ is not dict and not isinstance(obj, dict):
            raise RemoteProtocolError(f"frame holds a {type(obj).__name__}, not a map")
        return obj

    def check_eof(self) -> None:
        """Call when the peer closed: a half-received frame is an error, a clean boundary is not."""
        if self._buf:
            raise RemoteProtocolError(f"connection closed in the middle of a frame ({len(self._buf)} bytes)")


class RequestShapeError(RemoteProtocolError):
    """A well-framed map that is not a valid request. The connection survives: answer with ``reply``."""

    def __init__(self, reply: "ErrorReply") -> None:
        super().__init__(reply.message)
        self.reply = reply


def request_parts(obj: "dict[str, Any]") -> "tuple[int, str, dict[str, Any]]":
    """A decoded map's request id, op and arguments (a new map: every key but v, id and op), or
    RequestShapeError carrying the error to send back. The broker's path for every request."""
    rid = obj.get("id")
    if type(rid) is not int or not 0 <= rid <= MAX_ID:
        raise RequestShapeError(_shape_error(None, "bad_request", "request needs an integer 'id' in 0..2**63-1"))
    v = obj.get("v")
    if v != PROTOCOL_VERSION:
        raise RequestShapeError(
            _shape_error(
                rid,
                "unsupported_version",
                f"protocol version {v!r} is not supported; this broker speaks version {PROTOCOL_VERSION}",
            )
        )
    op = obj.get("op")
    if not isinstance(op, str) or not 0 < len(op) <= 64:
        raise RequestShapeError(_shape_error(rid, "bad_request", "request needs a string 'op'"))
    args = obj.copy()  # v, id and op are there (checked above): take them out
    del args["v"], args["id"], args["op"]
    return rid, op, args


def _shape_error(rid: int | None, code: str, message: str) -> "ErrorReply":
    from dc_token.codes import ErrorCode

    return ErrorReply(rid, ErrorCode(code), message)


def request_from_wire(obj: "dict[str, Any]") -> "Request":
    """Shape a decoded map into a Request, or raise RequestShapeError carrying the error to send back."""
    return Request(*request_parts(obj))


def reply_from_wire(obj: "dict[str, Any]") -> "Reply | ErrorReply":
    """Shape a decoded map into a Reply or ErrorReply; anything else is a RemoteProtocolError."""
    rid = obj.get("id")
    ok = obj.get("ok")
    if ok is True:
        result = obj.get("result")
        if type(rid) is not int or not isinstance(result, dict):
            raise RemoteProtocolError("reply needs an integer 'id' and a 'result' map")
        return Reply(rid, result, bool(obj.get("more", False)))
    if ok is False:
        from dc_token.codes import ErrorCode

        err = obj.get("error")
        if not isinstance(err, dict) or (rid is not None and type(rid) is not int):
            raise RemoteProtocolError("error reply needs an 'error' map")
        raw_code = err.get("code")
        try:
            code = ErrorCode(str(raw_code))
        except ValueError:
            code = ErrorCode.INTERNAL
        message = err.get("message")
        if not isinstance(message, str):
            message = f"broker error {raw_code!r}"
        retry_after = err.get("retry_after")
        if not isinstance(retry_after, NUMBER) or isinstance(retry_after, bool):
            retry_after = None
        return ErrorReply(rid, code, message, None if retry_after is None else float(retry_after))
    raise RemoteProtocolError("reply needs 'ok' true or false")
