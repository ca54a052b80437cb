"""Client assertions (RFC 7523 section 2.2): built and signed here, just before a request is sent.

The grant flows are pure and ``dc_broker.idp.oidc`` builds requests without a clock, randomness or
a key: a request whose client authenticates with an assertion carries an ``AssertionNeeded``
marker instead. The one edge that sends requests (``Session._request``) calls ``complete`` with the
wall clock and a fresh random ``jti``, and the request leaves with its ``client_assertion``:

* ``private_key_jwt``: a JWT signed with the profile's active key (``dc_broker.idp.clientkeys``),
  ES256 or RS256, header ``kid`` and ``typ: JWT``;
* ``client_secret_jwt``: the same claims, HS256 with the client secret as the key;
* ``client_assertion_file``: another issuer's JWT (a Kubernetes projected service account token, a
  SPIFFE JWT-SVID, a CI system's OIDC token), read from its file for every request, so a renewed
  file is picked up at once; a missing, unreadable, empty, non-JWT or expired one is
  ``AssertionFileProblem`` naming the file (retried: the agent that writes it may be restarting).

Claims (``claims``): ``iss`` = ``sub`` = the client id, ``aud`` = the token endpoint or the issuer
(the profile says which), ``jti`` random and single-use, ``iat`` = now, ``exp`` = now + 60 s
(``LIFETIME``: Keycloak refuses a longer one by default), all whole seconds.

The JWS is PyJWT's (``jwt.encode``), over the ``cryptography`` keys the daemon already has; the
tests check every assertion with an independent verifier (joserfc).

Must never: put a key or an assertion into a repr, a log line or an error message (an assertion
is a credential for its 60 s); log a claim.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Final

import jwt

from dc_broker.config import Profile
from dc_broker.errors import UpstreamTransient
from dc_broker.idp import clientkeys
from dc_broker.idp.oidc import AssertionNeeded, HttpRequest, jwt_claims
from dc_broker.idp.transport import cert_info
from dc_broker.secret import Secret

#: an assertion's life, seconds (Keycloak's default "Max expiration" of a client assertion is 60 s)
LIFETIME: Final = 60
#: the largest assertion file read (a service account token is about 1 KiB)
MAX_FILE: Final = 64 * 1024
#: a file's JWT that expires within this many seconds is treated as expired (it would die on the way)
EXPIRY_MARGIN: Final = 5.0


class AssertionFileProblem(UpstreamTransient):
    """The federated assertion file cannot be used now (missing, unreadable, expired...). Retried
    with backoff like an outage: the agent that writes it (kubelet, SPIRE) may be renewing it."""


def claims(client_id: str, audience: str, *, now: float, jti: str, lifetime: int = LIFETIME) -> dict[str, Any]:
    """The claims of one client assertion, issued at ``now`` (unix seconds)."""
    iat = int(now)
    return {"iss": client_id, "sub": client_id, "aud": audience, "jti": jti, "iat": iat, "exp": iat + lifetime}


def sign_with_key(key: clientkeys.ClientKey, payload: dict[str, Any]) -> str:
    """A compact JWS of ``payload`` signed with ``key`` (ES256 / RS256), ``kid`` in the header."""
    return jwt.encode(payload, key.private_key(), algorithm=key.alg, headers={"kid": key.kid, "typ": "JWT"})


def sign_with_secret(secret: str, payload: dict[str, Any]) -> str:
    """A compact JWS of ``payload`` signed with HS256 over the client secret (client_secret_jwt)."""
    return jwt.encode(payload, secret.encode("utf-8"), algorithm="HS256", headers={"typ": "JWT"})


def signed(need: AssertionNeeded, *, now: float, jti: str, use_next: bool = False) -> str:
    """The assertion ``need`` asks for, signed now. ``use_next``: with the key set's next key (a
    rotation's check that the IdP accepts it before it signs for real)."""
    payload = claims(need.client_id, need.audience, now=now, jti=jti)
    assert need.key is not None
    if need.method == "client_secret_jwt":
        return sign_with_secret(need.key.reveal(), payload)
    keys = clientkeys.KeySet.from_secret(need.key)
    key = keys.active
    if use_next:
        if keys.next is None:
            raise clientkeys.KeySetCorrupt("there is no next key to check")
        key = keys.next
    return sign_with_key(key, payload)


