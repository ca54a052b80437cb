"""The root of the error tree of ``dc_token.errors`` (drawn there): the classes every module of
dc-token raises or catches on its way to a token. ``dc_token.errors`` re-exports them and adds one
class per wire error code; import them from there, unless you are one of those modules.

Their ``__module__`` is ``dc_token.errors``, the name they are known by (reprs, tracebacks, pickles).

Pure: no imports at all.
"""

__all__ = [
    "BrokerError",
    "BrokerTimeout",
    "BrokerUnavailable",
    "DcBrokerError",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
]


class DcBrokerError(Exception):
    """Root of everything dc-broker raises on purpose."""

    __module__ = "dc_token.errors"

    #: dc-token's exit status when this error ends it
    exit_code: int = 1
    #: what the person should do about it, one short sentence
    hint: str = ""


class ProtocolError(DcBrokerError):
    """The wire rules were broken; the connection cannot be trusted any more."""

    __module__ = "dc_token.errors"

    exit_code = 12
    hint = "make sure dc-token and dc-broker are the same version"


class LocalProtocolError(ProtocolError):
    """We were about to send something the protocol does not allow."""

    __module__ = "dc_token.errors"


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""

    __module__ = "dc_token.errors"


class BrokerUnavailable(DcBrokerError):
    """No broker is listening on the socket (client side)."""

    __module__ = "dc_token.errors"

    exit_code = 3
    hint = "start it with `systemctl --user start dc-broker` or `dc-broker run`"


class BrokerDenied(BrokerUnavailable):
    """The broker's socket is there, but the kernel refuses this user to connect (a shared broker
    whose group the caller is not in): the permission exit status, as ``Forbidden``."""

    __module__ = "dc_token.errors"

    exit_code = 9
    hint = "ask the broker's administrator to let your user use the broker"


class BrokerTimeout(BrokerUnavailable):
    """Something accepted the connection but no answer came in time (client side): a broker stuck,
    or a socket unit whose service cannot start."""

    __module__ = "dc_token.errors"


class BrokerError(DcBrokerError):
    """An error reply from the broker. ``code`` is the wire code; subclasses are one per code."""

    __module__ = "dc_token.errors"

    code: str = "internal"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, retry_after={self.retry_after!r})"
