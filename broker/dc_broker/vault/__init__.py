"""The encrypted credential vault: one SQLite file holding every profile's secrets and latest tokens.

    core.py       ``Vault``: open/create/close, lock/unlock, SecretStore + management methods
    records.py    pure: record identity (AAD), plaintext layout and codecs, the unlock delay policy
    files.py      the file-system edge: paths, modes, the one-writer flock, SQLite pragmas and schema
    keysource.py  the key-encryption key (KEK) from a passphrase, key file, systemd credential or keyring
    secretservice.py  the desktop keyring's edge (Secret Service over D-Bus; optional ``secretstorage``)

Owns: the vault file and its format, envelope encryption, lock/unlock, and the one-writer rule.
Implements ``dc_broker.store.SecretStore`` for sessions, plus the management API the CLI uses
(``create``, ``open``, ``set_credentials``, ``remove``, ``profiles``, ``change_passphrase``).

Envelope encryption. A random 256-bit *data key* encrypts each record with AES-256-GCM (random 96-bit
nonce per write). The record's identity (vault id, profile, field, format version, generation) is the
associated data, so a record copied onto another profile or field, or into another vault, fails
authentication, and one copied back from before the profile's last change is refused as rolled
back: each profile's generation is bumped by every change of its secrets, a forgotten login and a
removal, and the vault's *index* (one row, under the data key) holds every profile's current one
(``dc_broker.vault.records``). Putting the index back as well makes the other profiles changed since
look newer than it, which is refused the same way; a copy of the whole file from before is an older
vault, which no file can tell.
The data key is stored only wrapped (AES-256-GCM again) by a *key-encryption key* from the vault's
key source (``dc_broker.vault.keysource``): Argon2id over a passphrase, a key file, a systemd
credential, or 32 random bytes in the desktop keyring (the vault stores only the item's key id).
Changing the passphrase rewraps the data key: one row changes, records are untouched.

File format (SQLite, WAL, synchronous=FULL; file 0600 in a 0700 directory)::

    meta      (id=1, format, vault_id BLOB[16], created_at)                 format 2 (1: before generations)
    data_key  (id=1, kind, reference, kdf JSON, salt, nonce, wrapped)   kind: passphrase | keyfile |
                                                                        systemd-credential | keyring
    profiles  (name PRIMARY KEY, created_at)                            names are not secret
    records   (profile, field, version, nonce, ciphertext, generation)  PRIMARY KEY (profile, field)
              field: password | client_secret | refresh_token | client_keys | tokens
              plaintext: JSON, space-padded to a multiple of 64 bytes (hides exact secret lengths)
    generations (id=1, nonce, ciphertext)                               the index: {profile: generation}

A format-1 vault (no generations) is migrated at its first unlock, in one transaction: its records
are generation 0, and the index says so.

Locked means no data key in memory: a vault opened from disk starts locked; ``unlock`` derives or
reads the KEK, unwraps the data key and keeps only an ``AESGCM`` object; ``lock`` drops it. Nothing
decrypted is cached: every read decrypts its row (tens of microseconds), so ``lock`` leaves no
plaintext behind in this object. (Python cannot wipe memory; strings already handed out live on.)

Durability. ``save_tokens`` commits in a worker thread and returns only after SQLite's fsync of the
WAL (synchronous=FULL): a rotated refresh token is on disk before the session forgets the old one.
Writes go through one connection under a lock; reads use a second connection, so a read never waits
on another profile's fsync (WAL readers do not block on the writer).

One writer. An exclusive ``flock`` on ``<vault>.lock`` is held from open to close; a second opener
gets ``VaultBusy`` naming the path.

Must never: write a secret, token or key in plaintext to the file, a log line, an exception message
or a repr; cache decrypted values; let one profile's corrupt record affect another profile.
"""

from dc_broker.vault.core import Vault
from dc_broker.vault.files import default_vault_path
from dc_broker.vault.keysource import (
    PRODUCTION_KDF,
    KdfParams,
    KeyFile,
    Keyring,
    KeySource,
    KeySourceKind,
    Passphrase,
    SystemdCredential,
    create_key_file,
    create_keyring_key,
    delete_keyring_key,
)
from dc_broker.vault.records import unlock_delay

__all__ = [
    "PRODUCTION_KDF",
    "KdfParams",
    "KeyFile",
    "KeySource",
    "KeySourceKind",
    "Keyring",
    "Passphrase",
    "SystemdCredential",
    "Vault",
    "create_key_file",
    "create_keyring_key",
    "default_vault_path",
    "delete_keyring_key",
    "unlock_delay",
]
