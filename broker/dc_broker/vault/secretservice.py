"""The vault's edge to the desktop keyring: the freedesktop Secret Service (GNOME Keyring, KeePassXC,
KWallet) on the session bus, through the optional ``secretstorage`` package.

Owns: storing, reading and deleting one item found by its attributes, over a fresh D-Bus connection
that is closed again before returning, and turning every failure (package missing, no bus, no Secret
Service, a locked collection, no such item) into a ``VaultError`` that says what to do.

``secretstorage`` is imported only when a keyring key source is used, so the daemon's base install
does not need it (``pip install 'dc-broker[keyring]'`` brings it, with ``jeepney``, pure Python).

Must never: show a prompt (the broker runs unattended: a locked collection is an error naming the fix,
not a dialog), keep a secret after returning it, put one in a message, or touch the vault file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

from dc_broker.errors import KeyUnavailable, VaultError

if TYPE_CHECKING:
    from jeepney.io.blocking import DBusConnection

INSTALL_HINT: Final = "pip install 'dc-broker[keyring]'"
_CONTENT_TYPE: Final = "application/octet-stream"
_NOT_REACHABLE: Final = (
    "no Secret Service answers on the session bus ({detail}); the keyring key source needs a desktop "
    "keyring (GNOME Keyring, KeePassXC, KWallet) running in this login session and "
    "$DBUS_SESSION_BUS_ADDRESS pointing at its bus; from ssh or a system service use "
    "`--key-source keyfile` or `systemd-credential` instead"
)
_LOCKED: Final = (
    "the desktop keyring is locked; unlock it (log in to the desktop session, or open it in "
    "Passwords and Keys / seahorse) and try again (a running broker: `dc-broker unlock`): dc-broker "
    "never shows a keyring prompt"
)


def require_package() -> None:
    """Nothing, or a VaultError naming the command that installs ``secretstorage``."""
    try:
        import secretstorage  # noqa: F401
    except ImportError:
        raise VaultError(
            f"the keyring key source needs the Python package secretstorage, which is not installed: "
            f"run `{INSTALL_HINT}` in dc-broker's environment"
        ) from None


def _failure(exc: BaseException) -> VaultError:
    """One VaultError for a ``secretstorage``/``jeepney``/socket failure: the most specific class wins
    (a table walked along the exception's MRO; the messages name the fix, never a secret). A locked
    or absent keyring is ``KeyUnavailable``: it may well open later."""
    import secretstorage
    from jeepney.wrappers import DBusErrorResponse

    detail = str(exc) or type(exc).__name__
    messages: dict[type[BaseException], tuple[type[VaultError], str]] = {
        secretstorage.LockedException: (KeyUnavailable, _LOCKED),
        secretstorage.PromptDismissedException: (KeyUnavailable, _LOCKED),
        secretstorage.SecretServiceNotAvailableException: (KeyUnavailable, _NOT_REACHABLE),
        secretstorage.ItemNotFoundException: (
            VaultError,
            "the desktop keyring's item went away while dc-broker used it ({detail}); try again",
        ),
        DBusErrorResponse: (VaultError, "the Secret Service refused the request ({detail})"),
        OSError: (KeyUnavailable, _NOT_REACHABLE),
    }
    for cls in type(exc).__mro__:
        if cls in messages:
            error, message = messages[cls]
            return error(message.format(detail=detail))
    return VaultError(f"the Secret Service failed ({type(exc).__name__}: {detail})")


@contextlib.contextmanager
def _connection() -> Iterator[DBusConnection]:
    """A fresh session-bus connection with a Secret Service behind it; failures become VaultError."""
    require_package()
    import secretstorage
    from jeepney.wrappers import DBusErrorResponse

    try:
        with contextlib.closing(secretstorage.dbus_init()) as conn:
            if not secretstorage.check_service_availability(conn):
                raise secretstorage.SecretServiceNotAvailableException("org.freedesktop.secrets is not on the bus")
            yield conn
    except (secretstorage.SecretStorageException, DBusErrorResponse, OSError) as exc:
        raise _failure(exc) from None


def store(attributes: dict[str, str], label: str, secret: bytes, *, unique: dict[str, str]) -> None:
    """A new item holding ``secret`` in the default collection. Refuses when an item matching
    ``unique`` exists already in any collection (never replaces a key)."""
    with _connection() as conn:
        import secretstorage

        if any(True for _ in secretstorage.search_items(conn, unique)):
            raise VaultError("the desktop keyring already holds this dc-broker key; refusing to replace it")
        try:
            collection = secretstorage.Collection(conn)  # the alias "default"; never created here (a prompt)
        except secretstorage.ItemNotFoundException:
            raise VaultError(
                "the desktop keyring has no default collection; make one (Passwords and Keys / seahorse: "
                "a new password keyring, then `Set as default`) and try again"
            ) from None
        collection.ensure_not_locked()
        collection.create_item(label, attributes, secret, replace=False, content_type=_CONTENT_TYPE)


def read(attributes: dict[str, str], what: str) -> bytes:
    """The secret of the one item matching ``attributes`` (in any collection). ``what`` names it in errors."""
    with _connection() as conn:
        import secretstorage

        items = list(secretstorage.search_items(conn, attributes))
        if not items:
            raise VaultError(
                f"the desktop keyring holds no {what} (deleted, or this is another user's or machine's "
                f"keyring?); without it the vault cannot be opened"
            )
        if len(items) > 1:
            raise VaultError(f"the desktop keyring holds {len(items)} items for the {what}; remove the copies")
        item = items[0]
        item.ensure_not_locked()
        return item.get_secret()


def delete(attributes: dict[str, str]) -> int:
    """Delete every item matching ``attributes``; returns how many there were."""
    with _connection() as conn:
        import secretstorage

        items = list(secretstorage.search_items(conn, attributes))
        for item in items:
            item.ensure_not_locked()
            item.delete()
        return len(items)
