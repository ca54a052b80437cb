# ruff: noqa: F811 - the home fixture comes from tests.test_cli
"""No client secret on the box (issue 26), end to end: real `dc-broker` and `dc-token` processes, the
dev IdP as its own process (https with a client CA for mTLS), the vault on disk. Each method: added,
registered at the IdP the way a person would (the dev admin API stands in for Keycloak's admin
console), tokens, refreshes, refusals with their exit codes, logout; private_key_jwt's key rotation
with callers asking all along; and a grep of every file and output for the private key's bytes."""

from __future__ import annotations

import base64
import datetime
import json
import re
import secrets
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dc_broker.idp import assertions, clientkeys, oidc
from dc_broker.vault import Vault
from tests.e2e import DC_BROKER, dc_token, dev_idp, idp_stats, stop, wait_for, wait_for_socket
from tests.test_cli import cli, home, init_keyfile  # noqa: F401 - the home fixture
from tests.tls import make_tls

pytestmark = pytest.mark.e2e


def register(base: str, **client: Any) -> None:
    """What a person does in Keycloak's admin console (the client's Credentials and Keys tabs)."""
    answer = httpx.post(f"{base}/_dev/realms/demo/clients", json=client, timeout=30, verify=False)
    assert answer.status_code == 200, answer.text


def printed_jwks(stdout: str) -> dict[str, Any]:
    """The JWKS `add` / `rotate --key` printed (the JSON object after the "Register" line)."""
    start = stdout.index("{", stdout.index("Register this public JWKS"))
    jwks, _ = json.JSONDecoder().raw_decode(stdout[start:])
    assert set(jwks) == {"keys"}
    return jwks


