"""The IdP behind a real HTTP proxy (proxy.py: CONNECT tunnels and plain forwarding, basic auth), the
way a broker on a corporate network reaches it: TLS end to end through the tunnel, the environment's
https_proxy with credentials, what a refusing proxy's answer turns into, a real broker process whose
profile names its proxy, `dc-broker add --proxy`, and `dc-broker proxy`'s upstream the same way."""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import trio

from dc_broker.errors import UpstreamTransient
from dc_broker.idp.oidc import HttpRequest
from dc_broker.idp.transport import IdpTransport
from dc_broker.sessions.session import Session
from dc_broker.store import MemoryStore
from dc_token.errors import UpstreamUnavailable
from dc_token.sync import TokenClient
from tests.conftest import CREDENTIALS, profile, running
from tests.e2e import DC_BROKER, dc_token, dev_broker, dev_idp, run, start_run, stop, wait_for, wait_for_socket
from tests.test_proxy import curl, proxy_process
from tests.tls import make_tls
from tests.upstream import running_upstream

pytestmark = pytest.mark.e2e

PROXY_PASSWORD = "pr0xy-Pa55"


@contextmanager
def forward_proxy(tmp: Path, *flags: str) -> Iterator[tuple[str, Path]]:
    """``python -m proxy`` on a free loopback port; yields (its URL, its access log)."""
    port_file, log = tmp / "proxy.port", tmp / "proxy.log"
    port_file.unlink(missing_ok=True)
    log.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "proxy", "--hostname", "127.0.0.1", "--port", "0", "--port-file", str(port_file)]
    cmd += ["--num-workers", "1", "--num-acceptors", "1", "--log-file", str(log), *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_file.exists() and port_file.read_text().strip().isdecimal(), 30, "the proxy's port")
        port = int(port_file.read_text().strip())

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_for(listening, 30, "the proxy to listen")
        yield f"http://127.0.0.1:{port}", log
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def tls_session(base: str, ca: str | None, proxy: str | None, environ: dict[str, str]) -> Session:
    prof = profile("demo", server=base, ca_bundle=ca, proxy=proxy)
    return Session(prof, MemoryStore({"demo": CREDENTIALS["demo"]}), IdpTransport(environ=environ))


async def test_a_profile_s_proxy_tunnels_tls_to_the_idp(tmp_path: Path) -> None:
    """CONNECT through the proxy, TLS verified against the profile's CA bundle inside the tunnel: the
    proxy sees only the IdP's host and port, and a broker without the CA refuses the IdP's certificate."""
    ca, cert, key = make_tls(tmp_path)
    with dev_idp("--certfile", cert, "--keyfile", key) as base, forward_proxy(tmp_path) as (proxy, log):
        assert base.startswith("https://127.0.0.1:")
        session = tls_session(base, ca, proxy, {"no_proxy": "*"})  # the profile's proxy wins over no_proxy
        async with running(session.run):
            with trio.fail_after(20):
                token = await session.get()
        assert token.access_token.reveal().count(".") == 2
        await session.idp.aclose()  # proxy.py logs a tunnel once it is closed
        tunnel = f"CONNECT {base.removeprefix('https://')}"
        wait_for(lambda: tunnel in log.read_text(), 10, "the tunnel in the proxy's log")
        seen = log.read_text()
        assert token.access_token.reveal() not in seen and "dc-cli-secret" not in seen  # TLS: the proxy saw none

        untrusted = tls_session(base, None, proxy, {})
        async with running(untrusted.run):
            with trio.fail_after(20), pytest.raises(UpstreamUnavailable) as caught:
                await untrusted.get()
        await untrusted.idp.aclose()
        text = str(caught.value)  # the telling cause, from under httpx's empty ConnectError, and what to do
        assert "via proxy " + proxy in text and "CERTIFICATE_VERIFY_FAILED" in text, text
        assert text.endswith("give the profile its CA (ca_bundle = PATH)"), text


