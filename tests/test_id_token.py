"""`dc-token PROFILE --id-token` (issue 25): the login's ID token in every output form, kubectl's
ExecCredential among them; a clear error when the login has none. Real processes: the dev IdP
(Keycloak's answers: an ``id_token`` when the scope has ``openid``) and `dc-broker run`."""

from __future__ import annotations

import base64
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import DC_TOKEN, dc_token, dev_idp, start_run, stop

pytestmark = pytest.mark.e2e


def claims(jwt: str) -> dict[str, Any]:
    part = jwt.split(".")[1]
    doc: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return doc


def test_id_token_in_every_form(tmp_path: Path) -> None:
    with dev_idp() as idp:
        cfg = tmp_path / "config.toml"
        cfg.write_text(
            f'[profiles.oidc]\nserver = "{idp}"\ntenant = "demo"\nclient_id = "dc-cli"\nusername = "demo"\n'
            'scope = "openid profile"\n'
            f'[profiles.plain]\nserver = "{idp}"\ntenant = "demo"\nclient_id = "dc-cli"\nusername = "demo"\n'
            'scope = "profile"\n'
        )
        secrets = '[oidc]\npassword = "demo"\nclient_secret = "dc-cli-secret"\n'
        secrets += '[plain]\npassword = "demo"\nclient_secret = "dc-cli-secret"\n'
        sock = str(tmp_path / "run" / "broker.sock")
        proc = start_run(cfg, sock, secrets)
        try:
            access = dc_token(sock, "oidc").stdout.strip()
            plain = dc_token(sock, "oidc", "--id-token")
            assert plain.returncode == 0, plain.stderr
            id_token = plain.stdout.strip()
            assert id_token != access
            said = claims(id_token)
            assert said["typ"] == "ID" and said["aud"] == "dc-cli" and said["azp"] == "dc-cli"
            assert claims(access)["typ"] == "Bearer"

            doc = json.loads(dc_token(sock, "oidc", "--id-token", "--json").stdout)
            assert set(doc) == {"id_token", "expires_at", "expires_in", "profile"}
            assert doc["id_token"] == id_token and doc["profile"] == "oidc"
            assert doc["expires_at"] <= said["exp"] and 0 < doc["expires_in"] <= said["exp"] - time.time() + 1

            header = dc_token(sock, "oidc", "--id-token", "--header").stdout
            assert header == f"Authorization: Bearer {id_token}\n"

            cred = json.loads(dc_token(sock, "oidc", "--id-token", "--exec-credential").stdout)
            assert cred["apiVersion"] == "client.authentication.k8s.io/v1" and cred["kind"] == "ExecCredential"
            assert cred["status"]["token"] == id_token
            stamp = time.mktime(time.strptime(cred["status"]["expirationTimestamp"], "%Y-%m-%dT%H:%M:%SZ"))
            assert stamp - time.timezone < said["exp"]  # reported before the ID token really expires

            missing = dc_token(sock, "plain", "--id-token")
            assert (missing.returncode, missing.stdout) == (13, "")
            assert missing.stderr == (  # the scope as the IdP granted it (Keycloak adds its defaults)
                "dc-token: profile 'plain' has no ID token: its login's scope 'profile email' lacks 'openid'; add it "
                '(`dc-broker set plain scope="openid ..."`): the next login brings an ID token\n'
            )
            both = subprocess.run(
                [DC_TOKEN, "--socket", sock, "oidc", "--id-token", "--scope", "profile"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert both.returncode == 2 and "--id-token and --scope are alternatives" in both.stderr
        finally:
            assert stop(proc) == 0
