"""`dc-token --id-token` against a real third-party OpenID Connect provider: Django OAuth Toolkit
with OIDC on (issue 25). DOT, like OpenID Connect itself, sends no ID token with a password grant;
it sends one with a refresh of a login whose scope has ``openid``. So dc-token first says exactly
that (exit 10, retry), and serves the ID token once the broker's refresh brought one."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import dc_token, start_run, stop, wait_for
from tests.integration.conftest import DotServer
from tests.integration.dot_idp import PASSWORD, PASSWORD_CLIENT_ID, PASSWORD_CLIENT_SECRET, TENANT, USERNAME

pytestmark = pytest.mark.e2e


def claims(jwt: str) -> dict[str, Any]:
    part = jwt.split(".")[1]
    doc: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return doc


def test_id_token_from_django_oauth_toolkit(dot_oidc_server: DotServer, tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f'[profiles.dot]\nserver = "{dot_oidc_server.base}"\ntenant = "{TENANT}"\n'
        f'client_id = "{PASSWORD_CLIENT_ID}"\nusername = "{USERNAME}"\nscope = "openid read"\n'
    )
    secrets = f"[dot]\npassword = {json.dumps(PASSWORD)}\nclient_secret = {json.dumps(PASSWORD_CLIENT_SECRET)}\n"
    sock = str(tmp_path / "run" / "broker.sock")
    proc = start_run(cfg, sock, secrets)
    try:
        first = dc_token(sock, "dot", "--id-token")
        assert (first.returncode, first.stdout) == (10, "")
        assert first.stderr.startswith(
            "dc-token: profile 'dot' has no ID token: the identity provider sent none with its current token, "
            "though the scope has 'openid' (OpenID Connect defines none for a password or client credentials "
            "grant; some providers, Django OAuth Toolkit among them, send one with the next refresh: ask again then)"
        ), first.stderr
        got = wait_for(
            lambda: (done := dc_token(sock, "dot", "--id-token")).returncode == 0 and done, 30, "an ID token"
        )
        id_token = got.stdout.strip()  # type: ignore[union-attr]
        said = claims(id_token)
        assert said["aud"] == PASSWORD_CLIENT_ID and said["iss"].startswith(dot_oidc_server.base)
        assert said["exp"] > time.time() and "sub" in said
        header = json.loads(base64.urlsafe_b64decode(id_token.split(".")[0] + "=="))
        assert header["alg"] == "RS256"
        cred = json.loads(dc_token(sock, "dot", "--id-token", "--exec-credential", "--min-ttl", "0").stdout)
        assert cred["kind"] == "ExecCredential" and cred["status"]["token"] == id_token
        assert dc_token(sock, "dot").stdout.strip() != id_token  # the access token is another token
    finally:
        assert stop(proc) == 0
