"""The client's own key pairs for ``private_key_jwt`` (RFC 7523): made here, kept in the vault as one
record (``Credentials.client_keys``), shown to the IdP only as a public JWKS.

A ``KeySet`` holds the key that signs (``active``) and, during a rotation, the ``next`` one: `dc-broker
rotate PROFILE --key` adds a next key (the IdP is shown both public keys, and the broker still signs
with the active one), `--activate` makes it the active one once the IdP accepts it, and the old key
is gone. Each key's ``kid`` is its RFC 7638 JWK thumbprint, so the same key always has the same
``kid`` and two keys never share one.

Keys: EC P-256 (ES256) by default, RSA 2048 (RS256) when asked. The private key lives only in
``Secret`` values (a PKCS#8 PEM inside the key set's JSON); ``public_jwks`` is the one thing that
leaves. PyJWT (already how the dev IdP signs) exports the public JWKs; ``cryptography`` makes the keys.

Must never: put a private key in a repr, an error message or a log line; write a key anywhere but
into the ``Secret`` handed back.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from dc_broker.errors import ConfigError
from dc_broker.secret import Secret
from dc_broker.tokens import Credentials

#: key type -> its JWS algorithm
KEY_TYPES: Final = {"ec": "ES256", "rsa": "RS256"}
DEFAULT_KEY_TYPE: Final = "ec"
RSA_BITS: Final = 2048
_FORMAT: Final = 1


class KeySetCorrupt(ConfigError):
    """The stored key set cannot be read (never says more than what is wrong with its shape)."""


@dataclass(frozen=True, slots=True)
class ClientKey:
    """One key pair: its ``kid`` (the public key's thumbprint), algorithm, when it was made (unix
    seconds) and the private key as PKCS#8 PEM inside a ``Secret``."""

    kid: str
    alg: str
    created_at: float
    pem: Secret = field(repr=False)

    def private_key(self) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
        key = serialization.load_pem_private_key(self.pem.reveal().encode("ascii"), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise KeySetCorrupt("a stored client key is neither an EC nor an RSA key")
        return key

    def public_jwk(self) -> dict[str, Any]:
        """The public key as a JWK with ``kid``, ``alg`` and ``use: sig`` (what the IdP registers)."""
        return {**_public_members(self.private_key()), "kid": self.kid, "alg": self.alg, "use": "sig"}


@dataclass(frozen=True, slots=True)
class KeySet:
    """The key that signs, and the one that will (during a rotation)."""

    active: ClientKey
    next: ClientKey | None = None

    def public_jwks(self) -> dict[str, Any]:
        """Every public key the IdP should accept now: the active one, then the next one."""
        keys = [self.active] + ([self.next] if self.next is not None else [])
        return {"keys": [k.public_jwk() for k in keys]}

    def with_next(self, key: ClientKey) -> KeySet:
        """A rotation's first half: ``key`` is shown to the IdP; the active key still signs."""
        return KeySet(self.active, key)

    def activated(self) -> KeySet:
        """A rotation's second half: the next key signs; the old one is dropped."""
        if self.next is None:
            raise ConfigError("there is no next key to activate; make one with `dc-broker rotate PROFILE --key`")
        return KeySet(self.next)

    def to_secret(self) -> Secret:
        doc = {"format": _FORMAT, "active": _key_doc(self.active)}
        if self.next is not None:
            doc["next"] = _key_doc(self.next)
        return Secret(json.dumps(doc, separators=(",", ":")))

    @classmethod
    def from_secret(cls, value: Secret) -> KeySet:
        try:
            doc = json.loads(value.reveal())
            if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
                raise ValueError("format")
            nxt = doc.get("next")
            return cls(_key_of(doc["active"]), None if nxt is None else _key_of(nxt))
        except (KeyError, TypeError, ValueError):
            raise KeySetCorrupt(
                "the stored client key set is not readable; make a new key with `rotate --key`"
            ) from None


def _key_doc(key: ClientKey) -> dict[str, Any]:
    return {"kid": key.kid, "alg": key.alg, "created_at": key.created_at, "pem": key.pem.reveal()}


def _key_of(doc: Any) -> ClientKey:
    if not isinstance(doc, dict) or doc.get("alg") not in KEY_TYPES.values():
        raise ValueError("key")
    return ClientKey(str(doc["kid"]), str(doc["alg"]), float(doc["created_at"]), Secret(str(doc["pem"])))


def _b64url_uint(value: int, length: int | None = None) -> str:
    raw = value.to_bytes(length or (value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _public_members(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> dict[str, str]:
    """The RFC 7638 required members of the public JWK (what the thumbprint hashes)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        numbers = key.public_key().public_numbers()
        return {"crv": "P-256", "kty": "EC", "x": _b64url_uint(numbers.x, 32), "y": _b64url_uint(numbers.y, 32)}
    rsa_numbers = key.public_key().public_numbers()
    return {"e": _b64url_uint(rsa_numbers.e), "kty": "RSA", "n": _b64url_uint(rsa_numbers.n)}


def thumbprint(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> str:
    """RFC 7638: SHA-256 over the required public members, sorted, no whitespace; base64url."""
    canonical = json.dumps(_public_members(key), sort_keys=True, separators=(",", ":"))
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode("ascii")).digest()).rstrip(b"=").decode("ascii")


def generate(key_type: str = DEFAULT_KEY_TYPE, *, now: float) -> ClientKey:
    """A new key pair (``ec``: P-256, ``rsa``: 2048 bits); ``now``: when it was made (unix seconds)."""
    if key_type not in KEY_TYPES:
        raise ConfigError(f"key type {key_type!r} is not one of {', '.join(KEY_TYPES)}")
    private: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = (
        ec.generate_private_key(ec.SECP256R1())
        if key_type == "ec"
        else rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    )
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")
    return ClientKey(thumbprint(private), KEY_TYPES[key_type], now, Secret(pem))


def key_set_of(value: Secret | None) -> KeySet | None:
    """The stored key set, or None when there is none."""
    return None if value is None else KeySet.from_secret(value)


def changed(
    credentials: Credentials, *, new_key: str | None = None, activate: bool = False, now: float
) -> tuple[Credentials, KeySet]:
    """The credentials with their key set changed, and the new key set. ``new_key`` (a key type)
    makes a key: the active one when there is none, else the next one (replacing a next key not yet
    activated). ``activate``: the next key becomes the active one and the old one is dropped."""
    keys = key_set_of(credentials.client_keys)
    if new_key is not None:
        made = generate(new_key, now=now)
        keys = KeySet(made) if keys is None else keys.with_next(made)
    if activate:
        if keys is None:
            raise ConfigError("there is no key to activate; make one with `dc-broker rotate PROFILE --key`")
        keys = keys.activated()
    if keys is None:
        raise ConfigError("no key change asked for")
    return dataclasses.replace(credentials, client_keys=keys.to_secret()), keys
