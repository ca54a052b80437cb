"""private_key_jwt against a real third-party OAuth server: Authlib's (tests/integration/authlib_idp
says why not DOT). A key made by the broker's own generator, its public JWKS registered, then the
broker's Session logs in with a password and refreshes (Authlib rotates refresh tokens), each
request authenticated by a fresh assertion that Authlib verifies with joserfc; a key it does not
have is refused; a replayed assertion is refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dc_broker.config import Profile
from dc_broker.idp import assertions, clientkeys, oidc
from dc_broker.idp.transport import IdpTransport
from dc_broker.secret import Secret
from dc_broker.sessions import flows
from dc_broker.sessions.session import Session
from dc_broker.store import MemoryStore
from dc_broker.tokens import Credentials
from dc_token.errors import CredentialsRejected
from tests.e2e import wait_for
from tests.integration.authlib_idp.serve import CLIENT_ID, PASSWORD, TOKEN_PATH, USERNAME

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def authlib_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(token URL, the JWKS file that registers the client's keys) of a running Authlib server."""
    jwks = tmp_path / "jwks.json"
    jwks.write_text('{"keys": []}')
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.authlib_idp.serve", "--jwks", str(jwks), "--fd",
             str(listener.fileno())], pass_fds=(listener.fileno(),), stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    listener.close()
    url = f"http://127.0.0.1:{port}{TOKEN_PATH}"
    try:
        wait_for(lambda: _answers(url), 20, "the Authlib server answering", process=proc)
        yield url, jwks
    finally:
        proc.terminate()
        proc.wait(10)


def _answers(url: str) -> bool:
    try:
        return httpx.post(url, data={"grant_type": "password"}, timeout=2).status_code in (400, 401)
    except httpx.HTTPError:
        return False


def profile(url: str) -> Profile:
    return Profile(name="authlib", client_id=CLIENT_ID, token_url=url, grant="password", username=USERNAME,
                   auth_method="private_key_jwt")  # fmt: skip


async def test_login_and_refresh_with_a_generated_key(authlib_server: tuple[str, Path]) -> None:
    url, jwks = authlib_server
    keys = clientkeys.KeySet(clientkeys.generate("ec", now=time.time()))
    jwks.write_text(json.dumps(keys.public_jwks()))  # registered
    creds = Credentials(password=Secret(PASSWORD), client_keys=keys.to_secret())
    transport = IdpTransport()
    try:
        session = Session(profile(url), MemoryStore({"authlib": creds}), transport)
        login = await session.verify()  # a password grant (no refresh token yet)
        assert login.access_token and login.refresh_token is not None
        endpoints = oidc.Endpoints(token=url)
        refreshed = await session._drive(
            flows.refresh(flows.Login(profile(url), creds, endpoints, login.refresh_token))
        )
        assert refreshed.access_token != login.access_token
        assert refreshed.refresh_token not in (None, login.refresh_token)  # Authlib rotated it
        again = await session._drive(
            flows.refresh(flows.Login(profile(url), creds, endpoints, refreshed.refresh_token))
        )
        assert again.access_token not in (login.access_token, refreshed.access_token)
        # a key Authlib does not have
        stranger = clientkeys.KeySet(clientkeys.generate("rsa", now=time.time()))
        other = Credentials(password=Secret(PASSWORD), client_keys=stranger.to_secret())
        with pytest.raises(CredentialsRejected, match="invalid_client"):
            await Session(profile(url), MemoryStore({"authlib": other}), transport).verify()
    finally:
        await transport.aclose()


async def test_a_replayed_assertion_is_refused(authlib_server: tuple[str, Path]) -> None:
    url, jwks = authlib_server
    keys = clientkeys.KeySet(clientkeys.generate("ec", now=time.time()))
    jwks.write_text(json.dumps(keys.public_jwks()))
    client = oidc.ClientCredentials(CLIENT_ID, "private_key_jwt", keys=keys.to_secret(), audience=url)
    req = assertions.complete(oidc.build_client_credentials(url, client), now=time.time(), jti="once-only")
    async with httpx.AsyncClient() as http:
        first = await http.post(url, data=dict(req.form))
        second = await http.post(url, data=dict(req.form))
    assert first.status_code == 200, first.text
    assert second.status_code in (400, 401), second.text  # Authlib: 400 (no Authorization header was sent)
    assert second.json() == {"error": "invalid_client", "error_description": "JWT ID is used before."}
