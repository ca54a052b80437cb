"""``Vault``: the open vault file, its lock/unlock state, the ``SecretStore`` methods and the
management API. See the package docstring for the format and the rules.

Owns: the data key (only while unlocked, only inside an ``AESGCM`` object), wrapping and unwrapping
it, encrypting and decrypting records, and the two SQLite connections (one writer under a lock, one
reader). Must never: cache plaintext, log or raise with a secret in the message, or write outside a
transaction.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Final

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dc_broker.errors import RecordCorrupt, VaultError, WrongPassphrase
from dc_broker.secret import Secret
from dc_broker.tokens import Credentials, TokenSet
from dc_broker.vault import files, records
from dc_broker.vault.files import FORMAT, FORMATS
from dc_broker.vault.keysource import (
    KEY_BYTES,
    PRODUCTION_KDF,
    SALT_BYTES,
    KdfParams,
    KeySource,
    KeySourceKind,
    Passphrase,
    derive_kek,
    key_source_of,
)
from dc_broker.vault.records import CREDENTIAL_FIELDS, NONCE_BYTES, RECORD_VERSION, RECORD_VERSIONS, TOKENS_FIELD
from dc_token.errors import BrokerError, Locked

_LOCKED_MESSAGE: Final = "the vault is locked; run `dc-broker unlock`"
_RECORDS: Final = "SELECT field, version, generation, nonce, ciphertext FROM records WHERE profile = ? AND field "
_TOKEN_RECORD: Final = _RECORDS + "= ?"
_CREDENTIAL_RECORDS: Final = _RECORDS + "!= ?"


class Vault:
    """An open vault file. Build with ``Vault.create`` or ``Vault.open``; ``close`` (or ``with``) ends it."""

    def __init__(self, path: str, lock_fd: int, writer: sqlite3.Connection, reader: sqlite3.Connection) -> None:
        """Private: use ``create`` or ``open``."""
        self.path = path
        #: wrong passphrases in a row (reset by a successful unlock); the daemon turns it into a delay
        self.failed_unlocks = 0
        self._lock_fd: int | None = lock_fd
        self._writer = writer
        self._reader = reader
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._aead: AESGCM | None = None
        #: the index of generations last read: its nonce and the generations it holds
        self._index: tuple[bytes, dict[str, int]] | None = None
        with files.sqlite_errors(path):
            meta = reader.execute("SELECT format, vault_id FROM meta WHERE id = 1").fetchone()
            if meta is None:
                raise VaultError(f"{path} is not a dc-broker vault (no meta row)")
            if meta[0] not in FORMATS:
                raise VaultError(f"the vault {path} has format {meta[0]}; this dc-broker reads format {FORMAT}")
            #: 1 until the first unlock migrates it (``_migrate``)
            self._format: int = meta[0]
            self._vault_id: bytes = meta[1]
            self._load_key_row()

    def _load_key_row(self) -> None:
        with self._read_lock:
            row = self._reader.execute("SELECT kind, reference, kdf, salt, nonce, wrapped FROM data_key").fetchall()
        if len(row) != 1:
            raise VaultError(f"the vault {self.path} has no data key row; it cannot be opened")
        kind, reference, kdf, salt, nonce, wrapped = row[0]
        self._key_source: KeySource = key_source_of(kind, reference)
        self._kdf = KdfParams.from_json(kdf) if kind == KeySourceKind.PASSPHRASE else None
        self._salt: bytes | None = salt
        self._wrapped: tuple[bytes, bytes] = (nonce, wrapped)

    # ------------------------------------------------------------ life cycle

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        key_source: KeySource,
        *,
        passphrase: Secret | None = None,
        kdf_params: KdfParams = PRODUCTION_KDF,
    ) -> Vault:
        """A new, empty vault at ``path``, open and unlocked. Refuses to overwrite anything. The parent
        directory is created 0700 if missing and must be private if it exists."""
        path = os.path.abspath(os.fspath(path))
        directory = os.path.dirname(path)
        files.check_private_dir(directory, create=True)
        if key_source.needs_passphrase:
            if passphrase is None or not passphrase:
                raise VaultError("a passphrase vault needs a non-empty passphrase")
        elif passphrase is not None:
            raise VaultError(f"a {key_source.kind} vault takes no passphrase")
        lock_fd = files.take_lock(path)
        created = False
        try:
            for existing in (path, path + "-wal"):
                if os.path.lexists(existing):
                    raise VaultError(f"{existing} already exists; refusing to overwrite a vault")
            kek, salt, kdf = cls._new_kek(key_source, passphrase, kdf_params)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            created = True
            os.fchmod(fd, 0o600)  # SQLite gives -wal and -shm the database file's mode
            os.close(fd)
            data_key = AESGCM.generate_key(bit_length=256)
            vault_id = os.urandom(16)
            nonce = os.urandom(NONCE_BYTES)
            wrapped = AESGCM(kek).encrypt(nonce, data_key, records.wrap_aad(vault_id, key_source.kind))
            index_nonce = os.urandom(NONCE_BYTES)
            index = AESGCM(data_key).encrypt(index_nonce, _index_plaintext({}), records.index_aad(vault_id))
            with files.sqlite_errors(path):
                conn = files.connect(path, new=True)
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    for statement in files.SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute("INSERT INTO meta VALUES (1, ?, ?, ?)", (FORMAT, vault_id, time.time()))
                    conn.execute(
                        "INSERT INTO data_key VALUES (1, ?, ?, ?, ?, ?, ?)",
                        (key_source.kind.value, key_source.reference, kdf, salt, nonce, wrapped),
                    )
                    conn.execute("INSERT INTO generations VALUES (1, ?, ?)", (index_nonce, index))
                    conn.execute("COMMIT")
                finally:
                    conn.close()
            files.fsync_dir(directory)
            vault = cls._connected(path, lock_fd)
        except BaseException:
            if created:  # a half-made vault holds nothing yet: leave no file that blocks a retry
                for leftover in (path, path + "-wal", path + "-shm"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(leftover)
            os.close(lock_fd)
            raise
        vault._aead = AESGCM(data_key)
        return vault

    @classmethod
    def _connected(cls, path: str, lock_fd: int) -> Vault:
        """The Vault over fresh writer and reader connections (closed again if it cannot be built)."""
        conns: list[sqlite3.Connection] = []
        try:
            with files.sqlite_errors(path):
                conns.append(files.connect(path))
                conns.append(files.connect(path))
                return cls(path, lock_fd, conns[0], conns[1])
        except BaseException:
            for conn in conns:
                conn.close()
            raise

    @staticmethod
    def _new_kek(
        source: KeySource, passphrase: Secret | None, kdf_params: KdfParams
    ) -> tuple[bytes, bytes | None, str | None]:
        """(KEK, salt, kdf JSON) for a fresh wrapping of the data key."""
        if isinstance(source, Passphrase):
            assert passphrase is not None
            salt = os.urandom(SALT_BYTES)
            return derive_kek(passphrase, salt, kdf_params), salt, kdf_params.to_json()
        return source.read_key(), None, None

    @classmethod
    def open(cls, path: str | os.PathLike[str] | None = None, *, auto_unlock: bool = False) -> Vault:
        """Open an existing vault (default: ``default_vault_path()``), locked. With ``auto_unlock`` a
        key-file, systemd-credential or keyring vault is unlocked at once (a passphrase vault stays locked)."""
        path = os.path.abspath(os.fspath(path if path is not None else files.default_vault_path()))
        files.check_private_dir(os.path.dirname(path), create=False)
        lock_fd = files.take_lock(path)
        try:
            if not os.path.exists(path):
                raise VaultError(f"there is no vault at {path}; create one with `dc-broker init`")
            files.check_private_file(path)
            vault = cls._connected(path, lock_fd)
        except BaseException:
            os.close(lock_fd)
            raise
        if auto_unlock and not vault.key_source.needs_passphrase:
            try:
                vault.unlock()
            except BaseException:
                vault.close()
                raise
        return vault

    def close(self) -> None:
        """Lock, close the database (checkpointing the WAL) and release the one-writer lock. Idempotent."""
        self.lock()
        if self._lock_fd is None:
            return
        with self._write_lock, self._read_lock:
            self._reader.close()
            self._writer.close()
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Vault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._lock_fd is None else "locked" if self.locked else "unlocked"
        return f"Vault({self.path!r}, key_source={self._key_source.kind.value}, {state})"

    # ------------------------------------------------------------ lock / unlock

    @property
    def key_source(self) -> KeySource:
        return self._key_source

    @property
    def lockable(self) -> bool:
        return True

    @property
    def locked(self) -> bool:
        return self._aead is None

    def lock(self) -> None:
        """Drop the data key. Nothing decrypted is kept, so nothing else needs dropping."""
        self._aead = None

    def unlock(self, passphrase: Secret | None = None) -> None:
        """Unwrap the data key with the key source's KEK. A wrong passphrase raises ``WrongPassphrase``,
        counts in ``failed_unlocks`` and changes nothing else (an unlocked vault stays unlocked).
        A vault of an older format is migrated here, the first time the data key is at hand."""
        self._require_open()
        aead = AESGCM(self._unwrap(passphrase))
        if self._format < FORMAT:
            self._migrate(aead)
        self._aead = aead
        self.failed_unlocks = 0

    def _migrate(self, aead: AESGCM) -> None:
        """Format 1 -> 2, in one transaction: every record gets generation 0 (its version-1 associated
        data stays valid for it) and the index says so for every profile."""
        with self._transaction() as conn:
            (found,) = conn.execute("SELECT format FROM meta WHERE id = 1").fetchone()
            if found == 1:
                if conn.execute("SELECT COUNT(*) FROM records WHERE version != 1").fetchone()[0]:
                    raise VaultError(
                        f"the vault {self.path} has format 1 but holds records of a newer format: it was pieced "
                        "together from two copies; restore it from a backup"
                    )
                for statement in files.MIGRATE_1_TO_2:
                    conn.execute(statement)
                names = conn.execute("SELECT name FROM profiles UNION SELECT profile FROM records").fetchall()
                self._write_index(conn, aead, {name: 0 for (name,) in names})
                conn.execute("UPDATE meta SET format = ? WHERE id = 1", (FORMAT,))
        self._format = FORMAT

    def _unwrap(self, passphrase: Secret | None) -> bytes:
        source = self._key_source
        if isinstance(source, Passphrase):
            if passphrase is None:
                raise Locked("this vault is unlocked with a passphrase, and none was given")
            assert self._kdf is not None and self._salt is not None
            kek = derive_kek(passphrase, self._salt, self._kdf)
        elif passphrase is not None:
            raise VaultError(f"this vault is unlocked by its {source.kind}, not by a passphrase")
        else:
            kek = source.read_key()
        nonce, wrapped = self._wrapped
        try:
            data_key = AESGCM(kek).decrypt(nonce, wrapped, records.wrap_aad(self._vault_id, source.kind))
        except InvalidTag:
            if source.needs_passphrase:
                self.failed_unlocks += 1
                raise WrongPassphrase(
                    "wrong passphrase; the vault stays locked", retry_after=records.unlock_delay(self.failed_unlocks)
                ) from None
            raise VaultError(
                f"the {source.kind} {source.reference} does not open the vault {self.path} (a different key?)"
            ) from None
        if len(data_key) != KEY_BYTES:
            raise VaultError(f"the vault {self.path} holds a malformed data key")
        return data_key

    def change_passphrase(self, old: Secret, new: Secret, *, kdf_params: KdfParams | None = None) -> None:
        """Rewrap the data key under ``new`` (fresh salt; the stored Argon2id cost unless ``kdf_params``).
        One row changes; records are untouched; locked or unlocked stays as it was."""
        if not isinstance(self._key_source, Passphrase):
            raise VaultError(f"this vault is protected by a {self._key_source.kind}, not a passphrase")
        if not new:
            raise VaultError("the new passphrase is empty")
        data_key = self._unwrap(old)
        self.failed_unlocks = 0
        assert self._kdf is not None
        params = kdf_params or self._kdf
        salt = os.urandom(SALT_BYTES)
        kek = derive_kek(new, salt, params)
        nonce = os.urandom(NONCE_BYTES)
        wrapped = AESGCM(kek).encrypt(nonce, data_key, records.wrap_aad(self._vault_id, self._key_source.kind))
        with self._transaction() as conn:
            conn.execute(
                "UPDATE data_key SET kdf = ?, salt = ?, nonce = ?, wrapped = ? WHERE id = 1",
                (params.to_json(), salt, nonce, wrapped),
            )
        self._load_key_row()

    # ------------------------------------------------------------ SecretStore

    def credentials(self, profile: str) -> Credentials:
        """The profile's long-lived secrets; absent fields (and unknown profiles) are None."""
        aead = self._require_unlocked()
        current, rows = self._read_records(aead, profile, tokens=False)
        found: dict[str, Secret] = {}
        for field, version, generation, nonce, ciphertext in rows:
            if field not in CREDENTIAL_FIELDS:
                raise records.corrupt(profile, field, "has an unknown field name (from a newer dc-broker?)")
            plaintext = self._open(aead, profile, field, (version, generation, nonce, ciphertext), current)
            value = records.document(profile, field, plaintext).get("v")
            if not isinstance(value, str):
                raise records.corrupt(profile, field, "does not hold a secret")
            found[field] = Secret(value)
        return Credentials(**found)

    def saved_tokens(self, profile: str) -> TokenSet | None:
        """The last tokens saved for the profile (wall-clock times), or None."""
        aead = self._require_unlocked()
        current, rows = self._read_records(aead, profile, tokens=True)
        if not rows:
            return None
        field, *record = rows[0]
        doc = records.document(profile, field, self._open(aead, profile, field, tuple(record), current))
        try:
            return records.tokens_of(doc)
        except (KeyError, TypeError, ValueError):
            raise records.corrupt(profile, field, "does not hold a token set") from None

    def saved_tokens_all(self) -> dict[str, TokenSet | BrokerError]:
        """Every profile's saved tokens in one query (unlock restores them all at once); a record that
        fails authentication is that profile's ``RecordCorrupt``, the others are unharmed."""
        aead = self._require_unlocked()
        self._require_open()
        with self._read_lock, files.sqlite_errors(self.path):
            conn = self._reader
            conn.execute("BEGIN")
            try:
                generations = self._generations(conn, aead)
                rows = conn.execute(
                    "SELECT profile, field, version, generation, nonce, ciphertext FROM records WHERE field = ?",
                    (TOKENS_FIELD,),
                ).fetchall()
            finally:
                conn.execute("COMMIT")
        found: dict[str, TokenSet | BrokerError] = {}
        for profile, field, *record in rows:
            try:
                plaintext = self._open(aead, profile, field, tuple(record), generations.get(profile))
                found[profile] = records.tokens_of(records.document(profile, field, plaintext))
            except BrokerError as exc:
                found[profile] = exc
            except (KeyError, TypeError, ValueError):
                found[profile] = records.corrupt(profile, field, "does not hold a token set")
        return found

    async def save_tokens(self, profile: str, tokens: TokenSet) -> None:
        """Store the profile's latest tokens (in its current generation); returns once they are
        committed and fsynced."""
        aead = self._require_unlocked()
        plaintext = records.pad(records.tokens_doc(tokens))
        await trio.to_thread.run_sync(self._put_records, aead, profile, {TOKENS_FIELD: plaintext}, (), False)

    async def forget_tokens(self, profile: str) -> None:
        """Drop the profile's saved tokens (credentials stay), in a new generation: a copy of them
        put back later is refused. Works while locked (then without a new generation: the index is
        under the data key)."""
        aead = self._aead
        if aead is None:
            await trio.to_thread.run_sync(self._delete_records, profile, (TOKENS_FIELD,))
        else:
            await trio.to_thread.run_sync(self._put_records, aead, profile, {}, (TOKENS_FIELD,), True)

    # ------------------------------------------------------------ management

    def set_credentials(self, profile: str, credentials: Credentials) -> None:
        """Make the profile's stored secrets exactly ``credentials`` (None fields are removed), in a
        new generation: a copy of an earlier record put back is refused (``RecordRolledBack``).
        Creates the profile if needed; its saved tokens are kept (in the new generation).
        Durable on return."""
        aead = self._require_unlocked()
        if not profile:
            raise VaultError("a profile name cannot be empty")
        puts: dict[str, bytes] = {}
        drops: list[str] = []
        for field in CREDENTIAL_FIELDS:
            value: Secret | None = getattr(credentials, field)
            if value is None:
                drops.append(field)
            else:
                puts[field] = records.pad(records.secret_doc(value))
        self._put_records(aead, profile, puts, drops, True)

    def remove(self, profile: str) -> bool:
        """Forget the profile and all its records, in a new generation (a copy put back is refused,
        also if the profile is added again). Works while locked (then without a new generation).
        Returns whether it existed."""
        aead = self._aead
        with self._transaction() as conn:
            if aead is not None and self._format >= 2:
                generations = dict(self._generations(conn, aead))
                if profile in generations:
                    generations[profile] += 1
                    self._write_index(conn, aead, generations)
            conn.execute("DELETE FROM records WHERE profile = ?", (profile,))
            return conn.execute("DELETE FROM profiles WHERE name = ?", (profile,)).rowcount > 0

    def profiles(self) -> list[str]:
        """Every profile the vault holds, sorted. Works while locked (names are not secret)."""
        return [name for (name,) in self._read("SELECT name FROM profiles ORDER BY name", ())]

    # ------------------------------------------------------------ internals

    def _require_open(self) -> None:
        if self._lock_fd is None:
            raise VaultError(f"the vault {self.path} is closed")

    def _require_unlocked(self) -> AESGCM:
        self._require_open()
        aead = self._aead
        if aead is None:
            raise Locked(_LOCKED_MESSAGE)
        return aead

    def _read(self, sql: str, args: tuple[Any, ...]) -> list[Any]:
        self._require_open()
        with self._read_lock, files.sqlite_errors(self.path):
            return self._reader.execute(sql, args).fetchall()

    def _read_records(self, aead: AESGCM, profile: str, *, tokens: bool) -> tuple[int | None, list[Any]]:
        """The profile's current generation and its token record (``tokens``) or its credential
        records, as one snapshot."""
        self._require_open()
        with self._read_lock, files.sqlite_errors(self.path):
            conn = self._reader
            conn.execute("BEGIN")
            try:
                current = self._generations(conn, aead).get(profile)
                rows = conn.execute(
                    _TOKEN_RECORD if tokens else _CREDENTIAL_RECORDS, (profile, TOKENS_FIELD)
                ).fetchall()
            finally:
                conn.execute("COMMIT")
        return current, rows

    def _generations(self, conn: sqlite3.Connection, aead: AESGCM) -> dict[str, int]:
        """The index of generations as ``conn`` sees it (decrypted once per version of it)."""
        row = conn.execute("SELECT nonce FROM generations WHERE id = 1").fetchone()
        if row is None:
            raise VaultError(
                f"the vault {self.path} has lost its index of record generations (damaged or tampered with); "
                "restore it from a backup"
            )
        cached = self._index
        if cached is not None and cached[0] == row[0]:
            return cached[1]
        (ciphertext,) = conn.execute("SELECT ciphertext FROM generations WHERE id = 1").fetchone()
        try:
            plaintext = aead.decrypt(row[0], ciphertext, records.index_aad(self._vault_id))
            generations = records.index_of(json.loads(plaintext))
        except (InvalidTag, ValueError, TypeError):
            raise VaultError(
                f"the vault {self.path}: its index of record generations fails authentication (corrupt or "
                "tampered with); restore it from a backup"
            ) from None
        self._index = (row[0], generations)
        return generations

    def _write_index(self, conn: sqlite3.Connection, aead: AESGCM, generations: dict[str, int]) -> None:
        nonce = os.urandom(NONCE_BYTES)
        ciphertext = aead.encrypt(nonce, _index_plaintext(generations), records.index_aad(self._vault_id))
        conn.execute("INSERT OR REPLACE INTO generations VALUES (1, ?, ?)", (nonce, ciphertext))

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._require_open()
        with self._write_lock, files.sqlite_errors(self.path):
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")  # synchronous=FULL: the WAL is fsynced before this returns
            except BaseException:
                # a failed COMMIT (disk full) leaves the transaction open; SQLite may have rolled back
                # already. Either way the cause, not the rollback's own complaint, is what is raised.
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise

    def _put_records(
        self,
        aead: AESGCM,
        profile: str,
        puts: Mapping[str, bytes],
        drops: tuple[str, ...] | list[str],
        new_generation: bool,
    ) -> None:
        """Write ``puts`` and delete ``drops`` in one transaction, in the profile's current generation
        or (``new_generation``, and for a profile the index does not know) a new one: then the
        profile's other records are sealed again for it (one that cannot be read is dropped: it
        was no use, and a new login replaces it)."""
        with self._transaction() as conn:
            generations = self._generations(conn, aead)
            current = generations.get(profile)
            generation = 1 if current is None else current + 1 if new_generation else current
            if generation != current:
                kept = conn.execute(
                    "SELECT field, version, generation, nonce, ciphertext FROM records WHERE profile = ?", (profile,)
                ).fetchall()
                resealed: dict[str, bytes] = {}
                for field, *record in kept:
                    if field in puts or field in drops:
                        continue
                    try:
                        resealed[field] = self._open(aead, profile, field, tuple(record), current)
                    except RecordCorrupt:
                        drops = [*drops, field]
                puts = {**resealed, **puts}
                self._write_index(conn, aead, {**generations, profile: generation})
            rows = []
            for field, plaintext in puts.items():
                nonce = os.urandom(NONCE_BYTES)
                aad = records.record_aad(self._vault_id, profile, field, RECORD_VERSION, generation)
                rows.append((profile, field, RECORD_VERSION, nonce, aead.encrypt(nonce, plaintext, aad), generation))
            conn.execute("INSERT OR IGNORE INTO profiles VALUES (?, ?)", (profile, time.time()))
            conn.executemany(
                "INSERT OR REPLACE INTO records (profile, field, version, nonce, ciphertext, generation) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            conn.executemany("DELETE FROM records WHERE profile = ? AND field = ?", [(profile, f) for f in drops])

    def _delete_records(self, profile: str, fields: tuple[str, ...]) -> None:
        with self._transaction() as conn:
            conn.executemany("DELETE FROM records WHERE profile = ? AND field = ?", [(profile, f) for f in fields])

    def _open(self, aead: AESGCM, profile: str, field: str, record: tuple[Any, ...], current: int | None) -> bytes:
        """A record's plaintext: its format known, its generation the current one (``RecordRolledBack``
        otherwise), its associated data its identity (``RecordCorrupt`` otherwise)."""
        version, generation, nonce, ciphertext = record
        if version not in RECORD_VERSIONS:
            raise records.corrupt(
                profile, field, f"has format version {version!r}; this dc-broker reads {RECORD_VERSION}"
            )
        if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES or not isinstance(ciphertext, bytes):
            raise records.corrupt(profile, field, "is malformed")
        if not isinstance(generation, int) or (version == 1 and generation != 0):
            raise records.corrupt(profile, field, "is malformed")
        records.check_generation(profile, field, generation, current)
        try:
            return aead.decrypt(
                nonce, ciphertext, records.record_aad(self._vault_id, profile, field, version, generation)
            )
        except InvalidTag:
            raise records.corrupt(profile, field, "fails authentication (corrupt, tampered with or swapped)") from None


def _index_plaintext(generations: dict[str, int]) -> bytes:
    return json.dumps(records.index_doc(generations), separators=(",", ":"), sort_keys=True).encode("utf-8")