@pytest.mark.parametrize(
    ("password", "answer"),
    [
        (PROXY_PASSWORD, "could not reach https://sso.invalid (502 Bad Gateway): check the IdP's host name"),
        ("wrong-pw-x", "refused to reach https://sso.invalid without valid credentials (407"),
    ],
)
async def test_the_environment_s_proxy_with_credentials_and_its_refusals(
    tmp_path: Path, password: str, answer: str
) -> None:
    """https_proxy with user:password from the environment: the proxy authenticates the broker (or
    says 407), then cannot resolve the IdP (502). Each answer is a message naming the proxy and what to
    do, and the proxy password appears in none of them."""
    with forward_proxy(tmp_path, "--basic-auth", f"alice:{PROXY_PASSWORD}") as (proxy, log):
        port = proxy.rsplit(":", 1)[1]
        transport = IdpTransport(environ={"https_proxy": f"http://alice:{password}@127.0.0.1:{port}"})
        assert password not in repr(transport.__dict__)
        try:
            with trio.fail_after(20), pytest.raises(UpstreamTransient) as caught:
                await transport.send(
                    HttpRequest("POST", "https://sso.invalid/realms/acme/protocol/openid-connect/token")
                )
        finally:
            await transport.aclose()
        wait_for(lambda: "CONNECT" in log.read_text(), 10, "the CONNECT in the proxy's log")  # it went through it
    text = str(caught.value)
    assert text.startswith(f"the proxy {proxy} {answer}"), text
    assert password not in text and "alice" not in text


QUOTING_USER, QUOTING_PASSWORD = "px@user", "pw:Quot3d/+"
QUOTING_BASIC = base64.b64encode(f"{QUOTING_USER}:{QUOTING_PASSWORD}".encode()).decode()
#: every spelling of the quoting proxy's credentials: Basic's base64 (padded or not), the user and
#: the password as written and percent-encoded (and the password's telling part alone)
QUOTED_FORMS = (QUOTING_BASIC, QUOTING_BASIC.rstrip("="), "px@user", "px%40user", "pw:Quot3d", "pw%3AQuot3d", "Quot3d")


def quoting_environ(port: str) -> dict[str, str]:
    """https_proxy for the quoting proxy on ``port``, its credentials percent-encoded in the URL."""
    user, password = quote(QUOTING_USER, safe=""), quote(QUOTING_PASSWORD, safe="")
    return {"https_proxy": f"http://{user}:{password}@127.0.0.1:{port}"}


@asynccontextmanager
async def quoting_proxy(status: int) -> AsyncIterator[str]:
    """A proxy that answers every CONNECT with ``status`` and a reason phrase quoting what it was
    sent: the Proxy-Authorization header, and the credentials decoded from it (as an odd proxy's 407
    or 502 might). Yields its port."""

    async def answer(stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            data = await stream.receive_some(65536)
            if not data:
                return
            head += data
        auth = next(
            (line.split(b":", 1)[1].strip() for line in head.split(b"\r\n") if line.lower().startswith(b"proxy-auth")),
            b"none",
        )
        decoded = base64.b64decode(auth.split(b" ")[-1]) if auth != b"none" else b""
        reason = b"you sent " + auth + b" = " + decoded + b" = " + quote(decoded.decode()).encode()
        await stream.send_all(b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\n\r\n" % (status, reason))
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, answer, 0, host="127.0.0.1"))
        yield str(listener.socket.getsockname()[1])
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("status", [407, 502])
async def test_a_proxy_quoting_its_credentials_back_leaves_them_in_no_error_status_or_log(
    status: int, caplog: pytest.LogCaptureFixture
) -> None:
    """The environment's proxy with percent-encoded credentials answers the CONNECT with a reason
    phrase quoting `Proxy-Authorization: Basic ...` and the decoded user:password: the caller's error,
    `status` and the log name the proxy and its answer, and no spelling of the credentials."""
    async with quoting_proxy(status) as port:
        session = Session(
            profile("service", server="https://sso.invalid"),
            MemoryStore({"service": CREDENTIALS["service"]}),
            IdpTransport(environ=quoting_environ(port)),
        )
        caplog.set_level(logging.DEBUG, logger="dc_broker")  # httpcore stays at WARNING (logs.py)
        async with running(session.run):
            with trio.fail_after(20), pytest.raises(UpstreamUnavailable) as caught:
                await session.get()
        await session.idp.aclose()
    shown = [str(caught.value), session.status(trio.current_time())["last_error"], caplog.text]
    assert f"the proxy http://127.0.0.1:{port}" in shown[0] and f"{status} you sent Basic" in shown[0], shown[0]
    for text in shown:
        for form in QUOTED_FORMS:
            assert form not in text, (form, text)


