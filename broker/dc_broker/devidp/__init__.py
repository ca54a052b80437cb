"""Internals of the development identity provider; the public entry point is ``dc_broker.devserver``.

Modules, in the direction data flows:

    realm.py      what a realm *is*: DevRealm / DevUser / DevClient, ``demo_realm()``. Plain config.
    keys.py       the per-instance RSA signing key: JWKS, sign and verify access / ID tokens.
    sessions.py   user sessions and refresh tokens: idle / max / offline expiry, rotation, reuse.
    device.py     pending device authorizations (RFC 8628): codes, polling state, slow_down.
    faults.py     fault injection (latency, status codes, hangs, malformed bodies) at the HTTP edge.
    state.py      ``IdPState``: everything one DevIdP knows, plus request counters. No HTTP.
    clientauth.py Keycloak's client authenticators beyond the secret: Signed JWT, Signed JWT with
                  client secret, X509 certificate, federated JWT; single-use jti.
    grants.py     the token endpoint's logic: client auth, a table grant_type -> handler, the
                  Keycloak error table, token responses. Pure apart from reading ``state.clock``.
    endpoints.py  the Starlette app: OIDC routes under both path prefixes, the device
                  verification page and the demo API.
    idp.py        ``DevIdP``, the object tests and ``dc-broker dev`` hold.

Nothing here may log or echo a password, client secret or token.
"""
