"""`dc-token PROFILE --id-token` (issue 25): the login's ID token in every output form, kubectl's
ExecCredential among them (and kubectl itself sending it); a clear error when the login has none;
offline logins (`dc-broker add --offline`) and how status shows them. Real processes: the dev IdP
(Keycloak's answers: an ``id_token`` when the scope has ``openid``) and `dc-broker run`."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import DC_BROKER, DC_TOKEN, dc_token, dev_idp, start_run, stop, wait_for_socket

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


class _ApiServer:
    """An https server standing in for a Kubernetes API server: it records each request's
    Authorization header and answers ``ok`` (all `kubectl get --raw` needs)."""

    def __init__(self, tmp: Path) -> None:
        import http.server
        import ssl
        import threading

        from tests.tls import make_tls

        self.ca, cert, key = make_tls(tmp)
        self.seen: list[str] = []
        seen = self.seen

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append(self.headers.get("Authorization", ""))
                body = b"ok\n"
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed (the python image has it)")
def test_kubectl_sends_the_id_token_from_the_exec_credential(tmp_path: Path) -> None:
    """kubectl's client-go runs `dc-token PROFILE --id-token --exec-credential` as its credential
    plugin and sends the ID token as the bearer token to an https API server."""
    with dev_idp() as idp:
        cfg = tmp_path / "config.toml"
        cfg.write_text(
            f'[profiles.k8s]\nserver = "{idp}"\ntenant = "demo"\nclient_id = "dc-cli"\nusername = "demo"\n'
            'scope = "openid"\n'
        )
        sock = str(tmp_path / "run" / "broker.sock")
        proc = start_run(cfg, sock, '[k8s]\npassword = "demo"\nclient_secret = "dc-cli-secret"\n')
        api = _ApiServer(tmp_path)
        try:
            kubeconfig = tmp_path / "kubeconfig"
            kubeconfig.write_text(
                json.dumps(
                    {
                        "apiVersion": "v1",
                        "kind": "Config",
                        "clusters": [{"name": "c", "cluster": {"server": api.url, "certificate-authority": api.ca}}],
                        "users": [
                            {
                                "name": "u",
                                "user": {
                                    "exec": {
                                        "apiVersion": "client.authentication.k8s.io/v1",
                                        "command": DC_TOKEN,
                                        "args": ["k8s", "--id-token", "--exec-credential", "--socket", sock],
                                        "interactiveMode": "Never",
                                    }
                                },
                            }
                        ],
                        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                        "current-context": "x",
                    }
                )
            )
            env = {**os.environ, "KUBECONFIG": str(kubeconfig), "HOME": str(tmp_path)}
            done = subprocess.run(
                ["kubectl", "get", "--raw", "/api/dc-check"], capture_output=True, text=True, env=env, timeout=60
            )
            assert (done.returncode, done.stdout) == (0, "ok\n"), done.stderr
            id_token = dc_token(sock, "k8s", "--id-token").stdout.strip()
            assert api.seen and set(api.seen) == {f"Bearer {id_token}"}  # every request kubectl made
            assert claims(id_token)["typ"] == "ID"
        finally:
            api.close()
            assert stop(proc) == 0


def test_an_offline_login_is_added_and_shown_without_an_end(tmp_path: Path) -> None:
    """`dc-broker add --offline`: offline_access (and openid) in the scope, checked at the IdP; status
    shows the login as offline, with no end (Keycloak's refresh_expires_in 0)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DC_BROKER_")}
    sock = str(tmp_path / "run" / "broker.sock")
    env.update(XDG_CONFIG_HOME=str(tmp_path / "config"), XDG_DATA_HOME=str(tmp_path / "data"), DC_BROKER_SOCKET=sock)

    def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([DC_BROKER, *args], input=stdin, capture_output=True, text=True, env=env, timeout=60)

    assert cli("init", "--key-source", "keyfile", "--key-file", str(tmp_path / "key")).returncode == 0
    with dev_idp() as idp:
        common = ("--server", idp, "--tenant", "demo", "--client-id", "dc-cli")
        added = cli("add", "off", *common, "--username", "demo", "--scope", "profile", "--offline",
                    "--password-stdin", "--secret-stdin", stdin="demo\ndc-cli-secret\n")  # fmt: skip
        assert added.returncode == 0, added.stderr
        assert (
            'scope = "profile openid offline_access"' in (tmp_path / "config" / "dc-broker" / "config.toml").read_text()
        )
        refused = cli("add", "svc", *common, "--grant", "client_credentials", "--offline", "--secret-stdin",
                      stdin="dc-cli-secret\n")  # fmt: skip
        assert refused.returncode == 2 and "--offline is for a user's login" in refused.stderr
        daemon = subprocess.Popen(
            [DC_BROKER, "run"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            wait_for_socket(sock, daemon)
            assert dc_token(sock, "off").returncode == 0
            entry = json.loads(cli("status", "--json", "off").stdout)["profiles"][0]
            assert entry["offline"] is True and entry["login_ends_in"] is None and entry["login_end_final"] is False
            table = cli("status").stdout.splitlines()
            assert table[1].split()[:4] == ["PROFILE", "STATE", "EXPIRES", "IN"]
            assert table[2].split()[0] == "off" and " offline " in table[2]
        finally:
            assert stop(daemon) == 0
