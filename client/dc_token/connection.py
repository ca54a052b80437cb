"""The client's side of one broker connection, sans I/O: h11's ``Connection`` is the model.

Owns everything a client must get right about the conversation, and nothing about moving bytes:

* request ids (allocated here, never reused on a connection) and the frames to send;
* the frame decoder, and matching each reply to the request it answers (late replies to requests the
  caller gave up on are dropped, a reply to an id never sent is the peer's fault);
* error replies -> the ``dc_token.errors`` class of their wire code, raised by ``next_event``'s
  caller from a ``Failed`` event; an id-less error reply (the broker could not read our frame)
  fails every pending request and closes the connection;
* streams (``watch``, ``login``): ``Result.more`` on every item but the last, and the
  ``{"end": true}`` closing reply a stream may send, which is an ``End``, not an item;
* the retry rule: a request that found the connection gone may be sent once more on a new one if
  the connection had already served before (the broker restarted since), never twice.

The drivers (``dc_token.sync``, ``dc_token.aio``, ``dc_broker``'s CLI) call ``send_request`` and
write its bytes, feed what they read to ``receive_data`` (``b""`` at EOF), and take events from
``next_event`` until it says ``NEED_DATA``. Nothing here blocks, reads a clock or touches a socket.

Invariants
    * A request id is pending from ``send_request`` until its last ``Result`` (``more`` false), its
      ``Failed``, ``forget(id)``, or the connection closing.
    * After ``Closed`` or a ``RemoteProtocolError`` the connection is dead: make a new one.
"""

from dc_token.errorbase import BrokerError, RemoteProtocolError
from dc_token.protocol import NEED_DATA, ErrorReply, FrameDecoder, Request, encode, reply_from_wire

# dc-token imports this module on every run: typing, collections.abc and even __future__ cost it
# start-up time, so the annotations that name them are strings (no `from __future__ import annotations`)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

    from dc_token.protocol import Codec, NeedData

__all__ = ["NEED_DATA", "ClientConnection", "Closed", "End", "Failed", "Result", "may_retry"]


class Result:
    """A successful reply (or one item of a stream, ``more`` true on all but the last)."""

    __slots__ = ("id", "more", "result")

    def __init__(self, id: int, result: "dict[str, Any]", more: bool) -> None:
        self.id, self.result, self.more = id, result, more

    def __repr__(self) -> str:
        return f"Result(id={self.id}, keys={sorted(self.result)}, more={self.more})"


class Failed:
    """An error reply to request ``id``: ``error`` is its ``BrokerError``, ready to raise."""

    __slots__ = ("error", "id")

    def __init__(self, id: int, error: "BrokerError") -> None:
        self.id, self.error = id, error

    def __repr__(self) -> str:
        return f"Failed(id={self.id}, error={type(self.error).__name__})"


class End:
    """A stream's closing marker (``{"end": true}``, ``more`` false): the stream is over, no item."""

    __slots__ = ("id",)

    def __init__(self, id: int) -> None:
        self.id = id

    def __repr__(self) -> str:
        return f"End(id={self.id})"


class Closed:
    """The broker closed the connection at a frame boundary. ``pending``: ids it never answered."""

    __slots__ = ("pending",)

    def __init__(self, pending: tuple[int, ...]) -> None:
        self.pending = pending

    def __repr__(self) -> str:
        return f"Closed(pending={self.pending})"


def _error(reply: "ErrorReply") -> "BrokerError":
    from dc_token.errors import error_for_code  # the classes of the codes: made when one is needed

    return error_for_code(reply.code.value)(reply.message, retry_after=reply.retry_after)


class ClientConnection:
    """One connection's conversation state. Not thread-safe: a driver serializes its use. ``codec``:
    how frames are coded (``dc_token.protocol``'s ``Codec``; default msgpack's C extension)."""

    __slots__ = ("_closed", "_codec", "_decoder", "_failed_all", "_next_id", "_pending", "served")

    def __init__(self, codec: "Codec | None" = None) -> None:
        self._codec = codec
        self._decoder = FrameDecoder(codec=codec)
        self._next_id = 1
        self._pending: dict[int, str] = {}  # id -> op, for messages
        self._failed_all: list[Failed] = []
        self._closed = False
        #: whether any reply has arrived on this connection (the retry rule needs it)
        self.served = False

    @property
    def pending(self) -> tuple[int, ...]:
        return tuple(self._pending)

    @property
    def closed(self) -> bool:
        return self._closed

    def send_request(self, op: str, args: "Mapping[str, Any] | None" = None) -> tuple[int, bytes]:
        """Allocate an id for a request; returns it and the bytes to write."""
        if self._closed:
            raise RemoteProtocolError("the connection is closed; open a new one")
        rid = self._next_id
        frame = encode(Request(rid, op, {k: v for k, v in (args or {}).items() if v is not None}), self._codec)
        self._next_id += 1
        self._pending[rid] = op
        return rid, frame

    def forget(self, rid: int) -> None:
        """The caller gave up on ``rid`` (a timeout, a closed stream): later replies are dropped."""
        self._pending.pop(rid, None)

    def receive_data(self, data: bytes) -> None:
        """Bytes read from the socket; ``b""`` when the peer closed."""
        if data:
            self._decoder.receive_data(data)
        else:
            self._decoder.check_eof()  # mid-frame EOF: RemoteProtocolError
            self._closed = True

    def next_event(self) -> "Result | Failed | End | Closed | NeedData":
        """The next thing that happened, or ``NEED_DATA`` (read more and ``receive_data`` it)."""
        if self._failed_all:
            return self._failed_all.pop(0)
        while True:
            frame = self._decoder.next_frame()
            if frame is NEED_DATA:
                if self._closed:
                    pending, self._pending = tuple(self._pending), {}
                    return Closed(pending)
                return NEED_DATA
            assert isinstance(frame, dict)
            reply = reply_from_wire(frame)
            self.served = True
            if reply.id is None:  # the broker could not read a frame of ours: nothing on it is safe
                assert isinstance(reply, ErrorReply)
                self._failed_all = [Failed(rid, _error(reply)) for rid in self._pending]
                self._pending.clear()
                self._closed = True
                if self._failed_all:
                    return self._failed_all.pop(0)
                raise _error(reply)
            if reply.id not in self._pending:
                if reply.id >= self._next_id:
                    raise RemoteProtocolError(f"the broker answered request {reply.id}, which was never sent")
                continue  # a late reply to a request we gave up on
            if isinstance(reply, ErrorReply):
                del self._pending[reply.id]
                return Failed(reply.id, _error(reply))
            if not reply.more:
                del self._pending[reply.id]
                if reply.result.get("end") is True:
                    return End(reply.id)
            return Result(reply.id, dict(reply.result), more=reply.more)


def may_retry(conn: "ClientConnection") -> bool:
    """A request that met a dead connection may be sent once more, on a new connection, only when
    this one had served before (the broker restarted since); a fresh connection that dies is the
    broker's answer."""
    return conn.served
