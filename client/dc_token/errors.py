"""The one error tree of dc-broker: the part both sides see, drawn once.

Every failure a caller can see is one of these classes. Wire error codes (``dc_token.protocol.ErrorCode``)
map 1:1 onto the ``BrokerError`` subclasses, and each of those carries the ``dc-token`` exit code and a
one-line hint saying what to do. The broker raises these same classes (and its own subclasses, in
``dc_broker.errors``); the server turns them into error replies at a single place, and the client
turns error replies back into them at a single place (``dc_token.connection``).

    DcBrokerError                       root: catch this to catch everything we raise
    ├── ProtocolError                   the framing or message shape rules were broken
    │   ├── LocalProtocolError          ...by us (a bug in the caller of this library)
    │   └── RemoteProtocolError         ...by the peer (garbage, oversized frame, wrong shape)
    ├── BrokerUnavailable               client side only: no broker answers on the socket
    │   ├── BrokerDenied                ...as far as this user may know: the socket is not theirs to use
    │   └── BrokerTimeout               ...or something accepted but never answered
    ├── (broker side only, never on the wire: ConfigError, VaultError, UpstreamFault: dc_broker.errors)
    └── BrokerError                     an error reply; ``code`` is its wire code
        ├── BadRequest                  bad_request: a well-formed frame with wrong fields
        ├── UnsupportedVersion          unsupported_version
        ├── UnknownOp                   unknown_op
        ├── UnknownProfile              unknown_profile
        ├── Forbidden                   forbidden
        ├── Locked                      locked: the vault is locked
        ├── LoginRequired               login_required: no usable credential, a person must log in
        ├── CredentialsRejected         credentials_rejected: the IdP refuses the stored secret/config
        ├── UpstreamUnavailable         upstream_unavailable: IdP down/slow; has retry_after
        ├── UpstreamError               upstream_error: the IdP answered nonsense
        ├── Overloaded                  overloaded: a limit was hit; has retry_after
        ├── ConfigInvalid               config_error: the broker's config file does not load (reload)
        ├── VaultUnusable               vault_error: the broker cannot read or write its vault
        │                               (disk full, read-only file system, permissions)
        └── InternalError               internal: a bug in the broker

The classes above ``BadRequest`` (the root, the protocol errors, ``BrokerUnavailable``, ``BrokerError``)
are defined in ``dc_token.errorbase`` and are names of this module all the same: the modules dc-token
needs on its way to a token import them from there, so that getting a token does not create the
fourteen classes of the wire codes (a class costs a process about as much as a module).

This module is pure: no I/O, no imports beyond the standard library's cheapest.
"""

__all__ = [
    "EXIT_CANNOT_EXECUTE",
    "EXIT_CODES",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "NOTHING_ANSWERS",
    "BadRequest",
    "BrokerDenied",
    "BrokerError",
    "BrokerTimeout",
    "BrokerUnavailable",
    "ConfigInvalid",
    "CredentialsRejected",
    "DcBrokerError",
    "Forbidden",
    "InternalError",
    "LocalProtocolError",
    "Locked",
    "LoginRequired",
    "Overloaded",
    "ProtocolError",
    "RemoteProtocolError",
    "UnknownOp",
    "UnknownProfile",
    "UnsupportedVersion",
    "UpstreamError",
    "UpstreamUnavailable",
    "VaultUnusable",
    "error_for_code",
    "hint_for",
]


from dc_token.errorbase import (
    BrokerDenied,
    BrokerError,
    BrokerTimeout,
    BrokerUnavailable,
    DcBrokerError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
)


class BadRequest(BrokerError):
    code = "bad_request"
    exit_code = 12
    hint = "make sure dc-token and dc-broker are the same version"


class UnsupportedVersion(BrokerError):
    code = "unsupported_version"
    exit_code = 12
    hint = "upgrade dc-token and dc-broker together"


class UnknownOp(BrokerError):
    code = "unknown_op"
    exit_code = 12
    hint = "upgrade dc-token and dc-broker together"


class UnknownProfile(BrokerError):
    code = "unknown_profile"
    exit_code = 4
    hint = "see the profiles with `dc-broker status`, add one with `dc-broker add`"


class Forbidden(BrokerError):
    code = "forbidden"
    exit_code = 9
    hint = "ask the broker's administrator to allow your user or unit for this profile"


