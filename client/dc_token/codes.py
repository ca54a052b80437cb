"""``ErrorCode``: the closed set of wire error codes (``dc_token.protocol`` exports it).

An enum, and ``enum`` costs a process more to import than all of dc-token's own modules: so it lives
here and is imported the first time an error code is needed (an error reply, the broker), never on
dc-token's path to a token.
"""

from enum import StrEnum

__all__ = ["ErrorCode"]


class ErrorCode(StrEnum):
    """The closed set of wire error codes. Each maps 1:1 to a ``dc_token.errors.BrokerError`` subclass."""

    BAD_REQUEST = "bad_request"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_OP = "unknown_op"
    UNKNOWN_PROFILE = "unknown_profile"
    FORBIDDEN = "forbidden"
    LOCKED = "locked"
    LOGIN_REQUIRED = "login_required"
    CREDENTIALS_REJECTED = "credentials_rejected"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    UPSTREAM_ERROR = "upstream_error"
    OVERLOADED = "overloaded"
    CONFIG_ERROR = "config_error"
    VAULT_ERROR = "vault_error"
    INTERNAL = "internal"