def read_file_assertion(path: str, *, now: float) -> str:
    """The JWT in ``path``, if it is one and has not expired (``exp`` against ``now``, less
    ``EXPIRY_MARGIN``). Its signature is the IdP's to check; this only spares the IdP a dead one."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE + 1)
    except FileNotFoundError:
        raise AssertionFileProblem(
            f"the client assertion file {path} does not exist (the agent that writes it: kubelet's projected "
            "service account token, the SPIRE agent, the CI runner; check it runs)"
        ) from None
    except OSError as exc:
        raise AssertionFileProblem(f"the client assertion file {path} cannot be read: {exc.strerror}") from None
    if len(raw) > MAX_FILE:
        raise AssertionFileProblem(f"the client assertion file {path} is larger than {MAX_FILE} bytes: not a JWT")
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        text = ""
    found = jwt_claims(text) if text else None
    if found is None:
        what = "is empty" if not raw.strip() else "does not hold a JWT"
        raise AssertionFileProblem(f"the client assertion file {path} {what}")
    exp = found.get("exp")
    if isinstance(exp, int | float) and not isinstance(exp, bool) and exp - EXPIRY_MARGIN <= now:
        raise AssertionFileProblem(
            f"the JWT in the client assertion file {path} expired {max(0, now - exp):.0f} s ago (exp {exp:.0f}); "
            "the agent that writes it has not renewed it"
        )
    return text


def complete(req: HttpRequest, *, now: float, jti: str) -> HttpRequest:
    """``req`` with its client assertion made (``now``: the wall clock, unix seconds; ``jti``: fresh
    randomness), ready to send; a request without an ``AssertionNeeded`` comes back as it is."""
    need = req.assertion
    if need is None:
        return req
    if need.method == "client_assertion_file":
        assert need.path is not None
        assertion = read_file_assertion(need.path, now=now)
    else:
        assertion = signed(need, now=now, jti=jti, use_next=need.use_next)
    return dataclasses.replace(req, form={**req.form, "client_assertion": assertion}, assertion=None)


def file_expiry(path: str) -> float | None:
    """When the JWT in an assertion file expires (its ``exp``), for ``status``; None if unknown."""
    try:
        with open(path, "rb") as f:
            found = jwt_claims(f.read(MAX_FILE).decode("ascii", "replace").strip())
    except OSError:
        return None
    exp = found.get("exp") if found else None
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


def public_jwks(keys: clientkeys.KeySet) -> str:
    """The key set's public JWKS as people paste it (indented JSON)."""
    return json.dumps(keys.public_jwks(), indent=2)


def status(profile: Profile, client_keys: Secret | Unknown | None, wall: float) -> dict[str, Any]:
    """What ``status`` shows of how a profile's client authenticates (never a secret): the method;
    for private_key_jwt the keys' ``kid`` and algorithm (which signs, which is next) and the public
    JWKS; for tls_client_auth the certificate, its subject and expiry; for client_assertion_file the
    file and its JWT's expiry. ``client_keys``: the stored key set, or ``UNKNOWN`` (vault locked)."""
    out: dict[str, Any] = {"method": profile.auth_method}
    if profile.auth_method == "private_key_jwt":
        if isinstance(client_keys, Unknown):
            out["keys"] = None
            return out
        try:
            keys = clientkeys.key_set_of(client_keys)
        except clientkeys.KeySetCorrupt:
            keys = None
        if keys is not None:
            shown = [("active", keys.active)] + ([("next", keys.next)] if keys.next is not None else [])
            out["keys"] = [
                {"kid": k.kid, "alg": k.alg, "state": state, "created_at": k.created_at} for state, k in shown
            ]
            out["jwks"] = keys.public_jwks()
        else:
            out["keys"] = []
    elif profile.auth_method == "tls_client_auth" and profile.client_cert is not None:
        out["cert"] = profile.client_cert
        try:
            info = cert_info(profile.client_cert)
        except (OSError, ValueError):
            out["cert_expires_in"] = None
        else:
            out["cert_subject"] = info.subject
            out["cert_expires_in"] = round(info.not_after - wall)
    elif profile.auth_method == "client_assertion_file" and profile.assertion_file is not None:
        out["assertion_file"] = profile.assertion_file
        exp = file_expiry(profile.assertion_file)
        out["assertion_expires_in"] = None if exp is None else round(exp - wall)
    return out


class Unknown:
    """The stored key set could not be read (the vault is locked)."""


UNKNOWN: Final = Unknown()