class Recorded:
    """`dc-broker` (``run``) and `dc-token` (``token``) as a test that looks for a secret in every
    output at its end runs them: each one's stdout and stderr are kept in ``outputs``."""

    def __init__(self, home: dict[str, str]) -> None:
        self.home = home
        self.outputs: list[str] = []

    def run(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return self._kept(cli(self.home, *args, stdin=stdin))

    def token(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self._kept(dc_token(self.home["DC_BROKER_SOCKET"], *args))

    def _kept(self, done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
        self.outputs.extend((done.stdout, done.stderr))
        return done


def grants(base: str, grant: str) -> int:
    """How many token requests of ``grant`` the dev IdP at ``base`` has answered."""
    return int(idp_stats(base)["token_requests"].get(grant, 0))


class Callers:
    """`dc-token PROFILE --min-ttl N` in a loop on its own thread: every exit status, until stopped
    (and every output, into ``outputs`` when given: the key grep reads them)."""

    def __init__(self, sock: str, profile: str, min_ttl: str, outputs: list[str] | None = None) -> None:
        self.codes: list[int] = []
        self.errors: list[str] = []
        self.outputs = outputs if outputs is not None else []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(sock, profile, min_ttl), daemon=True)
        self._thread.start()

    def _run(self, sock: str, profile: str, min_ttl: str) -> None:
        while not self._stop.is_set():
            done = dc_token(sock, profile, "--min-ttl", min_ttl)
            self.outputs.extend((done.stdout, done.stderr))
            self.codes.append(done.returncode)
            if done.returncode:
                self.errors.append(done.stderr)
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


@pytest.mark.slow
def test_private_key_jwt_from_add_to_logout_with_a_rotation_no_caller_notices(
    home: dict[str, str], tmp_path: Path
) -> None:
    recorded = Recorded(home)
    run, token, outputs = recorded.run, recorded.token, recorded.outputs

    sock = home["DC_BROKER_SOCKET"]
    vault_path = home["XDG_DATA_HOME"] + "/dc-broker/vault.db"
    with dev_idp("--access-lifespan", "6") as base:
        init_keyfile(home, tmp_path)
        added = run("add", "acme", "--server", base, "--tenant", "demo", "--no-legacy-paths", "--client-id",
                    "dc-cli", "--username", "demo", "--password-stdin", "--auth-method", "private_key_jwt",
                    stdin="demo\n")  # fmt: skip
        assert added.returncode == 0, added.stderr
        assert added.stdout.startswith("Added profile acme (") and "its private key is in the vault, never shown" in (
            added.stdout
        )
        first = printed_jwks(added.stdout)
        (key,) = first["keys"]
        assert key["kty"] == "EC" and key["alg"] == "ES256" and "d" not in key
        # the key `add` made (in this CLI process: no broker runs), as the vault holds it: the grep
        # at the end looks for it too, not only for the key that signs last
        with Vault.open(vault_path, auto_unlock=True) as vault:
            made_by_add = clientkeys.KeySet.from_secret(vault.credentials("acme").client_keys)  # type: ignore[arg-type]
        assert made_by_add.active.kid == key["kid"] and made_by_add.next is None
        # the client uses Signed JWT, but its key is not imported yet: refused, exit 8, and what to do
        register(base, client_id="dc-cli", auth="client-jwt", jwks={"keys": []})
        refused = run("keys", "acme", "--check")
        assert refused.returncode == 8, refused.stderr
        assert "Unable to load public key" in refused.stderr and "dc-broker keys acme --jwks" in refused.stderr
        register(base, client_id="dc-cli", auth="client-jwt", jwks=first)
        checked = run("keys", "acme", "--check")
        assert checked.returncode == 0 and "accepts client dc-cli" in checked.stdout, checked.stderr
        # an assertion is single-use: the IdP (a process of its own, as Keycloak is) takes it once,
        # and refuses it sent again as Keycloak does
        token_url = f"{base}/realms/demo/protocol/openid-connect/token"
        once = assertions.sign_with_key(
            made_by_add.active, assertions.claims("dc-cli", token_url, now=time.time(), jti=secrets.token_urlsafe(24))
        )
        form = {"grant_type": "refresh_token", "refresh_token": "not-one-the-idp-issued",
                "client_assertion_type": oidc.JWT_BEARER, "client_assertion": once}  # fmt: skip
        first_use = httpx.post(token_url, data=form, timeout=30)
        assert first_use.status_code == 400 and first_use.json()["error"] == "invalid_grant", first_use.text
        replayed = httpx.post(token_url, data=form, timeout=30)
        assert (replayed.status_code, replayed.json()) == (
            400,
            {"error": "invalid_client", "error_description": "Token reuse detected"},
        )
        listed = run("keys", "acme", "--jwks")
        assert json.loads(listed.stdout) == first

        daemon = subprocess.Popen(
            [DC_BROKER, "run"], env=home, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            wait_for_socket(sock, daemon)
            before_login = grants(base, "refresh_token")  # the checks above: a refresh grant each
            first_token = token("acme")
            assert first_token.returncode == 0, first_token.stderr
            # a refresh with the refresh token, its client authenticated by a new assertion
            wait_for(lambda: grants(base, "refresh_token") > before_login, 30, "a refresh")
            logins = grants(base, "password")
            assert logins == 1  # the one login; from here on only refreshes
            # rotation while callers ask for tokens at least 5 s fresh (a refresh at least every second)
            callers = Callers(sock, "acme", "5", outputs)
            try:
                wait_for(lambda: len(callers.codes) >= 3, 30, "callers under way")
                made = run("rotate", "acme", "--key", "--key-type", "rsa")
                assert made.returncode == 0, made.stderr
                both = printed_jwks(made.stdout)
                assert both["keys"][0]["kid"] == key["kid"] and both["keys"][1]["kty"] == "RSA"
                assert "it still signs with key " + key["kid"] in made.stdout
                early = run("rotate", "acme", "--key", "--activate")  # the IdP does not know it yet
                assert early.returncode == 8 and "nothing changed" in early.stderr, early.stderr
                register(base, client_id="dc-cli", auth="client-jwt", jwks=both)
                activated = run("rotate", "acme", "--key", "--activate")
                assert activated.returncode == 0, activated.stderr
                new_kid = both["keys"][1]["kid"]
                assert f"now signs with key {new_kid} (accepted by the identity provider)" in activated.stdout
                register(base, client_id="dc-cli", auth="client-jwt", jwks={"keys": [both["keys"][1]]})
                before = grants(base, "refresh_token")
                wait_for(lambda: grants(base, "refresh_token") >= before + 2, 30, "refreshes signed with the new key")
            finally:
                callers.stop()
            assert callers.codes and set(callers.codes) == {0}, callers.errors[:3]
            # every token the callers got came from a refresh: a refresh the IdP refused would have
            # fallen back to a password login, unseen by the callers
            assert grants(base, "password") == logins
            shown = json.loads(run("keys", "acme", "--jwks").stdout)
            assert shown == {"keys": [both["keys"][1]]}
            status = json.loads(run("status", "--json", "acme").stdout)
            assert status["profiles"][0]["client_auth"]["keys"][0]["kid"] == new_kid
            # a key the IdP no longer has: refused with exit 8 and the fix, by the broker's check...
            stranger = clientkeys.KeySet(clientkeys.generate("ec", now=time.time())).public_jwks()
            register(base, client_id="dc-cli", auth="client-jwt", jwks=stranger)
            wrong = run("keys", "acme", "--check")
            assert wrong.returncode == 8, wrong.stderr
            assert wrong.stderr.startswith(
                "Error: profile 'acme': the identity provider refuses client 'dc-cli' (HTTP 400: invalid_client: "
                "Unable to load public key); check that the identity provider has this profile's public key"
            )
            # ... and by dc-token once the token it had is gone
            refused_token = wait_for(
                lambda: (r := token("acme", "--min-ttl", "5")).returncode == 8 and r, 30, "dc-token refused"
            )
            assert "Unable to load public key" in refused_token.stderr
            register(base, client_id="dc-cli", auth="client-jwt", jwks={"keys": [both["keys"][1]]})
            assert run("keys", "acme", "--check").returncode == 0  # and the profile tries again at once
            assert wait_for(lambda: token("acme").returncode == 0, 30, "a token again")
            logout = run("logout", "acme")
            assert logout.returncode == 0, logout.stderr
            assert "its session at the identity provider ended" in logout.stdout
            # the key stays after a logout: it is who the client is, not a login
            assert json.loads(run("keys", "acme", "--jwks").stdout) == {"keys": [both["keys"][1]]}
        finally:
            stop(daemon)
            assert daemon.stdout is not None and daemon.stderr is not None
            outputs.extend((daemon.stdout.read(), daemon.stderr.read()))

    with Vault.open(vault_path, auto_unlock=True) as vault:
        last = clientkeys.KeySet.from_secret(vault.credentials("acme").client_keys)  # type: ignore[arg-type]
    assert last.active.kid == new_kid and made_by_add.active.kid != new_kid
    assert_nowhere([made_by_add, last], [*tmp_path.rglob("*")], outputs)


def key_forms(key_sets: list[clientkeys.KeySet]) -> list[bytes]:
    """The private keys' bytes as PEM, as DER and as the raw private number, each also base64'd."""
    forms = []
    for key in [k for keys in key_sets for k in (keys.active, keys.next) if k is not None]:
        private = key.private_key()
        der = private.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        number = private.private_numbers()
        raw = number.private_value if isinstance(number, ec.EllipticCurvePrivateNumbers) else number.d
        raw_bytes = raw.to_bytes((raw.bit_length() + 7) // 8, "big")
        body = "".join(key.pem.reveal().splitlines()[1:-1]).encode()
        forms += [key.pem.reveal().encode(), body, der, raw_bytes, base64.b64encode(der)]
        forms += [base64.urlsafe_b64encode(raw_bytes).rstrip(b"="), raw_bytes.hex().encode()]
    return forms


def assert_nowhere(key_sets: list[clientkeys.KeySet], files: list[Path], outputs: list[str]) -> None:
    forms = key_forms(key_sets)
    checked = 0
    for path in files:
        if path.is_file():
            data = path.read_bytes()
            checked += 1
            assert not [f for f in forms if f in data], f"the private key is in {path}"
    for text in outputs:
        assert not [f for f in forms if f in text.encode()], "the private key is in an output"
    assert checked >= 3 and len(outputs) >= 20  # the vault, the config, the key file; every command's output


# ---------------------------------------------------------------- tls_client_auth


class ClientCA:
    """A client CA that signs client certificates (what the IdP's truststore trusts)."""

    def __init__(self, tmp: Path) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dc-broker client CA")])
        self.path = str(tmp / "client-ca.pem")
        Path(self.path).write_bytes(self._signed(self.name, self.key.public_key(), True, 1).public_bytes(PEM))

    def _signed(self, name: x509.Name, public: Any, ca: bool, days: float) -> x509.Certificate:
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder().subject_name(name).issuer_name(self.name).public_key(public)
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )  # fmt: skip

    def issue(self, subject: str, *, days: float = 30, name: str = "client") -> tuple[str, str]:
        """A certificate for CN=``subject``: (cert.pem, key.pem)."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._signed(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]), key.public_key(), False, days
        )
        paths = (self.tmp / f"{name}.pem", self.tmp / f"{name}.key")
        paths[0].write_bytes(cert.public_bytes(PEM))
        paths[1].write_bytes(key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        paths[1].chmod(0o600)
        return str(paths[0]), str(paths[1])


PEM = serialization.Encoding.PEM


def test_tls_client_auth_presents_the_certificate_and_a_wrong_one_is_refused(
    home: dict[str, str], tmp_path: Path
) -> None:
    ca, server_cert, server_key = make_tls(tmp_path)
    clients = ClientCA(tmp_path / "clients")
    client_ca = clients.path
    cert, key = clients.issue("dc-mtls")
    sock = home["DC_BROKER_SOCKET"]
    with dev_idp("--certfile", server_cert, "--keyfile", server_key, "--client-ca", client_ca) as base:
        assert base.startswith("https://")
        httpx.post(f"{base}/_dev/realms/demo/clients", json={"client_id": "dc-mtls", "auth": "client-x509",
                   "subject_dn": "CN=dc-mtls", "service_account_roles": ["dc-api"]}, verify=ssl.create_default_context(cafile=ca), timeout=30)  # fmt: skip
        init_keyfile(home, tmp_path)
        added = cli(home, "add", "mtls", "--server", base, "--tenant", "demo", "--no-legacy-paths", "--client-id",
                    "dc-mtls", "--grant", "client_credentials", "--auth-method", "tls_client_auth", "--ca-bundle", ca,
                    "--client-cert", cert, "--client-key", key)  # fmt: skip
        assert added.returncode == 0, added.stderr  # checked at the IdP with a real grant first
        assert "secrets are in the vault" in added.stdout
        daemon = subprocess.Popen(
            [DC_BROKER, "run"], env=home, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            wait_for_socket(sock, daemon)
            token = dc_token(sock, "mtls")
            assert token.returncode == 0, token.stderr
            row = json.loads(cli(home, "status", "--json", "mtls").stdout)["profiles"][0]
            assert row["client_auth"]["cert_subject"] == "CN=dc-mtls"
            assert 29 * 86400 < row["client_auth"]["cert_expires_in"] <= 30 * 86400
            shown = cli(home, "status", "mtls").stdout
            assert re.search(r"mtls: client certificate .*client\.pem \(CN=dc-mtls\) expires in 29d", shown), shown
            # logout: the revocation presents the certificate too (without it the IdP would refuse the
            # client, and the login would be "forgotten" unconfirmed, not revoked)
            logged_out(home, sock, "mtls", "its client certificate")
            # a certificate of another subject, from the same CA (put into the same files, as a renewal
            # would): the broker presents the new one at once, and the IdP refuses it: exit 8
            other_cert, other_key = clients.issue("someone-else", name="other")
            Path(key).write_bytes(Path(other_key).read_bytes())
            Path(cert).write_bytes(Path(other_cert).read_bytes())
            refused = cli(home, "keys", "mtls", "--check")
            assert refused.returncode == 8, refused.stderr
            assert (
                "(HTTP 401: invalid_client: Invalid client or Invalid client credentials); check that the identity "
                f"provider accepts the certificate {cert}" in refused.stderr
            )
        finally:
            stop(daemon)


def test_a_client_certificate_about_to_expire_is_warned_about(home: dict[str, str], tmp_path: Path) -> None:
    ca, server_cert, server_key = make_tls(tmp_path)
    clients = ClientCA(tmp_path / "clients")
    client_ca = clients.path
    cert, key = clients.issue("dc-mtls", days=3)
    sock = home["DC_BROKER_SOCKET"]
    with dev_idp("--certfile", server_cert, "--keyfile", server_key, "--client-ca", client_ca) as base:
        httpx.post(f"{base}/_dev/realms/demo/clients", json={"client_id": "dc-mtls", "auth": "client-x509",
                   "subject_dn": "CN=dc-mtls", "service_account_roles": ["dc-api"]}, verify=ssl.create_default_context(cafile=ca), timeout=30)  # fmt: skip
        init_keyfile(home, tmp_path)
        assert cli(home, "add", "mtls", "--server", base, "--tenant", "demo", "--no-legacy-paths", "--client-id",
                   "dc-mtls", "--grant", "client_credentials", "--auth-method", "tls_client_auth", "--ca-bundle", ca,
                   "--client-cert", cert, "--client-key", key, "--no-verify").returncode == 0  # fmt: skip
        daemon = subprocess.Popen(
            [DC_BROKER, "run"], env=home, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            wait_for_socket(sock, daemon)
            assert dc_token(sock, "mtls").returncode == 0
            shown = cli(home, "status", "mtls").stdout
            assert "expires in 2d" in shown and "renew it" in shown, shown
        finally:
            stop(daemon)
        assert daemon.stderr is not None
        assert re.search(
            r"the client certificate \S+client\.pem \(CN=dc-mtls\) expires at .* renew it", daemon.stderr.read()
        )


# ---------------------------------------------------------------- client_assertion_file (federated)


def federated_token(issuer_key: clientkeys.ClientKey, issuer: str, audience: str, *, lifetime: int) -> str:
    now = time.time()
    claims = {"iss": issuer, "sub": "system:serviceaccount:apps:reporter", "aud": audience,
              "iat": int(now), "exp": int(now) + lifetime, "jti": str(now)}  # fmt: skip
    return assertions.sign_with_key(issuer_key, claims)


def test_a_federated_assertion_file_is_read_for_each_request_and_an_expired_one_is_named(
    home: dict[str, str], tmp_path: Path
) -> None:
    cluster = clientkeys.generate("rsa", now=time.time())
    issuer = "https://kubernetes.default.svc"
    token_file = tmp_path / "sa" / "token"
    token_file.parent.mkdir()
    sock = home["DC_BROKER_SOCKET"]
    with dev_idp("--access-lifespan", "5") as base:
        realm_issuer = f"{base}/realms/demo"
        jwks = clientkeys.KeySet(cluster).public_jwks()
        assert httpx.post(f"{base}/_dev/realms/demo/trusted-issuers", json={"issuer": issuer, "jwks": jwks}).is_success
        register(base, client_id="reporter", auth="federated-jwt", federated_issuer=issuer,
                 federated_subject="system:serviceaccount:apps:reporter", service_account_roles=["dc-api"])  # fmt: skip
        token_file.write_text(federated_token(cluster, issuer, realm_issuer, lifetime=600))
        init_keyfile(home, tmp_path)
        added = cli(home, "add", "fed", "--server", base, "--tenant", "demo", "--no-legacy-paths", "--client-id",
                    "reporter", "--grant", "client_credentials", "--auth-method", "client_assertion_file",
                    "--assertion-file", str(token_file))  # fmt: skip
        assert added.returncode == 0, added.stderr
        daemon = subprocess.Popen(
            [DC_BROKER, "run"], env=home, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            wait_for_socket(sock, daemon)
            assert dc_token(sock, "fed").returncode == 0
            # status shows the file and when the JWT in it expires (not the JWT)
            auth = json.loads(cli(home, "status", "--json", "fed").stdout)["profiles"][0]["client_auth"]
            left = auth.pop("assertion_expires_in")
            assert auth == {"method": "client_assertion_file", "assertion_file": str(token_file)}
            assert 500 < left <= 600
            shown = cli(home, "status", "fed").stdout
            assert re.search(
                rf"^fed: client assertion file {re.escape(str(token_file))} expires in 9m\d\ds$", shown, re.M
            )
            assert token_file.read_text() not in shown
            # the kubelet renews the file: the next grant presents the new one
            token_file.write_text(federated_token(cluster, issuer, realm_issuer, lifetime=900))
            before = grants(base, "client_credentials")
            wait_for(lambda: grants(base, "client_credentials") > before, 30, "a new grant")
            assert dc_token(sock, "fed").returncode == 0
            # an expired one is not sent: the error names the file (and the broker keeps trying)
            token_file.write_text(federated_token(cluster, issuer, realm_issuer, lifetime=-60))
            failed = wait_for(
                lambda: (r := dc_token(sock, "fed", "--min-ttl", "4")).returncode == 7 and r, 30, "a named failure"
            )
            assert f"the JWT in the client assertion file {token_file} expired" in failed.stderr
            token_file.write_text(federated_token(cluster, issuer, realm_issuer, lifetime=600))
            assert wait_for(lambda: dc_token(sock, "fed").returncode == 0, 30, "a token after the renewal")
            # a token another issuer signed: refused as Keycloak does
            stranger = clientkeys.generate("rsa", now=time.time())
            token_file.write_text(federated_token(stranger, issuer, realm_issuer, lifetime=600))
            refused = cli(home, "keys", "fed", "--check")
            assert refused.returncode == 8, refused.stderr
            assert "HTTP 401: invalid_client: Invalid client or Invalid client credentials" in refused.stderr
            # logout: the revocation is authenticated by the file's assertion as well
            token_file.write_text(federated_token(cluster, issuer, realm_issuer, lifetime=600))
            assert wait_for(lambda: dc_token(sock, "fed").returncode == 0, 30, "a token with the issuer's JWT again")
            logged_out(home, sock, "fed", "its client assertion file")
        finally:
            stop(daemon)


def logged_out(home: dict[str, str], sock: str, profile: str, with_what: str) -> None:
    """`dc-broker logout` of a client_credentials profile with no secret (a certificate, an assertion
    file): the IdP revokes the token (so it took the client's authentication), nothing secret is
    forgotten (the certificate or file is who the client is), the profile waits for a new login, and
    `dc-broker login` is how it gets one, with what it authenticates with."""
    logout = cli(home, "logout", profile)
    assert (logout.returncode, logout.stderr) == (0, ""), logout.stderr
    assert logout.stdout == (
        f"Logged out of profile {profile}: its login revoked at the identity provider, its token forgotten "
        f"(`dc-broker login {profile}` signs in again).\n"
    )
    row = json.loads(cli(home, "status", "--json", profile).stdout)["profiles"][0]
    assert (row["state"], row["expires_in"]) == ("login_required", None)
    why = f"profile {profile!r}: logged out; `dc-broker login {profile}` signs in again with {with_what}"
    assert row["last_error"] == why
    refused = dc_token(sock, profile)  # no token after a logout, and none made behind its back
    assert (refused.returncode, refused.stderr) == (5, f"dc-token: {why}\n")
    login = cli(home, "login", profile)
    assert (login.returncode, login.stderr) == (0, ""), login.stderr
    assert login.stdout.startswith(f"Logged in: profile {profile} has a token for ")
    assert dc_token(sock, profile).returncode == 0
    again = cli(home, "login", profile)  # while it has a login: nothing to do
    assert again.stdout == (
        f"Profile {profile} uses client credentials: the broker signs in with {with_what}, so there is nothing "
        "to log in.\n"
    )


# ---------------------------------------------------------------- client_secret_jwt

CLIENT_SECRET = "dc-cli-secret-of-thirty-two-bytes-or-more"


@pytest.mark.slow
def test_client_secret_jwt_from_add_to_logout_and_a_wrong_secret_is_refused(
    home: dict[str, str], tmp_path: Path
) -> None:
    """The secret signs an HS256 assertion and never crosses the network: add (checked with a real
    login), token, refresh, the IdP's secret changed (exit 8 and Keycloak's words), the new secret
    rotated in, logout."""
    recorded = Recorded(home)
    run, token, outputs = recorded.run, recorded.token, recorded.outputs

    sock = home["DC_BROKER_SOCKET"]
    new_secret = "the-rotated-secret-of-thirty-two-bytes"
    refused_words = (
        "(HTTP 400: invalid_client: Client authentication with client secret signed JWT failed: Signature on JWT "
        "token by client secret failed validation)"
    )
    with dev_idp("--access-lifespan", "6") as base:
        register(base, client_id="dc-cli", auth="client-secret-jwt", secret=CLIENT_SECRET)
        init_keyfile(home, tmp_path)
        added = run("add", "acme", "--server", base, "--tenant", "demo", "--no-legacy-paths", "--client-id", "dc-cli",
                    "--username", "demo", "--password-stdin", "--secret-stdin", "--auth-method", "client_secret_jwt",
                    stdin=f"demo\n{CLIENT_SECRET}\n")  # fmt: skip
        assert added.returncode == 0, added.stderr  # checked at the IdP with a login first
        assert added.stdout.startswith("Added profile acme (") and "secrets are in the vault" in added.stdout
        assert grants(base, "password") == 1
        daemon = subprocess.Popen(
            [DC_BROKER, "run"], env=home, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            wait_for_socket(sock, daemon)
            first = token("acme")
            assert first.returncode == 0, first.stderr
            wait_for(lambda: grants(base, "refresh_token") >= 1, 30, "a refresh")
            assert grants(base, "password") == 2  # add's check and the broker's one login; then refreshes
            # the client's secret is changed at the IdP: refused, exit 8, Keycloak's words and the fix
            register(base, client_id="dc-cli", auth="client-secret-jwt", secret=new_secret)
            wrong = run("keys", "acme", "--check")
            assert wrong.returncode == 8, wrong.stderr
            assert wrong.stderr.startswith(
                f"Error: profile 'acme': the identity provider refuses client 'dc-cli' {refused_words}; fix it at the "
                "identity provider, then run `dc-broker keys acme --check` again"
            )
            refused = wait_for(
                lambda: (r := token("acme", "--min-ttl", "5")).returncode == 8 and r, 30, "dc-token refused"
            )
            assert (
                refused.stderr.startswith(
                    f"dc-token: profile 'acme': the identity provider refuses client 'dc-cli' {refused_words}; check the "
                    "client id and secret: "
                )
                and "a wrong secret with `dc-broker rotate acme --client-secret`" in refused.stderr
            )
            rotated = run("rotate", "acme", "--client-secret", "--secret-stdin", stdin=f"{new_secret}\n")
            assert rotated.returncode == 0, rotated.stderr
            assert rotated.stdout == (
                "Rotated the client secret of profile acme (checked at the identity provider); the running broker "
                "uses it now.\n"
            )
            assert wait_for(lambda: token("acme").returncode == 0, 30, "a token with the new secret")
            logout = run("logout", "acme")
            assert logout.returncode == 0, logout.stderr
            assert logout.stdout == (
                "Logged out of profile acme: its session at the identity provider ended, its password forgotten "
                "(the client secret stays: `dc-broker login` uses it).\n"
            )
            row = json.loads(run("status", "--json", "acme").stdout)["profiles"][0]
            assert row["state"] == "login_required"
        finally:
            stop(daemon)
            assert daemon.stdout is not None and daemon.stderr is not None
            outputs.extend((daemon.stdout.read(), daemon.stderr.read()))
    # neither secret is in any file but the (encrypted) vault, nor in any output or log
    for path in tmp_path.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert CLIENT_SECRET.encode() not in data and new_secret.encode() not in data, path
    assert not [o for o in outputs if CLIENT_SECRET in o or new_secret in o]
    assert len(outputs) >= 16


# ---------------------------------------------------------------- key rotation with no broker running


def test_a_key_rotates_in_the_vault_with_no_broker_running(home: dict[str, str], tmp_path: Path) -> None:
    """`rotate --key` and `rotate --key --activate` without a broker: the vault changes, and the
    activation asks the IdP about the next key first (refused: nothing changed)."""
    with dev_idp() as base:
        init_keyfile(home, tmp_path)
        added = cli(home, "add", "svc", "--server", base, "--tenant", "demo", "--no-legacy-paths", "--client-id",
                    "svc", "--grant", "client_credentials", "--auth-method", "private_key_jwt")  # fmt: skip
        assert added.returncode == 0, added.stderr
        first = printed_jwks(added.stdout)
        register(base, client_id="svc", auth="client-jwt", jwks=first, service_account_roles=["dc-api"])
        made = cli(home, "rotate", "svc", "--key", "--key-type", "rsa")
        assert made.returncode == 0, made.stderr
        both = printed_jwks(made.stdout)
        old_kid, new_kid = first["keys"][0]["kid"], both["keys"][1]["kid"]
        assert both["keys"][0] == first["keys"][0] and both["keys"][1]["kty"] == "RSA"
        assert made.stdout.startswith(f"Made key {new_kid} for profile svc; it still signs with key {old_kid} ")
        listed = cli(home, "keys", "svc").stdout.splitlines()
        assert [line.split()[:2] for line in listed] == [[old_kid, "ES256"], [new_kid, "RS256"]]
        assert listed[0].endswith("signs") and listed[1].endswith("next: `rotate --key --activate` makes it sign")
        # the IdP has not got the next key: refused, and the vault is as it was
        early = cli(home, "rotate", "svc", "--key", "--activate")
        assert early.returncode == 8, early.stderr
        assert "Unable to load public key" in early.stderr and "nothing changed: register the JWKS" in early.stderr
        assert json.loads(cli(home, "keys", "svc", "--jwks").stdout) == both
        register(base, client_id="svc", auth="client-jwt", jwks=both, service_account_roles=["dc-api"])
        activated = cli(home, "rotate", "svc", "--key", "--activate")
        assert activated.returncode == 0, activated.stderr
        assert activated.stdout.startswith(
            f"Profile svc now signs with key {new_kid} (accepted by the identity provider); the old key is gone."
        )
        assert json.loads(cli(home, "keys", "svc", "--jwks").stdout) == {"keys": [both["keys"][1]]}
        # the IdP that knows the new key alone accepts the profile as it signs now
        register(base, client_id="svc", auth="client-jwt", jwks={"keys": [both["keys"][1]]})
        checked = cli(home, "keys", "svc", "--check")
        assert checked.returncode == 0 and "accepts client svc" in checked.stdout, checked.stderr
        assert idp_stats(base)["token_requests"] == {"refresh_token": 3}  # the checks alone: no token granted
