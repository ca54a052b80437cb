"""The vault's file-system edge: where it lives, private files and directories, the one-writer
``flock``, and SQLite connections with the vault's pragmas and schema.

Owns: paths, modes, ownership checks, locking and the table layout. Must never: see a key or a
plaintext (everything it stores arrives encrypted from ``dc_broker.vault.core``).
"""

from __future__ import annotations

import errno
import fcntl
import os
import sqlite3
import stat
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from dc_broker.errors import VaultBusy, VaultError

#: the file layout (tables); bumped only with a migration (``Vault._migrate``: 1 -> 2 adds the
#: records' generation and the index of generations, at the first unlock)
FORMAT: Final = 2
FORMATS: Final = frozenset({1, 2})
VAULT_ENV: Final = "DC_BROKER_VAULT"
VAULT_NAME: Final = "vault.db"

#: the index of generations (``dc_broker.vault.records``): one row, encrypted under the data key
_GENERATIONS: Final = """
CREATE TABLE generations (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    nonce BLOB NOT NULL,
    ciphertext BLOB NOT NULL
)"""
# records is a rowid table: a token record (1-2 KB) stays inline in its page, where a WITHOUT ROWID
# table would spill it to an overflow page (2x the file size at 10,000 profiles)
SCHEMA: Final = (
    """
CREATE TABLE meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    format INTEGER NOT NULL,
    vault_id BLOB NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE data_key (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    kind TEXT NOT NULL,
    reference TEXT,
    kdf TEXT,
    salt BLOB,
    nonce BLOB NOT NULL,
    wrapped BLOB NOT NULL
);
CREATE TABLE profiles (
    name TEXT PRIMARY KEY,
    created_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE records (
    profile TEXT NOT NULL REFERENCES profiles(name) ON DELETE CASCADE,
    field TEXT NOT NULL,
    version INTEGER NOT NULL,
    nonce BLOB NOT NULL,
    ciphertext BLOB NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (profile, field)
);"""
    + _GENERATIONS
)
#: what format 1 lacks (``Vault._migrate``)
MIGRATE_1_TO_2: Final = ("ALTER TABLE records ADD COLUMN generation INTEGER NOT NULL DEFAULT 0", _GENERATIONS)


def default_vault_path(environ: Mapping[str, str] | None = None) -> str:
    """``$DC_BROKER_VAULT``; else ``$XDG_DATA_HOME/dc-broker/vault.db``; else ``~/.local/share/...``."""
    env = os.environ if environ is None else environ
    explicit = env.get(VAULT_ENV)
    if explicit:
        return explicit
    data_home = env.get("XDG_DATA_HOME", "")
    if not os.path.isabs(data_home):  # the XDG spec: relative values are invalid and ignored
        data_home = os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(data_home, "dc-broker", VAULT_NAME)


def check_private_dir(directory: str, *, create: bool, what: str = "the vault directory") -> None:
    """``directory`` exists (``create``: is made, 0700), is ours and is private; else a VaultError
    that names it (as ``what``) and says what to fix."""
    if create and not os.path.isdir(directory):
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            os.chmod(directory, 0o700)  # makedirs' mode is filtered by the umask
        except OSError as exc:
            raise file_error(directory, exc, what) from None
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        raise VaultError(f"{what} {directory} does not exist") from None
    if st.st_uid != os.geteuid():
        raise VaultError(f"{what} {directory} belongs to uid {st.st_uid}, not to us")
    if st.st_mode & 0o077:
        raise VaultError(
            f"{what} {directory} has mode {stat.S_IMODE(st.st_mode):04o}; "
            f"it must be private (fix: chmod 700 {directory})"
        )


def check_private_file(path: str) -> None:
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise VaultError(f"the vault {path} is not a regular file")
    if st.st_uid != os.geteuid():
        raise VaultError(f"the vault {path} belongs to uid {st.st_uid}, not to us")
    if st.st_mode & 0o077:
        raise VaultError(
            f"the vault {path} has mode {stat.S_IMODE(st.st_mode):04o}; it must be private (fix: chmod 600 {path})"
        )


def file_error(path: str, exc: OSError, what: str = "the vault") -> VaultError:
    """An OSError on the vault's files as a VaultError that names the file and the cause."""
    code = exc.errno
    if code == errno.EROFS:
        why = "is on a read-only file system; remount it read-write or move the vault (DC_BROKER_VAULT)"
    elif code in (errno.ENOSPC, errno.EDQUOT):
        why = "cannot be written: the disk (or quota) is full; free some space and retry"
    elif code in (errno.EACCES, errno.EPERM):
        why = f"cannot be opened by uid {os.geteuid()}: permission denied; check its owner and mode"
    elif code == errno.ELOOP:
        why = "is a symbolic link; the vault's files must be its own"
    else:
        why = f"cannot be used: {exc.strerror or exc}"
    return VaultError(f"{what} {path} {why}")


def take_lock(path: str) -> int:
    lock_path = path + ".lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise file_error(lock_path, exc, "the vault's lock file") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise VaultBusy(
                f"the vault {path} is already open elsewhere (is a dc-broker daemon running?); {lock_path} is locked"
            ) from None
        raise
    return fd


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def connect(path: str, *, new: bool = False) -> sqlite3.Connection:
    """A connection with the vault's pragmas. Unless ``new``, the file must already look like a vault:
    a foreign SQLite file is refused before anything (such as its journal mode) is changed."""
    uri = Path(path).as_uri() + "?mode=rw"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=10.0)
    try:
        if (
            not new
            and not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchall()
        ):
            raise VaultError(f"{path} is not a dc-broker vault")
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()
        if mode is None or str(mode[0]).lower() != "wal":
            raise VaultError(f"the vault {path}: SQLite refused WAL mode")
        for pragma in ("synchronous=FULL", "foreign_keys=ON", "secure_delete=ON", "trusted_schema=OFF"):
            conn.execute(f"PRAGMA {pragma}")
    except BaseException:
        conn.close()
        raise
    return conn


@contextmanager
def sqlite_errors(path: str) -> Iterator[None]:
    """SQLite's own failures (not a database, malformed, disk full) as one VaultError naming the file."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        text = str(exc)
        if "disk is full" in text or ("disk I/O error" in text and _disk_full(path)):
            raise file_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) from None
        if "readonly" in text or "read-only" in text:
            raise file_error(path, OSError(_why_read_only(path), "read-only")) from None
        raise VaultError(f"the vault {path} cannot be used: {exc}") from None
    except OSError as exc:
        raise file_error(path, exc) from None


def _disk_full(path: str) -> bool:
    try:
        st = os.statvfs(os.path.dirname(path) or ".")
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 64 * 1024


def _why_read_only(path: str) -> int:
    """EROFS when the vault's file system is mounted read-only, else EACCES (a file we may not write)."""
    try:
        return errno.EROFS if os.statvfs(os.path.dirname(path) or ".").f_flag & os.ST_RDONLY else errno.EACCES
    except OSError:
        return errno.EACCES
