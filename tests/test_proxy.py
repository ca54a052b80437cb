"""`dc-broker proxy`: the pure rules (socket table, admission, headers), then the real proxy process
in front of the dev IdP's demo API and a streaming test upstream, driven by curl."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from dc_broker.errors import ConfigError
from dc_broker.proxy import Listen, Rules, admit, tcp_owner, upstream_headers, upstream_url
from tests.e2e import DC_BROKER, dev_broker
from tests.test_client_e2e import revoke
from tests.tls import make_tls
from tests.upstream import pattern_digest, running_upstream

API = "/dp/api/v1/aiconnections/types"
ROOT = os.getuid() == 0

# /proc/net/tcp as the kernel writes it: both ends of a loopback connection 127.0.0.1:40000 -> :8765
TCP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:223D 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 111 1
   1: 0100007F:9C40 0100007F:223D 01 00000000:00000000 00:00000000 00000000  1001        0 222 1
   2: 0100007F:223D 0100007F:9C40 01 00000000:00000000 00:00000000 00000000  1000        0 333 1
"""
TCP6 = """  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:9C41 00000000000000000000000001000000:223D 01 00000000:00000000 00:00000000 00000000  1002        0 444 1
   1: 0000000000000000FFFF00000100007F:9C42 0000000000000000FFFF00000100007F:223D 01 00000000:00000000 00:00000000 00000000  1003        0 555 1
"""


def test_socket_table_gives_the_client_ends_uid() -> None:
    assert tcp_owner([TCP], ("127.0.0.1", 40000), ("127.0.0.1", 8765)) == 1001  # not the server end's 1000
    assert tcp_owner([TCP], ("127.0.0.1", 40001), ("127.0.0.1", 8765)) is None
    assert tcp_owner([TCP, TCP6], ("::1", 40001), ("::1", 8765)) == 1002
    assert tcp_owner([TCP6], ("127.0.0.1", 40002), ("127.0.0.1", 8765)) == 1003  # v4-mapped on a v6 socket


def test_admission_rules() -> None:
    rules = Rules(uid=1000, hosts=Listen().hosts(8765), allowed_origins=frozenset({"https://app.example.com"}))
    ok = [(b"Host", b"127.0.0.1:8765")]
    assert admit(rules, 1000, ok) is None
    assert admit(rules, 1000, [(b"host", b"LOCALHOST:8765")]) is None
    assert "uid 1001 may not use" in str(admit(rules, 1001, ok))
    assert "cannot tell" in str(admit(rules, None, ok))
    assert "Origin https://evil.example" in str(admit(rules, 1000, [*ok, (b"Origin", b"https://evil.example")]))
    assert "Sec-Fetch-Site" in str(admit(rules, 1000, [*ok, (b"Sec-Fetch-Site", b"same-origin")]))
    assert (
        admit(rules, 1000, [*ok, (b"Origin", b"https://app.example.com"), (b"Sec-Fetch-Site", b"cross-site")]) is None
    )
    assert "DNS rebinding" in str(admit(rules, 1000, [(b"Host", b"evil.example:8765")]))
    assert "DNS rebinding" in str(admit(rules, 1000, []))
    assert admit(Rules(uid=1000), 1000, [(b"Host", b"anything")]) is None  # a Unix listener: no Host check


def test_listen_addresses() -> None:
    assert Listen.parse("127.0.0.1:9000") == Listen("127.0.0.1", 9000)
    assert Listen.parse("[::1]:9000") == Listen("::1", 9000)
    assert Listen.parse("localhost:0") == Listen("127.0.0.1", 0)
    assert Listen.parse("unix:/run/x.sock").path == "/run/x.sock"
    for bad in ("0.0.0.0:8765", "192.168.1.5:80", "example.com:80", "unix:"):
        with pytest.raises(ConfigError):
            Listen.parse(bad)


def test_headers_to_upstream() -> None:
    sent = [
        (b"Host", b"127.0.0.1:8765"),
        (b"Authorization", b"Basic bm8="),
        (b"Connection", b"keep-alive"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Accept", b"application/json"),
        (b"X-Custom", b"1"),
    ]
    assert upstream_headers(sent, "tok") == [
        (b"Accept", b"application/json"),
        (b"X-Custom", b"1"),
        (b"authorization", b"Bearer tok"),
    ]
    assert upstream_url("https://dc.example.com/", b"/dp/api?x=1") == "https://dc.example.com/dp/api?x=1"
    with pytest.raises(ValueError, match="origin-form"):
        upstream_url("https://dc.example.com", b"http://elsewhere/")


# ---------------------------------------------------------------- the real proxy


@contextmanager
def proxy_process(sock: str, upstream: str, *args: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    proc = subprocess.Popen(
        [DC_BROKER, "proxy", "demo", "--socket", sock, "--upstream", upstream, "--listen", "127.0.0.1:0", *args],
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


@pytest.mark.e2e
def test_no_broker_and_no_upstream_are_clear_answers(dev, tmp_path: Path) -> None:
    sock, _, _ = dev
    result = subprocess.run(
        [DC_BROKER, "proxy", "demo", "--socket", str(tmp_path / "none.sock"), "--upstream", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0 and "no dc-broker is running" in result.stderr
    result = subprocess.run(
        [DC_BROKER, "proxy", "demo", "--socket", sock, "--upstream", "http://dc.example.com"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0 and "plain http to a non-loopback host" in result.stderr
    with proxy_process(sock, "http://127.0.0.1:9") as (addr, _):
        code, body = curl(f"http://{addr}{API}")
        assert code == 502 and "upstream http://127.0.0.1:9 failed: ConnectError" in body
    with proxy_process(sock, "http://127.0.0.1:9") as (addr, _):
        code, body = curl(f"http://{addr}/x", "-H", "Host: 127.0.0.1:1")
        assert code == 403
    assert sys.executable  # the processes above ran under this interpreter's venv


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
