"""A token request repeated on one connection, answered from what the full path decided for it.

A client that keeps its connection (``TokenClient``, the proxy, a service's own loop) sends the same
``token`` request again and again, byte for byte but for its request id. The first one goes the
whole way (``_Connection.feed``: framing, msgpack, the wire contract's checks, the program check,
``authorized``, ``Session.peek``, the reply map, msgpack again); what it decided is kept on the
connection as a ``Repeat``, and the next identical request is answered from it while nothing that
decision rests on has changed:

    the session's token          the same object (a refresh, an invalidation, lock, logout or a
                                 removed profile replace it or drop it)
    the session's profile        the same object (a reload that changes who may use the profile,
                                 or anything else about it, replaces it)
    the request's ``min_ttl``    the token still has more than that left (strictly: the full
                                 path's own ``peek``, and no ``min_ttl_shortfall`` to report)
    the caller                   the connection's, from the kernel, fixed for its life

Anything else goes the full path, which makes a new ``Repeat`` when it answers from the cache again.
Requests with a ``scope`` never repeat (the scoped session is chosen, and paid for, per request).
The reply is the full path's bytes with the request id and the three times written in
(``expires_in``, ``expires_at``, ``refresh_in``, computed by ``ops.token_times``): a test holds the
two byte for byte equal. The audit trail, ``last_use`` and the ``ok`` counter see every request.

Must never: answer a request whose bytes differ from the remembered one's (but for its id); outlive
the token, profile or min_ttl it was decided from; answer a request of another connection.
"""

from __future__ import annotations

import struct
import weakref
from typing import Any

from dc_broker.access.caller import Caller
from dc_broker.serve.ops import BrokerState, token_times
from dc_broker.sessions.session import Session
from dc_broker.tokens import TokenSet
from dc_token.contract import HEADER_SIZE, MAX_ID
from dc_token.errors import LocalProtocolError
from dc_token.protocol import MAX_FRAME, Codec, TokenArgs, reply_frame

#: the op whose replies repeat
REPEATABLE_OP = "token"
#: a request map of our clients: its header byte, then ``v: 1`` and the ``id`` key; the id follows
_REQUEST_KEYS = b"\xa1v\x01\xa2id"
_ID_AT = 1 + len(_REQUEST_KEYS)
#: a reply map begins with its header and the ``id`` key; the id follows
_REPLY_HEAD = b"\x83\xa2id"
#: msgpack's unsigned int formats (marker -> bytes after it, the smallest value that needs them):
#: an id is copied into the reply only in the form msgpack itself writes (the smallest)
_UINTS = {0xCC: (1, 0x80), 0xCD: (2, 0x100), 0xCE: (4, 0x10000), 0xCF: (8, 0x1_0000_0000)}
#: the times of a token reply, in the order ``token_times`` returns them
_TIMES = ("expires_in", "expires_at", "refresh_in")
#: stand-ins for the times while the template is packed: three floats no reply would carry
_SENTINELS = (-1.0e300, -2.0e300, -3.0e300)
_DOUBLE = struct.Struct(">d")
#: stand-ins for the token while the template is packed (the first one found nowhere else in it)
_FILLERS = ("\x01", "\x02", "\x03", "\x04", "\x05", "\x06", "\x07", "\x08")
#: in a ``Repeat``'s fill order: the access token, after the three times
_TOKEN = 3


def request_id(body: bytes) -> tuple[int, int] | None:
    """(start, end) of the request id's bytes in a request body written the way our clients write
    one (``v`` then ``id``, the id in msgpack's smallest form), else None."""
    if len(body) <= _ID_AT or body[1:_ID_AT] != _REQUEST_KEYS:
        return None
    marker = body[_ID_AT]
    if marker < 0x80:
        return _ID_AT, _ID_AT + 1
    size = _UINTS.get(marker)
    if size is None:
        return None
    n, smallest = size
    end = _ID_AT + 1 + n
    if len(body) < end:
        return None
    value = int.from_bytes(body[_ID_AT + 1 : end], "big")
    if value < smallest or value > MAX_ID:
        return None
    return _ID_AT, end


