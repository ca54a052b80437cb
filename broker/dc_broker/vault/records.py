"""Pure pieces of the vault: a record's identity (associated data), its plaintext layout, the codecs
between ``Secret`` / ``TokenSet`` and plaintext, and the wrong-passphrase delay policy.

Owns: what one record *means*. Must never: do I/O, hold a key, or put a secret in an error message
(errors name the profile and field only).
"""

from __future__ import annotations

import json
from typing import Any, Final

from dc_broker.errors import RecordCorrupt
from dc_broker.secret import Secret
from dc_broker.tokens import TokenSet

RECORD_VERSION: Final = 1  # the plaintext layout of one record; part of its associated data
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


def record_aad(vault_id: bytes, profile: str, field: str, version: int) -> bytes:
    """A record's identity, length-prefixed so no two identities encode alike."""
    out = bytearray(b"dc-broker/record")
    for part in (vault_id, profile.encode("utf-8"), field.encode("ascii"), str(version).encode("ascii")):
        out += len(part).to_bytes(4, "big") + part
    return bytes(out)


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
    return RecordCorrupt(
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
