"""The wire contract's numbers and argument checks: what ``dc_token.protocol`` states about versions,
frames, profile names, scopes and ``min_ttl``, in a module that builds no class (a class costs a
process about as much as a small module), so that dc-token's path to a token (``dc_token.quick``)
can apply the same checks without importing the protocol's message classes.

``dc_token.protocol`` re-exports every name here; import them from there, unless start-up time is
the point. Pure: no imports at all.
"""

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

__all__ = [
    "HEADER_SIZE",
    "MAX_FRAME",
    "MAX_ID",
    "MAX_MIN_TTL",
    "MAX_PROFILE_NAME",
    "MAX_SCOPE",
    "NUMBER",
    "PROTOCOL_VERSION",
    "min_ttl_problem",
    "profile_problem",
    "scope_problem",
]

PROTOCOL_VERSION: "Final" = 1
#: a frame's body is at most this long (the 4-byte big-endian length header before it, ``HEADER_SIZE``)
MAX_FRAME: "Final" = 64 * 1024
HEADER_SIZE: "Final" = 4
#: a request id is an int in 0..MAX_ID (msgpack's signed 64-bit range)
MAX_ID: "Final" = 2**63 - 1

#: the types a number on the wire may have (never a bool, though bool is an int)
NUMBER: "Final" = (int, float)

#: the largest ``min_ttl`` (seconds) a ``token`` / ``watch`` request may ask for
MAX_MIN_TTL: "Final" = 86400.0


def min_ttl_problem(value: object) -> str | None:
    """The one check of a ``min_ttl`` (broker and dc-token both use it): what is wrong, or None.

    A valid min_ttl larger than the broker can honour is not an error: the broker caps it at half
    the token lifetime the IdP grants, and the ``token`` reply then carries ``min_ttl_shortfall``
    (seconds the token falls short of the request), so the shortfall is never silent."""
    if (
        isinstance(value, bool)
        or not isinstance(value, NUMBER)
        or value != value  # NaN
        or not 0 <= value <= MAX_MIN_TTL
    ):
        return f"must be a number of seconds between 0 and {MAX_MIN_TTL:g}"
    return None


#: a profile name on the wire: a letter or digit, then letters, digits, '.', '_' or '-' (config.toml
#: allows 64; the wire leaves room and refuses anything longer than this outright)
MAX_PROFILE_NAME: "Final" = 128
_NAME_FIRST: "Final" = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_NAME_CHARS: "Final" = _NAME_FIRST | frozenset("._-")
#: RFC 6749 3.3 scope-token characters: %x21 / %x23-5B / %x5D-7E (tokens separated by one space)
_SCOPE_CHARS: "Final" = frozenset(chr(c) for c in (0x21, *range(0x23, 0x5C), *range(0x5D, 0x7F)))
MAX_SCOPE: "Final" = 1024


def profile_problem(value: object) -> str | None:
    """What is wrong with a ``profile`` argument, or None."""
    if not isinstance(value, str) or not value:
        return "must be a non-empty string"
    if len(value) > MAX_PROFILE_NAME or value[0] not in _NAME_FIRST or not _NAME_CHARS.issuperset(value):
        shown = value[:32] + "..." if len(value) > 32 else value
        return f"{shown!r} is not a profile name (letters, digits, '.', '_' or '-'; at most {MAX_PROFILE_NAME})"
    return None


def scope_problem(value: object) -> str | None:
    """What is wrong with a ``scope`` argument (space-separated RFC 6749 scope tokens), or None."""
    if not isinstance(value, str) or len(value) > MAX_SCOPE:
        return "must be space-separated OAuth scope tokens"
    if any(not word or not _SCOPE_CHARS.issuperset(word) for word in value.split(" ")):
        return "must be space-separated OAuth scope tokens"
    return None
