"""A real OAuth 2.0 server that verifies private_key_jwt: Authlib's (``authlib.oauth2``, the
``authlib.integrations.flask_oauth2`` server) in a Flask app of about a hundred lines. Django OAuth
Toolkit, the suite's other third-party server, has no private_key_jwt (its token endpoint knows
client_secret_basic and client_secret_post only); Authlib implements RFC 7523's client assertion
(``JWTBearerClientAssertion``: signature against the client's JWKS, iss = sub, aud, exp, single-use
jti) with joserfc, a JOSE library independent of the PyJWT the broker signs with."""
