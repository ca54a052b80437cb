"""The clients against a real `dc-broker dev` process, and dc-token against its real consumers:
git (`git credential fill`), kubectl's ExecCredential schema, httpx against the demo API, a broker restart.
The async client runs the same bodies under trio and asyncio."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
import trio

from dc_token.aio import AsyncTokenClient
from dc_token.errors import BrokerUnavailable, UnknownProfile
from dc_token.httpx import BrokerAuth
from dc_token.sync import TokenClient
from tests.e2e import BIN, DC_TOKEN, dc_token, dev_broker
from tests.test_client_unit import check_exec_credential_v1

pytestmark = pytest.mark.e2e

API = "/dp/api/v1/aiconnections/types"
BACKENDS = pytest.mark.parametrize("run", ["trio", "asyncio"])


def run_async(backend: str, fn: Callable[..., Awaitable[object]], *args: object) -> object:
    return trio.run(fn, *args) if backend == "trio" else asyncio.run(fn(*args))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory):
    with dev_broker(tmp_path_factory.mktemp("client")) as env:
        yield env


@pytest.fixture
def fresh_dev(tmp_path: Path):
    """A broker of the test's own: invalidate is rate-limited per profile, so tests that force a
    refresh must not share one."""
    with dev_broker(tmp_path) as env:
        yield env


def revoke(base: str, token: str) -> None:
    data = {"client_id": "dc-cli", "client_secret": "dc-cli-secret", "token": token}
    assert httpx.post(f"{base}/realms/demo/protocol/openid-connect/revoke", data=data).status_code == 200


def api_status(base: str, token: str) -> int:
    return httpx.get(base + API, headers={"Authorization": f"Bearer {token}"}).status_code


def jwt_exp(token: str) -> int:
    payload = token.split(".")[1]
    return int(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"])


# ---------------------------------------------------------------- TokenClient


def test_cache_hit_needs_no_socket(dev) -> None:
    sock, base, _ = dev
    with TokenClient(sock) as c:
        info = c.token_info("demo", min_ttl=60)
        assert api_status(base, info.token) == 200 and info.profile == "demo" and info.expires_in > 1700

        def no_socket(*a: object, **k: object) -> dict[str, object]:
            raise AssertionError("a cache hit went to the broker")

        real, c.request = c.request, no_socket  # type: ignore[method-assign]
        assert c.token("demo") == c.token("demo", min_ttl=1000) == info.token
        with pytest.raises(AssertionError):
            c.token("demo", min_ttl=1799)  # more than the token has left: must ask the broker
        c.request = real  # type: ignore[method-assign]
        assert c.invalidate("demo", "not-the-current-token") is False
        assert c.cache is not None and c.cache.get("demo", 0) is not None  # another token: kept
    assert TokenClient(sock, cache=False).token("demo") == info.token


def test_thread_safe_under_contention(dev) -> None:
    sock, _, _ = dev
    errors: list[BaseException] = []
    tokens: set[str] = set()
    with TokenClient(sock) as c:

        def work(i: int) -> None:
            try:
                for n in range(50):
                    if n % 2:
                        tokens.add(c.token("demo", min_ttl=10_000 if i % 2 else 0))  # miss / hit
                    else:
                        assert c.hello()["server"] == "dc-broker"
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors and len(tokens) == 1


def test_unknown_profile_and_no_broker(dev, tmp_path: Path) -> None:
    sock, _, _ = dev
    with pytest.raises(UnknownProfile):
        TokenClient(sock).token("nope")
    with pytest.raises(BrokerUnavailable):
        TokenClient(str(tmp_path / "none.sock")).token("demo")


def test_broker_restart_is_survived(tmp_path: Path) -> None:
    c = TokenClient(str(tmp_path / "run" / "broker.sock"))
    with dev_broker(tmp_path) as (sock, _, proc):
        assert sock == c.socket_path  # the same path every time
        old = c.token("demo")
        assert c.hello()["pid"] == proc.pid
    # the broker is gone: the cached token is still served, anything else says so
    assert c.token("demo") == old
    with pytest.raises(BrokerUnavailable):
        c.hello()
    with dev_broker(tmp_path) as (_, base, proc):
        assert c.hello()["pid"] == proc.pid
    with dev_broker(tmp_path) as (_, base, proc):  # restart while the connection is open
        assert c.hello()["pid"] == proc.pid  # reconnected inside the call, no error
        c.invalidate("demo", old)  # this broker's IdP never issued it: the API says 401, so forget it
        new = c.token("demo")
        assert new != old and api_status(base, new) == 200


def test_sync_watch_streams_new_tokens(fresh_dev) -> None:
    sock, _, _ = fresh_dev
    with TokenClient(sock) as c, c.watch("demo") as tokens:
        first = next(tokens)
        assert c.token("demo") == first.token
        assert c.invalidate("demo", first.token) is True
        second = next(tokens)
        assert second.token != first.token and second.profile == "demo"
        assert c.token("demo") == second.token  # the watch fed the cache


# ---------------------------------------------------------------- AsyncTokenClient, trio and asyncio


async def async_basics(sock: str, base: str) -> None:
    async with AsyncTokenClient(sock) as c:
        info = await c.token_info("demo", min_ttl=60)
        assert info.profile == "demo" and info.expires_in > 1700
        assert await c.token("demo") == info.token
        assert (await c.hello())["server"] == "dc-broker"
        with pytest.raises(UnknownProfile):
            await c.token("nope")
        assert (await c.status("demo"))["profiles"][0]["profile"] == "demo"
    async with AsyncTokenClient(sock, cache=False) as c:  # 40 tasks share one connection
        got: list[str] = []

        async def one() -> None:
            got.append(await c.token("demo-service"))

        import anyio

        async with anyio.create_task_group() as tg:
            for _ in range(40):
                tg.start_soon(one)
        assert len(got) == 40 and len(set(got)) == 1
        with anyio.move_on_after(0):  # cancelled mid-request: the connection is dropped, not garbled
            await c.hello()
        assert (await c.hello())["server"] == "dc-broker"
    with pytest.raises(BrokerUnavailable):
        await AsyncTokenClient(sock + ".none").token("demo")


@BACKENDS
def test_async_client(dev, run: str) -> None:
    sock, base, _ = dev
    run_async(run, async_basics, sock, base)


async def async_watch(sock: str) -> None:
    async with AsyncTokenClient(sock) as c, c.watch("demo") as tokens:
        it = aiter(tokens)
        first = await anext(it)
        assert await c.invalidate("demo", first.token) is True
        second = await anext(it)
        assert second.token != first.token
        assert await c.token("demo") == second.token


@BACKENDS
def test_async_watch(fresh_dev, run: str) -> None:
    run_async(run, async_watch, fresh_dev[0])


# ---------------------------------------------------------------- BrokerAuth against the demo API


class CountingClient(TokenClient):
    invalidations = 0

    def invalidate(self, profile: str, token: str) -> bool:
        self.invalidations += 1
        return super().invalidate(profile, token)


class CountingAsyncClient(AsyncTokenClient):
    invalidations = 0

    async def invalidate(self, profile: str, token: str) -> bool:
        self.invalidations += 1
        return await super().invalidate(profile, token)


def test_broker_auth_sync_revoked_token(fresh_dev) -> None:
    sock, base, _ = fresh_dev
    broker = CountingClient(sock)
    with httpx.Client(auth=BrokerAuth("demo", client=broker)) as http:
        first = http.get(base + API)
        assert first.status_code == 200 and first.history == []
        revoke(base, broker.token("demo"))
        again = http.get(base + API)
        assert again.status_code == 200
        assert [r.status_code for r in again.history] == [401] and broker.invalidations == 1
        # revoked again within the broker's 10 s invalidate limit: one invalidate, no retry, the 401 returned
        revoke(base, broker.token("demo"))
        refused = http.get(base + API)
        assert refused.status_code == 401 and refused.history == [] and broker.invalidations == 2


async def async_broker_auth(sock: str, base: str) -> None:
    broker = CountingAsyncClient(sock)
    async with httpx.AsyncClient(auth=BrokerAuth("demo", async_client=broker)) as http:
        assert (await http.get(base + API)).status_code == 200
        revoke(base, await broker.token("demo"))
        again = await http.get(base + API)
        assert again.status_code == 200
        assert [r.status_code for r in again.history] == [401] and broker.invalidations == 1
    async with httpx.AsyncClient(auth=BrokerAuth("demo", socket_path=sock)) as http:  # its own client
        assert (await http.get(base + API)).status_code == 200


@BACKENDS
def test_broker_auth_async_revoked_token(fresh_dev, run: str) -> None:
    sock, base, _ = fresh_dev
    run_async(run, async_broker_auth, sock, base)


# ---------------------------------------------------------------- dc-token and its consumers


def test_dc_token_output_forms(dev) -> None:
    sock, base, _ = dev
    token = dc_token(sock, "demo").stdout.strip()
    header = dc_token(sock, "demo", "--header")
    assert header.stdout == f"Authorization: Bearer {token}\n"
    doc = json.loads(dc_token(sock, "--json", "demo").stdout)
    assert doc["token"] == token and doc["type"] == "Bearer" and doc["profile"] == "demo"
    # never after the token's own exp; at most the second Keycloak's whole-second iat hides, and a
    # second of rounding, before it (oidc.expiry)
    assert jwt_exp(token) - 2 <= doc["expires_at"] <= jwt_exp(token) and isinstance(doc["scope"], str)
    assert api_status(base, doc["token"]) == 200


def test_exec_credential_is_a_valid_v1_exec_credential(dev) -> None:
    sock, base, _ = dev
    result = dc_token(sock, "demo", "--exec-credential")
    assert result.returncode == 0 and result.stderr == ""
    doc = json.loads(result.stdout)
    expiry = check_exec_credential_v1(doc)
    real = jwt_exp(doc["status"]["token"])
    assert time.time() < expiry.timestamp() <= real - 60  # kubectl asks again a margin before expiry
    assert api_status(base, doc["status"]["token"]) == 200


def test_exec_runs_the_command_in_place(dev) -> None:
    sock, _, _ = dev
    token = dc_token(sock, "demo").stdout.strip()
    env = {**os.environ, "DC_BROKER_SOCKET": sock}
    proc = subprocess.Popen(
        [DC_TOKEN, "exec", "demo", "--", "sh", "-c", 'echo "$$ $DC_TOKEN"; exit 7'],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 7 and out == f"{proc.pid} {token}\n"  # same pid: exec'd, not a child
    killed = subprocess.run([DC_TOKEN, "exec", "demo", "--env", "T", "sh", "-c", "kill -TERM $$"], env=env)
    assert killed.returncode == -signal.SIGTERM
    missing = dc_token(sock, "exec", "demo", "--", "no-such-command-xyz")
    assert (missing.returncode, missing.stderr) == (127, "dc-token: no-such-command-xyz: command not found\n")
    failed = dc_token(sock, "exec", "nope", "--", "true")
    assert failed.returncode == 4 and failed.stdout == ""


def git(home: Path, sock: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {
        "HOME": str(home),
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "DC_BROKER_SOCKET": sock,
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_TERMINAL_PROMPT": "0",
    }
    return subprocess.run(["/usr/bin/git", *args], input=stdin, capture_output=True, text=True, env=env, timeout=30)


FILL = "protocol=https\nhost=dc.example.com\npath=team/repo.git\n\n"


def test_git_credential_fill_with_profile_option(dev, tmp_path: Path) -> None:
    sock, base, _ = dev
    helper = "credential.https://dc.example.com.helper=!dc-token git-credential --profile demo"
    result = git(tmp_path, sock, "-c", helper, "credential", "fill", stdin=FILL)
    assert result.returncode == 0, result.stderr
    attrs = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert attrs["username"] == "oauth2" and attrs["host"] == "dc.example.com"
    assert api_status(base, attrs["password"]) == 200
    assert attrs["password"] == dc_token(sock, "demo").stdout.strip()
    # the helper speaks git >= 2.41's expiry attribute (this git may not echo it back)
    direct = subprocess.run(
        [DC_TOKEN, "git-credential", "--profile", "demo", "get"],
        input=FILL,
        capture_output=True,
        text=True,
        env={**os.environ, "DC_BROKER_SOCKET": sock},
    )
    said = dict(line.split("=", 1) for line in direct.stdout.splitlines())
    assert jwt_exp(attrs["password"]) - 2 <= int(said["password_expiry_utc"]) <= jwt_exp(attrs["password"])


def test_git_credential_profile_from_git_config(dev, tmp_path: Path) -> None:
    sock, _, _ = dev
    assert (
        git(
            tmp_path, sock, "config", "--global", "credential.https://dc.example.com.helper", "!dc-token git-credential"
        ).returncode
        == 0
    )
    assert git(tmp_path, sock, "config", "--global", "dc-token.https://dc.example.com.profile", "demo").returncode == 0
    assert (
        git(tmp_path, sock, "config", "--global", "credential.https://dc.example.com.username", "alice").returncode == 0
    )
    result = git(tmp_path, sock, "credential", "fill", stdin=FILL)
    assert result.returncode == 0, result.stderr
    assert "username=alice\n" in result.stdout
    assert f"password={dc_token(sock, 'demo').stdout.strip()}\n" in result.stdout
    other = git(tmp_path, sock, "credential", "fill", stdin="protocol=https\nhost=other.example.com\n\n")
    assert other.returncode != 0 and "dc-token" not in other.stderr  # not ours: git's own "no prompt" error


def test_git_credential_without_a_broker_falls_through(tmp_path: Path) -> None:
    sock = str(tmp_path / "none.sock")
    ours = "credential.helper=!dc-token git-credential --profile demo"
    theirs = "credential.helper=!f() { echo username=bob; echo password=from-next-helper; }; f"
    result = git(tmp_path, sock, "-c", ours, "-c", theirs, "credential", "fill", stdin=FILL)
    assert result.returncode == 0 and result.stderr == ""
    assert "username=bob\npassword=from-next-helper\n" in result.stdout
    alone = git(tmp_path, sock, "-c", ours, "credential", "fill", stdin=FILL)
    assert alone.returncode != 0 and "dc-token" not in alone.stderr and "terminal prompts disabled" in alone.stderr
    direct = subprocess.run(
        [DC_TOKEN, "git-credential", "--profile", "demo", "get"],
        input=FILL,
        capture_output=True,
        text=True,
        env={**os.environ, "DC_BROKER_SOCKET": sock},
    )
    assert (direct.returncode, direct.stdout, direct.stderr) == (3, "", "")


def test_git_credential_reject_invalidates_the_token(fresh_dev, tmp_path: Path) -> None:
    sock, base, _ = fresh_dev
    helper = "credential.helper=!dc-token git-credential --profile demo"
    first = dict(
        line.split("=", 1)
        for line in git(tmp_path, sock, "-c", helper, "credential", "fill", stdin=FILL).stdout.splitlines()
    )
    revoke(base, first["password"])
    rejected = git(
        tmp_path,
        sock,
        "-c",
        helper,
        "credential",
        "reject",
        stdin=f"{FILL[:-1]}username=oauth2\npassword={first['password']}\n\n",
    )
    assert rejected.returncode == 0 and rejected.stdout == rejected.stderr == ""
    second = dict(
        line.split("=", 1)
        for line in git(tmp_path, sock, "-c", helper, "credential", "fill", stdin=FILL).stdout.splitlines()
    )
    assert second["password"] != first["password"] and api_status(base, second["password"]) == 200
    approved = git(
        tmp_path, sock, "-c", helper, "credential", "approve", stdin=f"{FILL[:-1]}username=oauth2\npassword=x\n\n"
    )
    assert approved.returncode == 0 and approved.stderr == ""