class Locked(BrokerError):
    code = "locked"
    exit_code = 6
    hint = "run `dc-broker unlock`"


class LoginRequired(BrokerError):
    code = "login_required"
    exit_code = 5
    hint = "run `dc-broker login PROFILE`"


class CredentialsRejected(BrokerError):
    code = "credentials_rejected"
    exit_code = 8
    hint = "fix what the identity provider refused (the message says which), see `dc-broker status PROFILE`"


class UpstreamUnavailable(BrokerError):
    code = "upstream_unavailable"
    exit_code = 7
    hint = "the identity provider could not be reached or did not answer in time; try again shortly"


#: how the broker's message for an IdP (or proxy) that refuses the connection begins its cause
#: (``dc_broker.idp.transport``): nothing listens at that address, so the message says what to check,
#: and "did not answer in time; try again shortly" (``UpstreamUnavailable.hint``) would mislead
NOTHING_ANSWERS = "nothing answers at "


class UpstreamError(BrokerError):
    code = "upstream_error"
    exit_code = 10
    hint = "the identity provider answered something unexpected; check `dc-broker status`"


class Overloaded(BrokerError):
    code = "overloaded"
    exit_code = 11
    hint = "the broker is at a limit; retry shortly"


class ConfigInvalid(BrokerError):
    """The broker's config file does not load (e.g. on ``reload``); the running profiles are kept."""

    code = "config_error"
    exit_code = 13
    hint = "fix the broker's config file (the message names the file, line and key), then reload"


class VaultUnusable(BrokerError):
    """The broker cannot read or write its vault: disk full, read-only file system, permissions."""

    code = "vault_error"
    exit_code = 13
    hint = "fix the vault's disk or file (free space, a writable mount, its owner) and retry"


class InternalError(BrokerError):
    code = "internal"
    exit_code = 1
    hint = "this is a bug in dc-broker; its log has the details"


_BY_CODE: "dict[str, type[BrokerError]]" = {
    cls.code: cls
    for cls in (
        BadRequest,
        UnsupportedVersion,
        UnknownOp,
        UnknownProfile,
        Forbidden,
        Locked,
        LoginRequired,
        CredentialsRejected,
        UpstreamUnavailable,
        UpstreamError,
        Overloaded,
        ConfigInvalid,
        VaultUnusable,
        InternalError,
    )
}


def hint_for(exc: "DcBrokerError", profile: str | None = None) -> str:
    """The hint to print after ``exc``'s message: ``PROFILE`` filled in, or no hint at all when the
    profile is not known, when the message already says what to do (a `command`, or what to check
    where nothing answers: ``NOTHING_ANSWERS``), or when the message already contains the hint's words."""
    hint = exc.hint
    message = str(exc)
    if not hint or "`" in message or hint in message or NOTHING_ANSWERS in message:
        return ""
    if "PROFILE" in hint:
        if not profile:
            return ""
        hint = hint.replace("PROFILE", profile)
    return hint


def error_for_code(code: str) -> "type[BrokerError]":
    """The exception class for a wire error code; unknown codes (a newer broker) become InternalError."""
    return _BY_CODE.get(code, InternalError)


#: the exit statuses that are not an error class's: a command dc-token exec could not run or
#: find (the shell's 126 / 127), and Ctrl-C (128 + SIGINT, as the shell reports it)
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127
EXIT_INTERRUPTED = 130

#: every exit status of dc-token (and dc-broker's commands), for --help and the README
EXIT_CODES: dict[int, str] = {
    0: "success: the token is on stdout",
    1: "internal error in dc-broker or dc-token",
    2: "usage error (bad arguments)",
    3: "broker not running (no one listens on the socket)",
    4: "unknown profile",
    5: "login required (run `dc-broker login PROFILE`)",
    6: "broker locked (run `dc-broker unlock`)",
    7: "identity provider unavailable (retry later)",
    8: "credentials rejected by the identity provider (fix the profile)",
    9: "forbidden: this caller may not use the profile",
    10: "identity provider answered something unexpected",
    11: "broker overloaded (retry later)",
    12: "protocol mismatch between dc-token and dc-broker",
    13: "the broker's config or vault cannot be used (disk full, read-only, a broken config file)",
    EXIT_CANNOT_EXECUTE: "dc-token exec: the command could not be executed",
    EXIT_NOT_FOUND: "dc-token exec: the command was not found",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}
