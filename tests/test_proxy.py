"""`dc-broker proxy`: the pure rules (admission, targets, headers, what a 401 means, its own answers),
then the real proxy process in front of the dev IdP's demo API and a streaming test upstream,
driven by curl. The caller check with real users is tests/test_proxy_users.py, the upstream's
faults tests/test_proxy_faults.py, the kernel lookups tests/test_proxy_peer.py."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from dc_broker.errors import ConfigError
from dc_broker.proxy.rules import (
    MAX_URL,
    Listen,
    Refused,
    Rules,
    admit,
    broker_refused,
    raw_answer,
    response_headers,
    retry_after_401,
    upstream_headers,
    upstream_url,
)
from tests.e2e import DC_BROKER, dev_broker, stop, wait_for_socket
from tests.test_client_e2e import revoke
from tests.tls import make_tls
from tests.upstream import pattern_digest, running_upstream

API = "/dp/api/v1/aiconnections/types"
ROOT = os.getuid() == 0


def refusal(found: Refused | None) -> str:
    assert found is not None
    return f"{found.status} {found.message}"


def test_admission_rules() -> None:
    rules = Rules(uid=1000, hosts=Listen().hosts(8765), allowed_origins=frozenset({"https://app.example.com"}))
    ok = [(b"Host", b"127.0.0.1:8765")]
    assert admit(rules, ok) is None
    assert admit(rules, [(b"host", b"LOCALHOST:8765")]) is None
    assert refusal(admit(rules, [*ok, (b"Origin", b"https://evil.example")])) == (
        "403 dc-broker proxy: requests from web pages are refused (Origin https://evil.example); allow an origin "
        "with --allow-origin if a page of yours needs the proxy"
    )
    assert "Sec-Fetch-Site" in refusal(admit(rules, [*ok, (b"Sec-Fetch-Site", b"same-origin")]))
    assert admit(rules, [*ok, (b"Origin", b"https://app.example.com"), (b"Sec-Fetch-Site", b"cross-site")]) is None
    assert "DNS rebinding" in refusal(admit(rules, [(b"Host", b"evil.example:8765")]))
    assert "DNS rebinding" in refusal(admit(rules, []))
    assert admit(Rules(uid=1000), [(b"Host", b"anything")]) is None  # a Unix listener: no Host check


def test_listen_addresses() -> None:
    assert Listen.parse("127.0.0.1:9000") == Listen("127.0.0.1", 9000)
    assert Listen.parse("[::1]:9000") == Listen("::1", 9000)
    assert Listen.parse("localhost:0") == Listen("127.0.0.1", 0)
    assert Listen.parse("unix:/run/x.sock").path == "/run/x.sock"
    for bad in ("0.0.0.0:8765", "192.168.1.5:80", "example.com:80", "unix:", "127.0.0.1:65536"):
        with pytest.raises(ConfigError):
            Listen.parse(bad)
    assert Listen.parse("[::1]:9000").in_use() == (
        "[::1]:9000 is in use (another dc-broker proxy?); choose another port with --listen [::1]:PORT, "
        "or --listen unix:PATH"
    )


def test_headers_to_upstream() -> None:
    sent = [
        (b"Host", b"127.0.0.1:8765"),
        (b"Authorization", b"Basic bm8="),
        (b"Connection", b"keep-alive, X-Hop"),
        (b"X-Hop", b"dropped: the Connection header names it"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Accept", b"application/json"),
        (b"X-Custom", b"1"),
    ]
    assert upstream_headers(sent, "tok") == [
        (b"Accept", b"application/json"),
        (b"X-Custom", b"1"),
        (b"authorization", b"Bearer tok"),
    ]
    # chunked with a Content-Length too (h11 reads it chunked): the length goes, so the upstream
    # cannot be told another framing than the one the proxy read (request smuggling)
    both = [(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"5"), (b"X-Custom", b"1")]
    assert upstream_headers(both, "tok") == [(b"X-Custom", b"1"), (b"authorization", b"Bearer tok")]
    answer = [(b"Content-Type", b"text/plain"), (b"Connection", b"close, x-trace"), (b"X-Trace", b"1"), (b"TE", b"x")]
    assert response_headers(answer) == [(b"Content-Type", b"text/plain")]
    assert response_headers(both) == [(b"X-Custom", b"1")]  # the same for an answer


def test_targets_that_go_upstream() -> None:
    assert upstream_url("https://dc.example.com/", b"/dp/api?x=1") == "https://dc.example.com/dp/api?x=1"
    for target in (b"http://elsewhere/", b"elsewhere:443", b"*"):  # absolute-, authority-, asterisk-form
        with pytest.raises(Refused, match="only origin-form") as refused:
            upstream_url("https://dc.example.com", target)
        assert refused.value.status == 400
    base = "https://dc.example.com"
    assert len(upstream_url(base, b"/" + b"a" * (MAX_URL - len(base) - 1))) == MAX_URL
    with pytest.raises(Refused) as refused:
        upstream_url(base, b"/" + b"a" * (MAX_URL - len(base)))
    assert (refused.value.status, refused.value.message) == (
        414,
        f"dc-broker proxy: the URL is {MAX_URL + 1} characters long; at most {MAX_URL} go upstream",
    )


def test_what_a_401_means() -> None:
    assert retry_after_401(401, True, "old", "new")
    assert not retry_after_401(401, True, "old", "old")  # the broker has nothing newer: the 401 goes back
    assert not retry_after_401(401, False, "old", "new")  # the body was streamed, not kept
    assert not retry_after_401(403, True, "old", "new")  # a token without the permission stays so


def test_the_proxys_own_answers() -> None:
    assert raw_answer(Refused(403, "dc-broker proxy: no")) == (
        b"HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 20\r\n"
        b"server: dc-broker-proxy\r\nconnection: close\r\n\r\ndc-broker proxy: no\n"
    )
    locked = broker_refused("the broker is locked", "run `dc-broker unlock`")
    assert (locked.status, locked.message) == (503, "dc-broker proxy: the broker is locked; run `dc-broker unlock`")
    assert broker_refused("gone", "").message == "dc-broker proxy: gone"


# ---------------------------------------------------------------- the real proxy


@contextmanager
def proxy_process(
    sock: str, upstream: str, *args: str, profile: str = "demo"
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    proc = subprocess.Popen(
        [DC_BROKER, "proxy", profile, "--socket", sock, "--upstream", upstream, "--listen", "127.0.0.1:0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.search(r"http://(\S+) ->", line)
        assert m, f"no proxy address: {line!r} {proc.stderr.read() if proc.poll() is not None and proc.stderr else ''}"
        yield m.group(1), proc
    finally:
        proc.terminate()
        proc.wait(10)


def curl(*args: str, user: int | None = None) -> tuple[int, str]:
    cmd = ["curl", "-sS", *([] if "-o" in args else ["-o", "-"]), "-w", "\n%{http_code}", *args]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        return -out.returncode, out.stderr
    body, _, code = out.stdout.rpartition("\n")
    return int(code), body


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory):
    with dev_broker(tmp_path_factory.mktemp("proxy")) as env:
        yield env


@pytest.mark.e2e
def test_curl_through_the_proxy_and_browsers_refused(dev) -> None:
    sock, base, _ = dev
    with proxy_process(sock, base, "--allow-origin", "https://app.example.com") as (addr, _):
        code, body = curl(f"http://{addr}{API}")
        assert code == 200 and json.loads(body)[0]["id"] == "openai"
        assert curl(f"http://localhost:{addr.split(':')[1]}{API}")[0] == 200
        code, body = curl("-H", "Origin: https://evil.example", f"http://{addr}{API}")
        assert code == 403 and "requests from web pages are refused" in body
        assert curl("-H", "Sec-Fetch-Site: cross-site", f"http://{addr}{API}")[0] == 403
        code, body = curl("-H", "Host: rebound.evil.example", f"http://{addr}{API}")
        assert code == 403 and "DNS rebinding" in body
        assert curl("-H", "Origin: https://app.example.com", f"http://{addr}{API}")[0] == 200


@pytest.mark.e2e
def test_a_revoked_token_is_invalidated_once_and_retried_once(tmp_path: Path) -> None:
    with dev_broker(tmp_path) as (sock, base, _), proxy_process(sock, base) as (addr, proc):
        assert curl(f"http://{addr}{API}")[0] == 200
        from dc_token.sync import TokenClient

        with TokenClient(sock, cache=False) as c:
            before = c.status("demo")["profiles"][0]["refreshes"]
            revoke(base, c.token("demo"))
            code, _ = curl(f"http://{addr}{API}")
            assert code == 200
            assert c.status("demo")["profiles"][0]["refreshes"] == before + 1  # one invalidate: one refresh
            revoke(base, c.token("demo"))  # within 10 s: the broker gives the same token, the 401 goes back
            assert curl(f"http://{addr}{API}")[0] == 401
    assert proc.stderr is not None
    log = proc.stderr.read()
    assert log.count("upstream said 401; token invalidated, sending once more") == 1
    assert "eyJ" not in log


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))  # type: ignore[union-attr]


@pytest.mark.e2e
def test_50_mb_up_and_down_stream_through_in_bounded_memory(dev, tmp_path: Path) -> None:
    sock, base, _ = dev
    size = 50 * 1024 * 1024
    payload = tmp_path / "payload"
    with open(payload, "wb") as f:
        for i in range(50):
            f.write(hashlib.sha256(str(i).encode()).digest() * (1024 * 1024 // 32))
    digest = hashlib.sha256(payload.read_bytes()).hexdigest()
    with running_upstream(idp=base) as upstream, proxy_process(sock, upstream) as (addr, proc):
        assert curl(f"http://{addr}/echo")[0] == 200  # warm: imports, first token, connections
        start = peak_rss_kib(proc.pid)
        code, body = curl("--data-binary", f"@{payload}", f"http://{addr}/upload")
        assert code == 200 and json.loads(body) == {"bytes": size, "sha256": digest}
        code, body = curl("-T", str(payload), "-H", "Transfer-Encoding: chunked", f"http://{addr}/upload")
        assert code == 200 and json.loads(body) == {"bytes": size, "sha256": digest}  # chunked, no length
        down = tmp_path / "down"
        headers = tmp_path / "headers"
        code, _ = curl("-D", str(headers), "-o", str(down), f"http://{addr}/download?size={size}")
        assert code == 200 and down.stat().st_size == size
        assert hashlib.sha256(down.read_bytes()).hexdigest() == pattern_digest(size)
        grown = peak_rss_kib(proc.pid) - start
        assert grown < 16 * 1024, f"the proxy's peak RSS grew by {grown} KiB moving 150 MB"


@pytest.mark.e2e
@pytest.mark.skipif(not ROOT, reason="needs root to run curl as another uid (setpriv)")
def test_another_uid_gets_403_over_tcp_and_unix(dev, tmp_path: Path) -> None:
    sock, base, _ = dev
    with proxy_process(sock, base) as (addr, _):
        assert curl(f"http://{addr}{API}")[0] == 200
        code, body = curl(f"http://{addr}{API}", user=65534)
        assert code == 403 and "uid 65534 may not use this proxy" in body
    import shutil
    import tempfile

    run_dir = Path(tempfile.mkdtemp(prefix="dc-proxy-test-", dir="/tmp"))  # others can reach /tmp/...
    path = run_dir / "px" / "proxy.sock"
    proc = subprocess.Popen(
        [DC_BROKER, "proxy", "demo", "--socket", sock, "--upstream", base, "--listen", f"unix:{path}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and "unix:" in proc.stdout.readline()
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        assert curl("--unix-socket", str(path), f"http://localhost{API}")[0] == 200
        # the 0600 socket already keeps others out; open it up to show the kernel's uid check as well
        assert curl("--unix-socket", str(path), f"http://localhost{API}", user=65534)[0] < 0
        run_dir.chmod(0o755)
        path.parent.chmod(0o755)
        path.chmod(0o666)
        code, body = curl("--unix-socket", str(path), f"http://localhost{API}", user=65534)
        assert code == 403 and "uid 65534 may not use this proxy" in body
    finally:
        proc.terminate()
        proc.wait(10)
        assert not path.exists()
        shutil.rmtree(run_dir)


def start_proxy(*args: str) -> subprocess.CompletedProcess[str]:
    """`dc-broker proxy ...` that is expected to stop at start."""
    return subprocess.run([DC_BROKER, "proxy", *args], capture_output=True, text=True, timeout=30)


@pytest.mark.e2e
def test_start_up_errors_are_one_line_with_the_fix(dev, tmp_path: Path) -> None:
    sock, base, _ = dev
    none = str(tmp_path / "none.sock")
    result = start_proxy("demo", "--socket", none, "--upstream", base)
    assert (result.returncode, result.stdout, result.stderr) == (
        3,
        "",
        f"Error: no dc-broker is running on {none}; start it first (`dc-broker run`), then the proxy\n",
    )
    result = start_proxy("nosuch", "--socket", sock, "--upstream", base, "--listen", "127.0.0.1:0")
    assert (result.returncode, result.stdout, result.stderr) == (
        4,
        "",
        f"Error: the broker on {sock} has no profile named 'nosuch'; `dc-broker status --socket {sock}` lists "
        "its profiles, `dc-broker add` adds one\n",
    )
    with proxy_process(sock, base) as (addr, _):
        result = start_proxy("demo", "--socket", sock, "--upstream", base, "--listen", addr)
        assert (result.returncode, result.stdout, result.stderr) == (
            2,
            "",
            f"Error: {addr} is in use (another dc-broker proxy?); choose another port with --listen "
            "127.0.0.1:PORT, or --listen unix:PATH\n",
        )
    result = start_proxy("demo", "--socket", sock, "--upstream", "http://dc.example.com")
    assert result.returncode == 2 and "plain http to a non-loopback host" in result.stderr


@pytest.mark.e2e
def test_no_upstream_is_a_502_for_that_request(dev) -> None:
    sock, _, _ = dev
    with proxy_process(sock, "http://127.0.0.1:9") as (addr, proc):
        code, body = curl(f"http://{addr}{API}")
        assert code == 502 and "upstream http://127.0.0.1:9 failed: ConnectError" in body
        code, body = curl(f"http://{addr}/x", "-H", "Host: 127.0.0.1:1")
        assert code == 403
        assert proc.poll() is None


@pytest.mark.e2e
def test_upstream_tls_is_verified_against_the_profiles_ca_bundle(dev, tmp_path: Path) -> None:
    sock, base, _ = dev
    ca, certfile, keyfile = make_tls(tmp_path)
    with running_upstream(None, certfile, keyfile) as upstream:
        assert upstream.startswith("https://127.0.0.1:")
        with proxy_process(sock, upstream) as (addr, _):  # the system's CAs do not know ours
            code, body = curl(f"http://{addr}/echo")
            assert code == 502 and "CERTIFICATE_VERIFY_FAILED" in body
        with proxy_process(sock, upstream, "--ca-bundle", ca) as (addr, _):
            code, body = curl(f"http://{addr}/echo")
            assert code == 200 and json.loads(body)["headers"]["authorization"].startswith("Bearer ")
        cfg = tmp_path / "config.toml"
        cfg.write_text(
            f'[profiles.demo]\nserver = "{base}"\ntenant = "demo"\nclient_id = "dc-cli"\nusername = "demo"\n'
            f'ca_bundle = "{ca}"\n'
        )
        with proxy_process(sock, upstream, "--config", str(cfg)) as (addr, _):  # the profile's own bundle
            assert curl(f"http://{addr}/echo")[0] == 200


@pytest.mark.e2e
def test_the_brokers_word_is_final_lock_logout_remove(idp: str, tmp_path: Path) -> None:
    """Finding 3: the proxy asks the broker for every request's token, so `dc-broker lock`, `logout`
    and `remove` hold from the very next request: 503, and nothing (no token) goes upstream."""
    from tests.test_cli import add_demo, cli, init_keyfile

    home = {k: v for k, v in os.environ.items() if not k.startswith("DC_BROKER_")}
    home.update(
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        XDG_DATA_HOME=str(tmp_path / "data"),
        DC_BROKER_SOCKET=str(tmp_path / "run" / "broker.sock"),
    )
    sock = home["DC_BROKER_SOCKET"]
    init_keyfile(home, tmp_path)
    assert add_demo(home, idp).returncode == 0
    daemon = subprocess.Popen([DC_BROKER, "run"], env=home, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_socket(sock, daemon)
        with running_upstream(idp=idp) as upstream, proxy_process(sock, upstream, profile="acme") as (addr, _):

            def through() -> tuple[int, str, list[str]]:
                before = len(httpx.get(f"{upstream}/seen").json())
                code, body = curl(f"http://{addr}/echo")
                return code, body, httpx.get(f"{upstream}/seen").json()[before:]

            code, body, reached = through()
            assert code == 200 and json.loads(body)["headers"]["authorization"].startswith("Bearer ")
            assert reached == ["GET /echo authorized"]
            assert cli(home, "lock").returncode == 0
            assert through() == (503, "dc-broker proxy: the vault is locked; run `dc-broker unlock`\n", [])
            if ROOT:  # another user is refused for who it is, before the broker is asked: it learns nothing of this
                before = len(httpx.get(f"{upstream}/seen").json())
                foreign = "dc-broker proxy: uid 65534 may not use this proxy (it serves uid 0 only)\n"
                assert curl(f"http://{addr}/echo", user=65534) == (403, foreign)
                assert httpx.get(f"{upstream}/seen").json()[before:] == []
            assert cli(home, "unlock").returncode == 0
            assert through()[0] == 200
            assert cli(home, "logout", "acme").returncode == 0
            code, body, reached = through()
            assert (code, reached) == (503, []) and "`dc-broker login acme`" in body, body
            assert cli(home, "remove", "acme").returncode == 0
            code, body, reached = through()
            assert (code, reached) == (503, []) and "no profile named 'acme'" in body, body
    finally:
        stop(daemon)
