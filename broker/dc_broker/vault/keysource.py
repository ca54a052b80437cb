"""Where the vault's key-encryption key (KEK) comes from: a passphrase, a key file, a systemd credential
or the desktop keyring.

Owns: the four key sources as small values (``Passphrase``, ``KeyFile``, ``SystemdCredential``,
``Keyring``) and rebuilding one from what the vault stores (``key_source_of``: kind + reference), the
Argon2id parameters (``KdfParams``; production default 64 MiB, 3 passes, 4 lanes, RFC 9106's second
recommendation) and the derivation, and reading a key file or credential with its permission checks:

- a key file holds exactly 32 random bytes, is a regular file owned by us (or root) and grants nothing
  to group or other (it is refused otherwise, naming the path and the fix);
- a systemd credential is ``$CREDENTIALS_DIRECTORY/<name>`` with the same 32-byte format. systemd
  grants the service user read access through an ACL, which shows up as group bits in the mode, so
  only world access is refused there; the directory itself is private to the unit;
- a keyring key is 32 random bytes in one Secret Service item (``secretservice.py`` talks D-Bus), found
  by its attributes ``application=dc-broker`` and ``dc-broker-key=<key id>``; the item also names the
  vault's path, so several vaults coexist. The vault stores only the key id, never the key.

Must never: keep a KEK or passphrase after returning it (the vault uses a KEK once to wrap or unwrap
its data key and drops it), print or log key material, or touch the vault file. No SQLite, no trio;
D-Bus only through ``secretservice``.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar, Final

from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from dc_broker import atomic
from dc_broker.errors import VaultError
from dc_broker.secret import Secret
from dc_broker.vault import secretservice
from dc_broker.vault.files import file_error

KEY_BYTES: Final = 32
SALT_BYTES: Final = 16
CREDENTIALS_DIRECTORY_ENV: Final = "CREDENTIALS_DIRECTORY"
KEYRING_APPLICATION: Final = "dc-broker"
KEYRING_SCHEMA: Final = "org.dc-broker.VaultKey"  # libsecret's xdg:schema, so keyring tools group them


class KeySourceKind(StrEnum):
    PASSPHRASE = "passphrase"
    KEY_FILE = "keyfile"
    SYSTEMD_CREDENTIAL = "systemd-credential"
    KEYRING = "keyring"


@dataclass(frozen=True, slots=True)
class KdfParams:
    """Argon2id cost. ``memory_kib`` is in KiB (RFC 9106's m); stored in the vault next to the salt."""

    memory_kib: int = 64 * 1024
    iterations: int = 3
    lanes: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.lanes <= 255:
            raise VaultError(f"Argon2id lanes must be 1..255, not {self.lanes}")
        if not 1 <= self.iterations <= 64:
            raise VaultError(f"Argon2id iterations must be 1..64, not {self.iterations}")
        if not 8 * self.lanes <= self.memory_kib <= 4 * 1024 * 1024:
            raise VaultError(f"Argon2id memory must be {8 * self.lanes} KiB..4 GiB, not {self.memory_kib} KiB")

    def to_json(self) -> str:
        return json.dumps(
            {"alg": "argon2id", "memory_kib": self.memory_kib, "iterations": self.iterations, "lanes": self.lanes},
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> KdfParams:
        try:
            data = json.loads(text)
            if data.get("alg") != "argon2id":
                raise ValueError(data.get("alg"))
            params = cls(int(data["memory_kib"]), int(data["iterations"]), int(data["lanes"]))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise VaultError(f"the vault's key-derivation parameters are unreadable ({type(exc).__name__})") from None
        if (
            params.memory_kib > MAX_STORED_MEMORY_KIB
            or params.iterations > MAX_STORED_ITERATIONS
            or params.lanes > MAX_STORED_LANES
        ):
            # a vault file is data: its parameters must not make an unlock take gigabytes or minutes
            raise VaultError(
                f"the vault's key-derivation parameters ({params.memory_kib} KiB, {params.iterations} iterations, "
                f"{params.lanes} lanes) exceed what dc-broker accepts from a file "
                f"({MAX_STORED_MEMORY_KIB} KiB, {MAX_STORED_ITERATIONS}, {MAX_STORED_LANES}); is it tampered?"
            )
        return params


#: the most expensive Argon2id a vault file may ask for (``from_json``); creation uses far less
MAX_STORED_MEMORY_KIB: Final = 1024 * 1024
MAX_STORED_ITERATIONS: Final = 16
MAX_STORED_LANES: Final = 16


#: what ``Vault.create`` uses unless told otherwise; never below 64 MiB
PRODUCTION_KDF: Final = KdfParams()
assert PRODUCTION_KDF.memory_kib >= 64 * 1024


#: an Argon2id this memory-hungry runs in a child process (``derive_kek``)
CHILD_FROM_KIB: Final = 16 * 1024
#: what the child runs: the passphrase on stdin after one line of parameters, the key on stdout;
#: no core dump, not ptrace-able, nothing on its command line but this
_CHILD: Final = r"""
import ctypes, json, resource, sys
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
try:
    ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0
except (OSError, AttributeError):
    pass
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
head, _, secret = sys.stdin.buffer.read().partition(b"\n")
p = json.loads(head)
key = Argon2id(salt=bytes.fromhex(p["salt"]), length=p["length"], iterations=p["iterations"], lanes=p["lanes"],
               memory_cost=p["memory_kib"]).derive(secret)
sys.stdout.buffer.write(key)
"""


def derive_kek(passphrase: Secret, salt: bytes, params: KdfParams, *, in_process: bool = False) -> bytes:
    """Argon2id(passphrase, salt) -> a 256-bit KEK. Costs what ``params`` says (~0.1 s in production).

    A production Argon2id (64 MiB) runs in a short-lived child process: its memory is the child's,
    returned to the system when it exits, so the broker's own peak stays its working set (a broker
    with 10,000 profiles: 66 MiB, not 130). The passphrase goes to the child on a pipe, never on its
    command line; the child takes the same care with it as the broker (no core dump, not dumpable)."""
    secret = passphrase.reveal().encode("utf-8")
    if in_process or params.memory_kib < CHILD_FROM_KIB:
        kdf = Argon2id(
            salt=salt, length=KEY_BYTES, iterations=params.iterations, lanes=params.lanes, memory_cost=params.memory_kib
        )
        return kdf.derive(secret)
    head = json.dumps(
        {
            "salt": salt.hex(),
            "length": KEY_BYTES,
            "iterations": params.iterations,
            "lanes": params.lanes,
            "memory_kib": params.memory_kib,
        }
    ).encode()
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-c", _CHILD], input=head + b"\n" + secret, capture_output=True, timeout=120
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VaultError(f"could not derive the vault key (Argon2id in a child process): {exc}") from None
    if done.returncode != 0 or len(done.stdout) != KEY_BYTES:
        said = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        raise VaultError(f"could not derive the vault key (Argon2id in a child process): {said[0][:200]}")
    return done.stdout


@dataclass(frozen=True, slots=True)
class Passphrase:
    """The KEK is derived from a passphrase the person types at ``create`` / ``unlock``."""

    kind: ClassVar[KeySourceKind] = KeySourceKind.PASSPHRASE
    needs_passphrase: ClassVar[bool] = True

    @property
    def reference(self) -> str | None:
        return None


@dataclass(frozen=True, slots=True)
class KeyFile:
    """The KEK is the 32 bytes of a private file (``dc-broker init --key-file``; see ``create_key_file``)."""

    path: str
    kind: ClassVar[KeySourceKind] = KeySourceKind.KEY_FILE
    needs_passphrase: ClassVar[bool] = False

    @property
    def reference(self) -> str:
        return self.path

    def read_key(self) -> bytes:
        return read_key_file(self.path, what="key file", forbidden_bits=0o077, safe_directories=True)


@dataclass(frozen=True, slots=True)
class SystemdCredential:
    """The KEK is the systemd credential ``name`` (``LoadCredential[Encrypted]=name:...`` in the unit)."""

    name: str
    kind: ClassVar[KeySourceKind] = KeySourceKind.SYSTEMD_CREDENTIAL
    needs_passphrase: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise VaultError(f"{self.name!r} is not a systemd credential name")

    @property
    def reference(self) -> str:
        return self.name

    def path(self, environ: dict[str, str] | None = None) -> str:
        env = os.environ if environ is None else environ
        directory = env.get(CREDENTIALS_DIRECTORY_ENV)
        if not directory:
            raise VaultError(
                f"the vault's key is the systemd credential {self.name!r}, but ${CREDENTIALS_DIRECTORY_ENV} "
                f"is not set; run under systemd with `LoadCredential={self.name}:...` in the unit"
            )
        return os.path.join(directory, self.name)

    def read_key(self, environ: dict[str, str] | None = None) -> bytes:
        return read_key_file(self.path(environ), what=f"systemd credential {self.name!r}", forbidden_bits=0o007)


@dataclass(frozen=True, slots=True)
class Keyring:
    """The KEK is 32 random bytes in the desktop's Secret Service (GNOME Keyring, KeePassXC, KWallet), in
    the item whose attribute ``dc-broker-key`` is ``key_id`` (``dc-broker init --key-source keyring``;
    see ``create_keyring_key``). The session's keyring unlocks at login, so the vault needs no prompt."""

    key_id: str
    kind: ClassVar[KeySourceKind] = KeySourceKind.KEYRING
    needs_passphrase: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if len(self.key_id) != 32 or self.key_id.strip("0123456789abcdef"):
            raise VaultError(f"{self.key_id!r} is not a dc-broker keyring key id (32 lowercase hex digits)")

    @property
    def reference(self) -> str:
        return self.key_id

    @property
    def attributes(self) -> dict[str, str]:
        """What finds the item (the vault's path is on the item too, but a vault may move)."""
        return {"application": KEYRING_APPLICATION, "dc-broker-key": self.key_id}

    def read_key(self) -> bytes:
        key = secretservice.read(self.attributes, what=f"dc-broker key {self.key_id}")
        if len(key) != KEY_BYTES:
            raise VaultError(f"the desktop keyring's dc-broker key {self.key_id} does not hold {KEY_BYTES} bytes")
        return key


KeySource = Passphrase | KeyFile | SystemdCredential | Keyring

#: kind -> the key source from its stored reference (None when the reference is missing but needed)
_FROM_REFERENCE: Final[dict[str, Callable[[str | None], KeySource | None]]] = {
    KeySourceKind.PASSPHRASE: lambda _reference: Passphrase(),
    KeySourceKind.KEY_FILE: lambda reference: KeyFile(reference) if reference else None,
    KeySourceKind.SYSTEMD_CREDENTIAL: lambda reference: SystemdCredential(reference) if reference else None,
    KeySourceKind.KEYRING: lambda reference: Keyring(reference) if reference else None,
}


def key_source_of(kind: str, reference: str | None) -> KeySource:
    """Rebuild a key source from what the vault stores about it (its kind and reference)."""
    rebuild = _FROM_REFERENCE.get(kind)
    source = rebuild(reference) if rebuild is not None else None
    if source is None:
        raise VaultError(f"the vault names an unknown key source {kind!r}; was it written by a newer dc-broker?")
    return source


def read_key_file(
    path: str, *, what: str = "key file", forbidden_bits: int = 0o077, safe_directories: bool = False
) -> bytes:
    """The 32 bytes in ``path``, after checking it is a private regular file (checked on the open fd);
    with ``safe_directories``, every directory above it must pass the rule of ``dc_broker.atomic``
    (OpenSSH's StrictModes: owned by us or root, writable by no one else), and the file is opened
    in the directory so checked, never through a link."""
    try:
        if safe_directories:
            directory, name = os.path.split(os.path.abspath(path))
            dfd = atomic.open_directory(directory)
            try:
                fd = os.open(name, _READ_FLAGS | os.O_NOFOLLOW, dir_fd=dfd)
            finally:
                os.close(dfd)
        else:
            fd = os.open(path, _READ_FLAGS)
    except atomic.UnsafeDirectory as exc:
        raise VaultError(f"refusing the {what} {path}: {exc}; {atomic.RULE}") from None
    except OSError as exc:
        raise VaultError(f"cannot open the {what} {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise VaultError(f"the {what} {path} is not a regular file")
        if st.st_uid not in (os.geteuid(), 0):
            raise VaultError(f"the {what} {path} belongs to uid {st.st_uid}, not to us; refusing it")
        if st.st_mode & forbidden_bits:
            raise VaultError(
                f"the {what} {path} has mode {stat.S_IMODE(st.st_mode):04o}: readable beyond its owner; "
                f"refusing it (fix: chmod 600 {path}, then consider the key leaked and rotate it)"
            )
        data = os.read(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) != KEY_BYTES:
        raise VaultError(f"the {what} {path} must hold exactly {KEY_BYTES} random bytes")
    return data


_READ_FLAGS: Final = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK


def create_key_file(path: str) -> None:
    """Write 32 fresh random bytes to a new file, mode 0600, in a directory that passes the rule of
    ``dc_broker.atomic`` (missing directories are made 0700). Refuses to overwrite; a crash leaves
    either no file or the whole key (``atomic.write``, ``new_only``)."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.close(atomic.open_directory(directory, create=True))
    except atomic.UnsafeDirectory as exc:
        raise VaultError(f"refusing to put the key file {path} there: {exc}; {atomic.RULE}") from None
    except OSError as exc:
        raise file_error(directory, exc, "the key file's directory") from None
    try:
        atomic.write(path, os.urandom(KEY_BYTES), mode=0o600, safe=True, new_only=True)
    except FileExistsError:
        raise VaultError(f"{path} already exists; refusing to overwrite a key file") from None
    except atomic.UnsafeDirectory as exc:  # made unsafe since the check above
        raise VaultError(f"refusing to put the key file {path} there: {exc}; {atomic.RULE}") from None
    except OSError as exc:
        raise file_error(directory, exc, "the key file's directory") from None


def create_keyring_key(vault_path: str) -> Keyring:
    """32 fresh random bytes in a new item of the desktop keyring's default collection, labelled and
    attributed with the vault's path; the returned source names it by a fresh random key id."""
    source = Keyring(os.urandom(16).hex())
    vault_path = os.path.abspath(vault_path)
    secretservice.store(
        {**source.attributes, "xdg:schema": KEYRING_SCHEMA, "dc-broker-vault": vault_path},
        f"dc-broker vault key ({vault_path})",
        os.urandom(KEY_BYTES),
        unique=source.attributes,
    )
    return source


def delete_keyring_key(source: Keyring) -> int:
    """Remove the source's item from the desktop keyring (a failed ``init``); returns how many went."""
    return secretservice.delete(source.attributes)
