"""The broker's own errors: the ones that never cross the wire as themselves.

They join the one tree in ``dc_token.errors`` (the part both sides see) below its root, so the CLI's
error boundary and the server's treat them the same way as every other error:

    DcBrokerError (dc_token.errors)
    ├── ConfigError                     a config file, option or profile definition is wrong
    │   └── VaultError                  the vault file or its key source cannot be used
    │       ├── VaultBusy               another process holds the vault open (its ``.lock`` is taken)
    │       └── KeyUnavailable          the key source cannot give the key *now* (a locked or absent
    │                                   desktop keyring): the broker starts locked and waits for unlock
    ├── UpstreamFault                   the IdP said or did something (dc_broker.idp); sessions
    │   │                               translate it into a BrokerError below
    │   ├── OAuthError                  {"error", "error_description"} from the IdP
    │   ├── UpstreamTransient           5xx, 429, timeout, refused connection: retry later
    │   │   └── AnswerLost              a request that spends a single-use credential was sent, and
    │   │                               its answer never came: the IdP may have acted on it
    │   └── UpstreamGarbage             a reply that is not a token response (HTML, truncated JSON...)
    ├── Locked (dc_token.errors)
    │   └── WrongPassphrase             ...and stays locked: the passphrase did not open it
    ├── LoginRequired (dc_token.errors)
    │   └── RecordCorrupt               ...because this profile's vault record fails authentication
    │       └── RecordRolledBack        ...or is not the current one: an older copy was put back
    ├── CredentialsRejected (dc_token.errors)
    │   ├── MaybeLocked                 "Invalid user credentials": a wrong password or a brute-force lock
    │   └── ScopeWidened                the IdP grants more scope than a per-request scope asked for
    └── UpstreamError (dc_token.errors)
        └── IdpMisconfigured            the client's or realm's settings refuse: tokens kept, slow retry

``WrongPassphrase``, ``RecordCorrupt``, ``MaybeLocked``, ``ScopeWidened`` and ``IdpMisconfigured``
inherit their parent's wire code, so a client sees them as ``Locked`` / ``LoginRequired`` /
``CredentialsRejected`` / ``UpstreamError``. A ``ConfigError`` raised while serving a request crosses the wire as
``ConfigInvalid``, a ``VaultError`` as ``VaultUnusable``, anything else as ``InternalError``
(``wire_error``, called at the server's one place).

Must never: import anything but ``dc_token.errors``; carry a secret in a message (an IdP's text is
cut and redacted before it gets here: ``dc_broker.idp.oidc.clean_text``).
"""

from __future__ import annotations

from dc_token.errors import (
    BrokerError,
    ConfigInvalid,
    CredentialsRejected,
    DcBrokerError,
    InternalError,
    Locked,
    LoginRequired,
    UpstreamError,
    VaultUnusable,
)

__all__ = [
    "AnswerLost",
    "ConfigError",
    "IdpMisconfigured",
    "KeyUnavailable",
    "MaybeLocked",
    "OAuthError",
    "RecordCorrupt",
    "RecordRolledBack",
    "ScopeWidened",
    "UpstreamFault",
    "UpstreamGarbage",
    "UpstreamTransient",
    "VaultBusy",
    "VaultError",
    "WrongPassphrase",
    "wire_error",
]


class ConfigError(DcBrokerError):
    """A configuration file, option or profile definition is wrong (broker side)."""

    exit_code = 2


class VaultError(ConfigError):
    """The vault file or its key source cannot be used: missing, not a vault, too open, wrong key file."""


class VaultBusy(VaultError):
    """Another process (usually a running dc-broker) has the vault open for writing."""

    hint = "stop the other dc-broker, or send the change to it instead"


class KeyUnavailable(VaultError):
    """The vault's key source cannot give the key right now, though it may later: the desktop
    keyring is locked, or no Secret Service is on the session bus yet. ``dc-broker run`` starts with
    the vault locked instead of failing; ``dc-broker unlock`` reads the key again. Its messages say
    what to do, so no hint is added to them (neither here nor as ``VaultUnusable`` on the wire)."""


