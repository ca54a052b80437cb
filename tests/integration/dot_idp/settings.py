"""Django settings for the DOT test IdP: everything in code, sqlite in a temp dir (``DOT_IDP_DB``), no network."""

from __future__ import annotations

import os

from tests.integration.dot_idp import ACCESS_LIFETIME

SECRET_KEY = "dot-idp-test-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
USE_TZ = True
TIME_ZONE = "UTC"

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "oauth2_provider",
]
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "tests.integration.dot_idp.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ["DOT_IDP_DB"],
        "OPTIONS": {"timeout": 10},
    }
}

# Test-speed hasher for user passwords and DOT's hashed client secrets: the default PBKDF2
# (1M rounds) costs ~0.5 s per token request, which only slows the tests down.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

OAUTH2_PROVIDER = {
    "ACCESS_TOKEN_EXPIRE_SECONDS": ACCESS_LIFETIME,
    "ROTATE_REFRESH_TOKEN": True,
    "REFRESH_TOKEN_GRACE_PERIOD_SECONDS": 0,
    "SCOPES": {"read": "Reading scope", "write": "Writing scope"},
}

if os.environ.get("DOT_IDP_OIDC") == "1":  # OpenID Connect on: ID tokens signed with a key made at start
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    _key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    OAUTH2_PROVIDER.update(
        OIDC_ENABLED=True,
        OIDC_RSA_PRIVATE_KEY=_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode(),
        SCOPES={**OAUTH2_PROVIDER["SCOPES"], "openid": "OpenID Connect"},  # type: ignore[dict-item]
        OIDC_ISS_ENDPOINT=os.environ["DOT_IDP_ISSUER"],
    )

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["stderr"], "level": "WARNING"},
}
