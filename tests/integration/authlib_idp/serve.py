"""``python -m tests.integration.authlib_idp.serve --jwks FILE --fd N``: Authlib's OAuth 2.0 server on
an inherited listening socket (``--fd``), with one user (alice / alice-password) and one client,
``svc``, that authenticates with private_key_jwt only. Its public keys are read from ``--jwks`` for
every request: writing that file is registering the client's keys. Grants: password, refresh_token
(rotating), client_credentials. Access tokens live ``--lifetime`` seconds. Tokens live in memory."""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from typing import Any

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import ClientMixin, grants
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion
from flask import Flask
from joserfc.jwk import KeySet
from werkzeug.serving import make_server

USERNAME, PASSWORD, CLIENT_ID = "alice", "alice-password", "svc"
TOKEN_PATH = "/oauth/token"
AUTH = JWTBearerClientAssertion.CLIENT_AUTH_METHOD


class Client(ClientMixin):
    def get_client_id(self) -> str:
        return CLIENT_ID

    def get_default_redirect_uri(self) -> str:
        return ""

    def get_allowed_scope(self, scope: str) -> str:
        return scope or ""

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return False

    def check_client_secret(self, client_secret: str) -> bool:
        return False  # no secret: private_key_jwt only

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == AUTH

    def check_response_type(self, response_type: str) -> bool:
        return False

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in ("password", "refresh_token", "client_credentials")


class Token:
    def __init__(self, data: dict[str, Any], user: str | None) -> None:
        self.data, self.user, self.revoked, self.issued = data, user, False, time.time()

    def check_client(self, client: Client) -> bool:
        return True

    def get_scope(self) -> str:
        return str(self.data.get("scope", ""))

    def get_expires_in(self) -> int:
        return int(self.data["expires_in"])

    def is_expired(self) -> bool:
        return False

    def is_revoked(self) -> bool:
        return self.revoked


def build(jwks_path: str, lifetime: int, audience: str) -> Flask:
    app = Flask(__name__)
    client = Client()
    by_refresh: dict[str, Token] = {}
    used_jti: set[str] = set()

    class Assertion(JWTBearerClientAssertion):
        def get_audiences(self) -> list[str]:
            return [audience]

        def validate_jti(self, claims: dict[str, Any], jti: str) -> bool:
            if jti in used_jti:
                return False
            used_jti.add(jti)
            return True

        def resolve_client_public_key(self, client: Client) -> KeySet:
            with open(jwks_path) as f:
                return KeySet.import_key_set(json.load(f))

    def save_token(token: dict[str, Any], request: Any) -> None:
        if "refresh_token" in token:
            by_refresh[token["refresh_token"]] = Token(token, getattr(request, "user", None))

    app.config["OAUTH2_REFRESH_TOKEN_GENERATOR"] = True
    app.config["OAUTH2_TOKEN_EXPIRES_IN"] = {
        "password": lifetime,
        "refresh_token": lifetime,
        "client_credentials": lifetime,
    }
    server = AuthorizationServer(
        app, query_client=lambda cid: client if cid == CLIENT_ID else None, save_token=save_token
    )
    server.register_client_auth_method(AUTH, Assertion())

    class Password(grants.ResourceOwnerPasswordCredentialsGrant):
        TOKEN_ENDPOINT_AUTH_METHODS = [AUTH]

        def authenticate_user(self, username: str, password: str) -> str | None:
            return USERNAME if (username, password) == (USERNAME, PASSWORD) else None

    class Refresh(grants.RefreshTokenGrant):
        TOKEN_ENDPOINT_AUTH_METHODS = [AUTH]
        INCLUDE_NEW_REFRESH_TOKEN = True

        def authenticate_refresh_token(self, refresh_token: str) -> Token | None:
            found = by_refresh.get(refresh_token)
            return found if found is not None and not found.revoked else None

        def authenticate_user(self, refresh_token: Token) -> str | None:
            return refresh_token.user

        def revoke_old_credential(self, refresh_token: Token) -> None:
            refresh_token.revoked = True

    class Service(grants.ClientCredentialsGrant):
        TOKEN_ENDPOINT_AUTH_METHODS = [AUTH]

    for grant in (Password, Refresh, Service):
        server.register_grant(grant)

    @app.post(TOKEN_PATH)
    def issue_token() -> Any:
        return server.create_token_response()

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jwks", required=True)
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--lifetime", type=int, default=6)
    args = parser.parse_args()
    os.environ["AUTHLIB_INSECURE_TRANSPORT"] = "1"  # plain http on loopback, as the broker allows
    listener = socket.socket(fileno=args.fd)
    port = listener.getsockname()[1]
    app = build(args.jwks, args.lifetime, f"http://127.0.0.1:{port}{TOKEN_PATH}")
    server = make_server("127.0.0.1", port, app, threaded=True, fd=args.fd)
    server.serve_forever()


if __name__ == "__main__":
    main()
