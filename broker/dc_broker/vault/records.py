"""Pure pieces of the vault: a record's identity (associated data), its plaintext layout, the codecs
between ``Secret`` / ``TokenSet`` and plaintext, the index of record generations, and the
wrong-passphrase delay policy.

Generations. Each profile has a counter, its *generation*, bumped whenever its secrets change
(``set_credentials``), its tokens are forgotten or the profile is removed; never reset. Every record
carries the generation it was written in, in its associated data (``record_aad``, record version 2),
and the vault's *index* (``index_doc``: every profile's current generation, encrypted under the data
key as one row) says which generation is current. A record from another generation (an older copy
put back after a ``rotate``), or one whose profile the index does not know, fails with
``RecordRolledBack``; so does a current record when the index itself was put back (a record newer
than the index). Records of version 1 (written before generations) are generation 0.

Owns: what one record *means*. Must never: do I/O, hold a key, or put a secret in an error message
(errors name the profile and field only).
"""

from __future__ import annotations

import json
from typing import Any, Final

from dc_broker.errors import RecordCorrupt, RecordRolledBack
from dc_broker.secret import Secret
from dc_broker.tokens import TokenSet

#: the record format: 2 = its generation is in its associated data (1: before generations, read as 0)
RECORD_VERSION: Final = 2
RECORD_VERSIONS: Final = frozenset({1, 2})
NONCE_BYTES: Final = 12  # AES-GCM's 96-bit nonce, random per write
PAD_TO: Final = 64  # plaintexts are space-padded to a multiple of this: ciphertexts hide exact lengths

#: the credential fields of a profile, named as in ``Credentials``; "tokens" holds the last TokenSet
CREDENTIAL_FIELDS: Final = ("password", "client_secret", "refresh_token", "client_keys")
TOKENS_FIELD: Final = "tokens"


def unlock_delay(failures: int) -> float:
    """Seconds the daemon waits before trying the next passphrase after ``failures`` wrong ones in a
    row: 0, 1, 2, 4, 8, 16, 30, 30... (the vault only counts; the daemon sleeps)."""
    if failures <= 0:
        return 0.0
    return float(min(30, 2 ** min(failures - 1, 5)))


# ------------------------------------------------------------------ records (pure)


def record_aad(vault_id: bytes, profile: str, field: str, version: int, generation: int = 0) -> bytes:
    """A record's identity, length-prefixed so no two identities encode alike; from version 2 with
    the generation it was written in."""
    parts = [vault_id, profile.encode("utf-8"), field.encode("ascii"), str(version).encode("ascii")]
    if version >= 2:
        parts.append(str(generation).encode("ascii"))
    out = bytearray(b"dc-broker/record")
    for part in parts:
        out += len(part).to_bytes(4, "big") + part
    return bytes(out)


def index_aad(vault_id: bytes) -> bytes:
    """The identity of the vault's index of generations (one per vault)."""
    return b"dc-broker/generations\0" + vault_id


def index_doc(generations: dict[str, int]) -> dict[str, Any]:
    return {"v": 1, "generations": generations}


def index_of(doc: dict[str, Any]) -> dict[str, int]:
    """The generations in a decrypted index (ValueError if it is not one)."""
    gens = doc.get("generations") if doc.get("v") == 1 else None
    if not isinstance(gens, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0 for k, v in gens.items()
    ):
        raise ValueError("not an index of generations")
    return gens


def check_generation(profile: str, field: str, written: int, current: int | None) -> None:
    """A record written in generation ``written`` is current iff the index says ``current``."""
    if current is None:
        raise rolled_back(
            profile,
            field,
            "is not in the vault's index of current records: it was put back after the profile "
            "was removed, or the index was rolled back",
        )
    if written < current:
        raise rolled_back(
            profile,
            field,
            f"is from before the profile's last change (generation {written}; the vault is at "
            f"{current}): an older copy was put back (rolled back)",
        )
    if written > current:
        raise rolled_back(
            profile,
            field,
            f"is newer than the vault's index says (generation {written}; the index says "
            f"{current}): the index was put back from an older copy (rolled back)",
        )


def wrap_aad(vault_id: bytes, kind: str) -> bytes:
    return b"dc-broker/data-key\0" + vault_id + b"\0" + kind.encode("ascii")


def pad(doc: dict[str, Any]) -> bytes:
    raw = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    return raw + b" " * (-len(raw) % PAD_TO)


def secret_doc(value: Secret) -> dict[str, Any]:
    return {"v": value.reveal()}


def tokens_doc(tokens: TokenSet) -> dict[str, Any]:
    return {
        "access_token": tokens.access_token.reveal(),
        "obtained_at": tokens.obtained_at,
        "expires_at": tokens.expires_at,
        "token_type": tokens.token_type,
        "refresh_token": None if tokens.refresh_token is None else tokens.refresh_token.reveal(),
        "refresh_expires_at": tokens.refresh_expires_at,
        "scope": tokens.scope,
        "id_token": None if tokens.id_token is None else tokens.id_token.reveal(),
        "issued_for": tokens.issued_for,
    }


def _opt_secret(value: Any) -> Secret | None:
    return None if value is None else Secret(value)


def tokens_of(doc: dict[str, Any]) -> TokenSet:
    return TokenSet(
        access_token=Secret(doc["access_token"]),
        obtained_at=float(doc["obtained_at"]),
        expires_at=float(doc["expires_at"]),
        token_type=str(doc["token_type"]),
        refresh_token=_opt_secret(doc["refresh_token"]),
        refresh_expires_at=None if doc["refresh_expires_at"] is None else float(doc["refresh_expires_at"]),
        scope=doc["scope"],
        id_token=_opt_secret(doc["id_token"]),
        issued_for=doc.get("issued_for") if isinstance(doc.get("issued_for"), str) else None,
    )


def corrupt(profile: str, field: str, why: str) -> RecordCorrupt:
    return RecordCorrupt(_said(profile, field, why))


def rolled_back(profile: str, field: str, why: str) -> RecordRolledBack:
    return RecordRolledBack(_said(profile, field, why))


def _said(profile: str, field: str, why: str) -> str:
    return (
        f"profile {profile!r}: its {field} record in the vault {why}; store it again with "
        f"`dc-broker add {profile}` or run `dc-broker login {profile}`"
    )


def document(profile: str, field: str, plaintext: bytes) -> dict[str, Any]:
    """A decrypted record's JSON object (the padding is JSON whitespace)."""
    try:
        doc = json.loads(plaintext)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise corrupt(profile, field, "is not readable")
    return doc