@pytest.mark.parametrize("status", [407, 502])
async def test_a_running_broker_behind_a_quoting_proxy_shows_its_credentials_in_no_status_or_log_line(
    tmp_path: Path, status: int
) -> None:
    """The same proxy in front of a real `dc-broker run` (https_proxy in its environment): its
    login fails naming the proxy and its answer, and neither `dc-broker status --json` over the
    socket, the daemon's stderr (--verbose), nor `dc-broker doctor` (which asks the IdP through the
    proxy itself) holds any spelling of the credentials."""
    sock = str(tmp_path / "run" / "b.sock")
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        '[profiles.service]\ntoken_url = "https://sso.invalid/realms/acme/protocol/openid-connect/token"\n'
        'client_id = "dc-service"\ngrant = "client_credentials"\n'
    )
    plain = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}

    def last_error() -> str | None:
        out = run([DC_BROKER, "status", "--socket", sock, "--json"], env=plain)
        assert out.returncode == 0, out.stderr
        [row] = json.loads(out.stdout)["profiles"]
        return row["last_error"] and out.stdout

    async with quoting_proxy(status) as port:
        with (tmp_path / "daemon.log").open("w") as log:
            env = {**plain, **quoting_environ(port)}
            secrets = '[service]\nclient_secret = "s3"\n'
            broker = start_run(cfg, sock, secrets, "--verbose", env=env, stderr=log.fileno(), wait=False)
        try:
            await trio.to_thread.run_sync(wait_for_socket, sock, broker)
            status_json = await trio.to_thread.run_sync(
                lambda: wait_for(last_error, 30, "the login through the proxy to fail", process=broker)
            )
            doctor = await trio.to_thread.run_sync(
                lambda: run([DC_BROKER, "doctor", "--config", str(cfg), "--socket", sock], env=env)
            )
        finally:
            assert stop(broker, signal.SIGTERM) == 0
    logged = (tmp_path / "daemon.log").read_text()
    [row] = json.loads(status_json)["profiles"]
    assert f"the proxy http://127.0.0.1:{port}" in row["last_error"], row
    assert f"{status} you sent Basic ***" in row["last_error"], row  # the proxy's answer, its quote scrubbed
    fix = {
        407: "https_proxy=http://USER:PASSWORD@HOST:PORT (with the profile's proxy unset)",
        502: '(no_proxy, or the profile\'s proxy = "direct")',
    }[status]
    assert row["last_error"].endswith(fix), row  # whole: status cuts only what an IdP or proxy sent
    assert f"{status} you sent Basic ***" in logged, logged
    assert "Traceback" not in logged
    assert doctor.returncode == 1, doctor.stderr  # `dc-broker doctor` with the broker's environment asks the same way
    assert (
        "FAIL  idp service: cannot reach https://sso.invalid/realms/acme/protocol/openid-connect/token through the "
        f"proxy http://127.0.0.1:{port}: the proxy refused: {status} you sent Basic *** = ***:*** = ***%3A***\n"
    ) in doctor.stdout, doctor.stdout
    for text in (status_json, logged, doctor.stdout + doctor.stderr):
        for form in QUOTED_FORMS:
            assert form not in text, (form, text)


def broker_config(tmp: Path, base: str, proxy: str) -> Path:
    cfg = tmp / "config.toml"
    cfg.write_text(
        f'[profiles.acme]\nserver = "{base}"\ntenant = "demo"\nclient_id = "dc-cli"\nusername = "demo"\n'
        f'proxy = "{proxy}"\n\n'
        f'[profiles.local]\nserver = "{base}"\ntenant = "demo"\nclient_id = "dc-service"\n'
        'grant = "client_credentials"\n'
    )
    return cfg


def test_a_broker_process_reaches_its_idp_through_the_profile_s_proxy(tmp_path: Path) -> None:
    """`dc-broker run`: profile acme names the proxy (plain-http forwarding to the local dev IdP);
    profile local names none and its IdP is loopback, so the environment's https_proxy and ALL_PROXY
    (a dead port) are not used for it. Once the proxy is gone, acme's forced refresh
    fails naming it, and `dc-broker set acme proxy=direct` moves acme around it: the running broker's
    new login succeeds at once."""
    secrets = (
        '[acme]\npassword = "demo"\nclient_secret = "dc-cli-secret"\n[local]\nclient_secret = "dc-service-secret"\n'
    )
    sock = str(tmp_path / "run" / "b.sock")
    dead = "http://127.0.0.1:9"
    env = {**os.environ, "https_proxy": dead, "ALL_PROXY": dead}

    def acme() -> dict[str, Any]:
        out = json.loads(run([DC_BROKER, "status", "--socket", sock, "--json"]).stdout)
        return dict(next(p for p in out["profiles"] if p["profile"] == "acme"))

    with dev_idp() as base:
        with forward_proxy(tmp_path) as (proxy, _):
            cfg = broker_config(tmp_path, base, proxy)
            broker = start_run(cfg, sock, secrets, env=env)
            tokens = {name: dc_token(sock, name) for name in ("acme", "local")}
            assert [t.returncode for t in tokens.values()] == [0, 0], [t.stderr for t in tokens.values()]
        try:
            with TokenClient(sock, cache=False) as client:  # the API said 401: a refresh now, to the dead proxy
                assert client.invalidate("acme", tokens["acme"].stdout.strip())
            assert acme()["via"] == proxy  # status says which way each profile goes
            out = json.loads(run([DC_BROKER, "status", "--socket", sock, "--json"]).stdout)
            assert [p["via"] for p in out["profiles"] if p["profile"] == "local"] == [None]
            wait_for(lambda: acme()["last_error"] is not None, 20, "acme's refresh to fail", every=0.1)
            assert f"via proxy {proxy}" in acme()["last_error"], acme()["last_error"]

            changed = run([DC_BROKER, "set", "acme", "proxy=direct", "--config", str(cfg), "--socket", sock])
            assert changed.returncode == 0, changed.stderr
            assert 'proxy = "direct"' in changed.stdout and "reloaded" in changed.stdout
            assert 'proxy = "direct"' in cfg.read_text()
            wait_for(lambda: acme()["last_error"] is None, 20, "acme's login around the proxy", every=0.1)
            assert acme()["state"] == "fresh" and acme()["via"] is None
            again = dc_token(sock, "acme")
            assert again.returncode == 0 and again.stdout != tokens["acme"].stdout, again.stderr
        finally:
            assert stop(broker, signal.SIGTERM) == 0
    err = broker.stderr.read() if broker.stderr else ""
    assert "Traceback" not in err


