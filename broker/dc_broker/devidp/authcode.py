"""The authorization code grant with PKCE (RFC 6749 4.1, RFC 7636 S256, RFC 8252 loopback redirects).

``AuthCodeStore`` keeps issued codes: each is bound to its client, redirect URI, PKCE challenge and
user, lives ``CODE_LIFETIME`` seconds and can be redeemed once (a replay is ``invalid_grant``, as in
Keycloak). Redirect URIs are accepted only on loopback (``http://127.0.0.1:<any port>/...`` or
``http://localhost...``), as a native app's are. Pure apart from the store and ``secrets``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import urlsplit

CODE_LIFETIME: Final = 60.0


@dataclass
class AuthCode:
    realm: str
    client_id: str
    redirect_uri: str
    code_challenge: str
    scope: str | None
    username: str
    issued_at: float
    used: bool = False
    #: the SSO (user) session the login page made or found; the code exchange attaches to it
    sid: str | None = None


@dataclass
class AuthCodeStore:
    codes: dict[str, AuthCode] = field(default_factory=dict)

    def issue(self, code: AuthCode) -> str:
        value = secrets.token_urlsafe(32)
        self.codes[value] = code
        return value

    def redeem(self, value: str, now: float) -> AuthCode | None:
        """The code's record if it is known, unused and not expired; it is used from now on."""
        record = self.codes.get(value)
        if record is None or record.used or now - record.issued_at > CODE_LIFETIME:
            return None
        record.used = True
        return record


def loopback_redirect(uri: str) -> bool:
    parts = urlsplit(uri)
    return parts.scheme == "http" and parts.hostname in ("127.0.0.1", "::1", "localhost") and not parts.fragment


def s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def verifier_matches(verifier: str, challenge: str) -> bool:
    return hmac.compare_digest(s256(verifier), challenge)
