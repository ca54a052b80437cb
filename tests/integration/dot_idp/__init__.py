"""A minimal Django project serving Django OAuth Toolkit (DOT) at Keycloak's legacy token paths.

Only the server subprocess (``python -m tests.integration.dot_idp.serve``) imports Django; the tests
import this package for the constants below, which must therefore stay free of Django imports.

    POST /auth/realms/<tenant>/protocol/openid-connect/token    DOT's TokenView
    POST /auth/realms/<tenant>/protocol/openid-connect/revoke   DOT's RevokeTokenView
    GET  /api/hello                                              a DOT-protected resource (401 without a token)
"""

from __future__ import annotations

from typing import Final

TENANT: Final = "dot"
#: DOT's ACCESS_TOKEN_EXPIRE_SECONDS: short, so a test sees several refreshes in a few seconds, and
#: long enough that refresh-ahead (75 % +- 5 %) keeps 1.2 s or more in hand on a loaded CI machine
ACCESS_LIFETIME: Final = 6

USERNAME: Final = "alice"
PASSWORD: Final = "alice-pass word"

#: confidential client for the password grant; the secret has characters that client_secret_basic
#: must percent-encode (RFC 6749 2.3.1), so a broker that forgets to encode is caught here
PASSWORD_CLIENT_ID: Final = "dc-cli"
PASSWORD_CLIENT_SECRET: Final = "cli secret:+/&=%"

#: confidential client for the client_credentials grant (DOT: one grant type per application)
SERVICE_CLIENT_ID: Final = "dc-service"
SERVICE_CLIENT_SECRET: Final = "service-secret"

HELLO_PATH: Final = "/api/hello"


def token_path(tenant: str = TENANT) -> str:
    return f"/auth/realms/{tenant}/protocol/openid-connect/token"


def revoke_path(tenant: str = TENANT) -> str:
    return f"/auth/realms/{tenant}/protocol/openid-connect/revoke"
