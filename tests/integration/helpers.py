"""Small shared helpers for the DOT integration tests (no Django imports)."""

from __future__ import annotations

import base64
from urllib.parse import quote


def basic(client_id: str, secret: str) -> dict[str, str]:
    """client_secret_basic as RFC 6749 2.3.1 says: form-urlencode id and secret, then base64."""
    raw = f"{quote(client_id, safe='')}:{quote(secret, safe='')}"
    return {"Authorization": "Basic " + base64.b64encode(raw.encode()).decode("ascii")}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