def test_add_checks_the_login_through_the_proxy_it_is_given(tmp_path: Path) -> None:
    """`dc-broker add --proxy`: the sign-in check goes the profile's way (a dead proxy fails it and
    nothing is written; a live one passes it), a proxy URL with credentials is refused unechoed, and
    a profile that relies on this shell's https_proxy gets a note that systemd will not pass it on."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DC_BROKER_") and "proxy" not in k.lower()}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "config"), XDG_DATA_HOME=str(tmp_path / "data"))
    env["DC_BROKER_SOCKET"] = str(tmp_path / "run" / "none.sock")
    config = tmp_path / "config" / "dc-broker" / "config.toml"

    def add(proxy: str) -> subprocess.CompletedProcess[str]:
        args = ["add", "svc", "--server", base, "--tenant", "demo", "--client-id", "dc-service"]
        args += ["--grant", "client_credentials", "--proxy", proxy, "--secret-stdin"]
        return subprocess.run([DC_BROKER, *args], input="dc-service-secret\n", capture_output=True, text=True, env=env)

    init = subprocess.run([DC_BROKER, "init", "--key-source", "keyfile"], capture_output=True, text=True, env=env)
    assert init.returncode == 0, init.stderr
    with dev_idp() as base:
        dead = add("http://127.0.0.1:9")
        assert dead.returncode == 7, dead.stderr
        assert "could not verify profile 'svc'" in dead.stderr and "via proxy http://127.0.0.1:9" in dead.stderr
        assert not config.exists() or "svc" not in config.read_text()

        secret = add("http://ops:pr0xy-pw@127.0.0.1:3128")
        assert secret.returncode == 2 and "proxy 'http://***@127.0.0.1:3128' carries credentials" in secret.stderr
        assert "pr0xy-pw" not in secret.stderr

        with forward_proxy(tmp_path) as (proxy, _):
            added = add(proxy)
        assert added.returncode == 0, added.stderr
        assert f'proxy = "{proxy}"' in config.read_text()
        assert "Note:" not in added.stderr  # the profile names its proxy: nothing to say

    # a profile without proxy, whose IdP this shell reaches through its https_proxy: the user is told
    # that a systemd-started broker will not see it (not checked at the IdP: it is not on this host)
    env["https_proxy"] = "http://ops:pr0xy-pw@proxy.corp.example:3128"
    args = ["add", "corp", "--server", "https://sso.corp.example", "--tenant", "t", "--client-id", "c"]
    args += ["--grant", "client_credentials", "--secret-stdin", "--no-verify"]
    noted = subprocess.run([DC_BROKER, *args], input="s3\n", capture_output=True, text=True, env=env)
    assert noted.returncode == 0, noted.stderr
    assert "through this shell's proxy http://proxy.corp.example:3128 (https_proxy)" in noted.stderr
    assert "`dc-broker set corp proxy=http://proxy.corp.example:3128`" in noted.stderr
    assert "pr0xy-pw" not in noted.stderr + noted.stdout


def test_dc_broker_proxy_reaches_its_upstream_the_profile_s_way(tmp_path: Path) -> None:
    """`dc-broker proxy` sends the API requests where the profile's IdP requests go: through the
    profile's proxy (a CONNECT tunnel, TLS verified inside it against the profile's CA bundle), and a
    proxy that is gone is a 502 naming it."""
    ca, cert, key = make_tls(tmp_path)

    def config(proxy: str) -> str:
        cfg = tmp_path / "config.toml"
        cfg.write_text(
            f'[profiles.demo]\nserver = "{base}"\ntenant = "demo"\nclient_id = "dc-cli"\nusername = "demo"\n'
            f'ca_bundle = "{ca}"\nproxy = "{proxy}"\n'
        )
        return str(cfg)

    with dev_broker(tmp_path) as (sock, base, _), running_upstream(None, cert, key) as upstream:
        with forward_proxy(tmp_path) as (proxy, log):
            with proxy_process(sock, upstream, "--config", config(proxy)) as (addr, _):
                code, body = curl(f"http://{addr}/echo")
                assert code == 200 and json.loads(body)["headers"]["authorization"].startswith("Bearer "), body
            tunnel = "CONNECT " + upstream.removeprefix("https://")  # logged once dc-broker proxy has closed it
            wait_for(lambda: tunnel in log.read_text(), 10, "the tunnel in the proxy's log")
        with proxy_process(sock, upstream, "--config", config("http://127.0.0.1:9")) as (addr, _):
            code, body = curl(f"http://{addr}/echo")
        assert code == 502 and f"upstream {upstream} via proxy http://127.0.0.1:9 failed: ConnectError" in body


def test_an_unusable_proxy_variable_stops_the_broker_at_start_with_its_name(tmp_path: Path) -> None:
    with dev_idp() as base:
        cfg = broker_config(tmp_path, base, "direct")
        env = {**os.environ, "https_proxy": "socks5://alice:s0cks-pw@127.0.0.1:1080"}
        result = subprocess.run(
            [DC_BROKER, "run", "--config", str(cfg), "--socket", str(tmp_path / "b.sock"), "--secrets-stdin"],
            input="",
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )
    assert result.returncode == 2, result.stderr
    assert "the environment's https_proxy is a socks5 proxy; only http:// and https:// proxies" in result.stderr
    assert "s0cks-pw" not in result.stderr and "Traceback" not in result.stderr


async def test_dc_broker_proxy_s_upstream_through_a_proxy_that_wants_credentials(tmp_path: Path) -> None:
    """The proxy's own HTTP/1.1 client behind an HTTP proxy with Basic credentials (from the URL, as
    ``https_proxy`` gives them): an http upstream in the absolute form, an https one through a
    CONNECT tunnel, and a refused tunnel a ``ProxyError`` that names the 407 and not the password."""
    from dc_broker.proxy.upstream import ProxyError, Upstreams
    from tests.test_proxy_upstream import SECRET, exchange

    ca, cert, key = make_tls(tmp_path)
    flags = ("--basic-auth", f"corp:{PROXY_PASSWORD}")
    with (
        forward_proxy(tmp_path, *flags) as (proxy, _),
        running_upstream() as plain,
        running_upstream(None, cert, key) as tls,
    ):
        with_credentials = proxy.replace("http://", f"http://corp:{quote(PROXY_PASSWORD)}@")
        for upstream, bundle in ((plain, None), (tls, ca)):
            connection = Upstreams(upstream, bundle, via=with_credentials).take()
            with trio.fail_after(20):
                head, body = await exchange(connection, b"/echo")
            assert head.status_code == 200, (upstream, head, body)
            assert json.loads(body)["headers"]["authorization"] == f"Bearer {SECRET}"
            if bundle is not None:  # said in the handshake: hypercorn offers h2 as well
                assert isinstance(connection.stream, trio.SSLStream)
                assert connection.stream.selected_alpn_protocol() == "http/1.1"
            first = connection.stream
            with trio.fail_after(20):
                assert (await exchange(connection, b"/echo"))[0].status_code == 200
            assert connection.stream is first  # kept alive, through the tunnel and TLS as well
            connection.close()
        wrong = proxy.replace("http://", "http://corp:wr0ng-pw-x@")
        connection = Upstreams(tls, ca, via=wrong).take()
        with trio.fail_after(20), pytest.raises(ProxyError) as caught:
            await exchange(connection, b"/echo")
        assert "CONNECT with 407" in str(caught.value) and "wr0ng" not in str(caught.value), caught.value
        connection = Upstreams(plain, None, via=wrong).take()  # forwarded: the proxy's 407 is the answer
        with trio.fail_after(20):
            assert (await exchange(connection, b"/echo"))[0].status_code == 407