class Repeat:
    """What the full path decided for one ``token`` request on one connection (module docstring).
    It holds the token set by a weak reference and none of its bytes: a lock, a logout or a refresh
    that drops the session's token leaves nothing of it here."""

    __slots__ = (
        "_fill",
        "_layout",
        "_pieces",
        "caller",
        "head",
        "profile",
        "session",
        "state",
        "tail",
        "tok",
        "until",
    )

    def __init__(
        self,
        state: BrokerState,
        caller: Caller,
        session: Session,
        tok: TokenSet,
        min_ttl: float,
        request: tuple[bytes, bytes],
        reply: tuple[list[bytes], tuple[int, ...], str],
    ) -> None:
        self.state = state
        self.caller = caller
        self.session = session
        self.tok = weakref.ref(tok)
        self.profile = session.profile
        #: from this clock time on the token no longer has more than ``min_ttl`` left
        self.until = tok.expires_at - min_ttl
        #: the request body before its id (map header, ``v``, the ``id`` key) and after it
        self.head, self.tail = request
        #: the reply after its id in pieces, around the values written in per request (``_fill``:
        #: for each gap, which of the times (0-2) or the token (3) goes there), and their layout
        self._pieces, self._fill, layout = reply
        self._layout = struct.Struct(layout)

    @classmethod
    def of(
        cls,
        state: BrokerState,
        caller: Caller,
        body: bytes,
        args: dict[str, Any],
        result: dict[str, Any],
        codec: Codec,
    ) -> Repeat | None:
        """The ``Repeat`` of the token request ``body`` (a frame's body) that the full path has just
        answered with ``result`` from the cache, in the same step (nothing has moved since); None
        when it cannot repeat."""
        span = request_id(body)
        checked = TokenArgs.from_wire(args)  # it passed these checks a moment ago
        if span is None or checked.scope or "min_ttl_shortfall" in result:
            return None
        session = state.sessions.lookup(checked.profile)
        tok = session.token
        if tok is None:
            return None
        probe = dict(result)
        for name, sentinel in zip(_TIMES, _SENTINELS, strict=True):
            probe[name] = sentinel  # the clocks are floats: so are the times (a test holds the bytes equal)
        token = tok.access_token.reveal().encode()
        for filler in _FILLERS:  # a stand-in of the token's length that nothing else in the reply holds
            probe["token"] = filler * len(token)
            reply = _template(probe, codec)
            if reply is not None:
                break
        else:
            return None
        request = (body[: span[0]], body[span[1] :])
        return cls(state, caller, session, tok, checked.min_ttl, request, reply)

    def answer(self, body: bytes, now: float) -> bytes | None:
        """The reply frame to the request ``body`` (one whole frame's, all that one read brought) if
        it is exactly the remembered request, with any id, and nothing the decision rests on has
        changed; else None."""
        session = self.session
        tok = session.token
        if tok is None or tok is not self.tok() or session.profile is not self.profile or now >= self.until:
            return None
        span = request_id(body)
        if span is None:
            return None
        start, end = span
        if body[:start] != self.head or body[end:] != self.tail:
            return None
        values = (*token_times(session, tok, now), tok.access_token.reveal().encode())
        self.state.audit.record(self.profile.name, self.caller)
        self.state.last_use = now
        p, f = self._pieces, self._fill
        rest = self._layout.pack(p[0], values[f[0]], p[1], values[f[1]], p[2], values[f[2]], p[3], values[f[3]], p[4])
        rid = body[start:end]
        return (len(_REPLY_HEAD) + len(rid) + len(rest)).to_bytes(HEADER_SIZE, "big") + _REPLY_HEAD + rid + rest


def _template(probe: dict[str, Any], codec: Codec) -> tuple[list[bytes], tuple[int, ...], str] | None:
    """A reply to ``probe`` (a token result with stand-ins for the values written in per request) in
    pieces around those values, what goes in each gap, and the ``struct`` layout of the whole; None
    when a stand-in is not found exactly once."""
    try:
        frame = reply_frame(0, probe, False, codec)
    except LocalProtocolError:
        return None
    start = HEADER_SIZE + len(_REPLY_HEAD) + 1  # the length, the head and the id (0)
    if frame[HEADER_SIZE:start] != _REPLY_HEAD + b"\x00" or len(frame) - HEADER_SIZE + 8 > MAX_FRAME:
        return None  # (8: the most an id adds)
    rest = frame[start:]
    stand_in = probe["token"].encode()
    wanted = [(b"\xcb" + _DOUBLE.pack(sentinel), 1, 8, i, "d") for i, sentinel in enumerate(_SENTINELS)]
    wanted.append((stand_in, 0, len(stand_in), _TOKEN, f"{len(stand_in)}s"))
    found = []
    for needle, skip, size, what, gap in wanted:
        at = rest.find(needle)
        if at < 0 or rest.find(needle, at + 1) >= 0:
            return None
        found.append((at + skip, size, what, gap))
    found.sort()
    pieces, fill, layout, cut = [], [], ">", 0
    for at, size, what, gap in found:  # (no two overlap: the fillers' bytes are not in the sentinels)
        pieces.append(rest[cut:at])
        fill.append(what)
        layout += f"{at - cut}s{gap}"
        cut = at + size
    pieces.append(rest[cut:])
    return pieces, tuple(fill), f"{layout}{len(rest) - cut}s"