class UpstreamFault(DcBrokerError):
    """Something the identity provider said or did. Broker-internal: never crosses the wire."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class OAuthError(UpstreamFault):
    """The IdP answered with an OAuth error body: ``{"error", "error_description"}``."""

    #: an IdP's text is cut to this many characters: it goes into logs, status and error replies
    MAX_TEXT = 1024

    def __init__(self, error: str, description: str, status: int) -> None:
        error, description = _cut(error, 128), _cut(description, self.MAX_TEXT)
        super().__init__(f"{error}: {description}" if description else error)
        self.error = error
        self.description = description
        self.status = status


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class UpstreamTransient(UpstreamFault):
    """The IdP could not be reached or answered 5xx/429: try again later."""


class AnswerLost(UpstreamTransient):
    """A request that spends a single-use credential (``HttpRequest.spends``: a refresh token) went
    out and its answer was lost (a timeout or a reset after sending). The IdP may have acted on it
    and rotated the credential: the session presents it again only once the IdP answers at all."""


class UpstreamGarbage(UpstreamFault):
    """The IdP answered something that is not a token response."""


class WrongPassphrase(Locked):
    """The passphrase did not unwrap the vault's data key; the vault is unharmed and still locked.
    ``retry_after`` (when set) is how long the daemon makes the next attempt wait."""

    hint = "check the passphrase and run `dc-broker unlock` again"


class RecordCorrupt(LoginRequired):
    """A profile's vault record failed authentication (tampered, corrupt, swapped or from a newer
    format). Only that profile is affected; storing its secret again or logging in replaces it."""

    hint = "store the profile's secret again (`dc-broker add PROFILE`) or run `dc-broker login PROFILE`"


class RecordRolledBack(RecordCorrupt):
    """A profile's vault record is not the current one: it is from before the profile's last change
    (its generation is older than the vault's index says), or the index itself was put back from an
    older copy. Someone with write access to the vault file rolled it back."""


class MaybeLocked(CredentialsRejected):
    """The IdP refused the stored password with "Invalid user credentials": a wrong password, or a
    right one while Keycloak's brute-force detection locks the account (it says the same). A password
    the IdP accepted before is tried again a few times over the lock-out window."""


class ScopeWidened(CredentialsRejected):
    """The IdP grants more than a per-request scope asked for (it ignores scope on refresh, or adds
    scopes a request cannot remove): the broker never serves a wider token than asked."""


class IdpMisconfigured(UpstreamError):
    """The client's or the realm's settings at the IdP refuse the request ("HTTPS required", "Realm
    not enabled", DPoP, offline tokens, a grant switched off): every token is kept, the broker tries
    again only every few minutes, and the message says what to fix."""


def wire_error(exc: DcBrokerError) -> BrokerError:
    """The error reply for an error raised while serving: a BrokerError as is, a vault or config
    error as its wire class (same message), anything else of ours as InternalError."""
    if isinstance(exc, BrokerError):
        return exc
    if isinstance(exc, VaultError):
        return VaultUnusable(str(exc))
    if isinstance(exc, ConfigError):
        return ConfigInvalid(str(exc))
    return InternalError(f"{type(exc).__name__}: {exc}")


def causes(exc: BaseException, limit: int = 16) -> list[BaseException]:
    """``exc`` and the exceptions down its chain of causes, outermost first (at most ``limit``)."""
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and len(chain) < limit and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return chain


def telling(exc: BaseException, *, named: bool = True) -> str:
    """``ConnectError: [SSL: CERTIFICATE_VERIFY_FAILED] ...``: the exception's name (unless not
    ``named``) and the first non-empty message down its chain of causes (httpx wraps the telling one
    in exceptions without a message: a TLS failure is ``ConnectError('') <- BrokenResourceError() <-
    SSLCertVerificationError``)."""
    message = next((str(e) for e in causes(exc) if str(e)), "")
    if not named:
        return message or type(exc).__name__
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
