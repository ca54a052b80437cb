"""``dc-token PROFILE``, the call nearly every script makes, on the shortest path there is.

dc-token's launcher (client/scripts/dc-token) runs ``main`` here. For exactly ``dc-token PROFILE``
(no option; a name the wire accepts that is not one of dc-token's forms) it connects to the
broker, sends the one ``token`` request the full command line would send (the same bytes:
tests/test_quick.py) and reads the reply; when that is a plain success (one whole frame, the
request's id, ``ok``, a token string that has not expired: nothing to warn about) it prints the
token, with nothing imported but ``_socket``, ``dc_token.contract``, ``dc_token.paths`` and
``dc_token.minipack``, and no class built (a class costs a process about as much as a module; the
full path builds some thirty).

Everything else goes to ``dc_token.cli.main``, which decides and words it as it always does: any
other command line at once; a socket it could not connect to (the full path connects again and
says why); and any other reply (an error, a timeout, a closed connection, anything malformed)
*with* the connection and what was read from it (``Handover``), so the broker is never asked twice.
The decisions stay in one place; this module only does the I/O of the common case.
"""

import sys
import time

from dc_token.contract import HEADER_SIZE, MAX_FRAME, PROTOCOL_VERSION, profile_problem
from dc_token.paths import ANSWER_TIMEOUT as TIMEOUT
from dc_token.paths import default_socket_path

TYPE_CHECKING = False
if TYPE_CHECKING:
    import _socket
    from typing import Any

    #: the connection, the bytes read from it, and the exception that ended the reading (or None)
    Handover = tuple[_socket.socket, bytes, BaseException | None]

#: first words that make a command line one of dc-token's other forms (``dc_token.cli.FORMS``; it
#: cannot import this module: tests/test_quick.py holds the two equal)
FORMS = ("exec", "git-credential")


def main() -> int:
    argv = sys.argv[1:]
    handover = None
    if len(argv) == 1 and argv[0] not in FORMS and profile_problem(argv[0]) is None:
        done = ask_token(argv[0])
        if isinstance(done, int):
            return done
        handover = done
    from dc_token.cli import main as full

    return full(argv, handover=handover)


def request(profile: str) -> bytes:
    """The frame the full path sends for ``dc-token PROFILE`` (``token_args(profile, 0.0, None)``
    as request 1 on a new connection, coded by minipack)."""
    from dc_token.minipack import packb

    body = packb({"v": PROTOCOL_VERSION, "id": 1, "op": "token", "profile": profile, "min_ttl": 0.0})
    return len(body).to_bytes(HEADER_SIZE, "big") + body


def ask_token(profile: str) -> "int | Handover | None":
    """Print the profile's token and return 0 (1 if stdout is gone), or what the full path needs to
    carry on: the conversation (``Handover``), or None when no connection was made."""
    import _socket

    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(TIMEOUT)
        sock.connect(default_socket_path())
    except OSError:
        sock.close()
        return None
    received = b""
    try:
        sock.sendall(request(profile))
        while not _whole_frame(received):
            data = sock.recv(65536)
            if not data:
                break
            received += data
    except (OSError, KeyboardInterrupt) as exc:
        return sock, received, exc
    token = plain_token(received, time.time())
    if token is None:
        return sock, received, None
    sock.close()
    try:
        sys.stdout.write(token + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away, as in the full path
        return 1
    return 0


def _whole_frame(received: bytes) -> bool:
    """Whether ``received`` holds a whole frame, or a header the full path must refuse."""
    if len(received) < HEADER_SIZE:
        return False
    length = int.from_bytes(received[:HEADER_SIZE], "big")
    return length > MAX_FRAME or len(received) >= HEADER_SIZE + length


def plain_token(received: bytes, now: float) -> str | None:
    """The token in ``received`` if it is exactly one frame holding reply 1, a success with a token
    string that has not expired at ``now`` (so the full path would print it and nothing else);
    otherwise None."""
    if len(received) <= HEADER_SIZE:
        return None
    length = int.from_bytes(received[:HEADER_SIZE], "big")
    if length > MAX_FRAME or len(received) != HEADER_SIZE + length:
        return None
    from dc_token.minipack import unpackb

    try:
        reply: Any = unpackb(received[HEADER_SIZE:])
    except Exception:  # garbage: the full path says what is wrong with it
        return None
    if reply.__class__ is not dict or reply.get("ok") is not True:
        return None
    rid, result = reply.get("id"), reply.get("result")
    if rid.__class__ is not int or rid != 1 or result.__class__ is not dict:
        return None
    token, expires_at = result.get("token"), result.get("expires_at")
    if token.__class__ is not str or expires_at.__class__ not in (int, float) or not expires_at >= now:
        return None
    return token
