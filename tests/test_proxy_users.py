"""`dc-broker proxy` run by root against another real user (setpriv, as tests/test_shared.py does),
issue 21's findings 1 and 2: the caller check cannot be raced, and no other uid can lock the owner out.

The proxy is a real process over loopback TCP, in front of the test upstream, which records every
request that reaches it (``/seen``): what another user got through is read there, not guessed from
what the attacker saw (the attack is blind: it closes before any answer).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest

from dc_broker.proxy.rules import Limits
from tests.e2e import dev_broker
from tests.test_proxy import curl, proxy_process
from tests.test_shared import ensure_user
from tests.upstream import running_upstream

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("useradd"),
        reason="needs root, setpriv, useradd",
    ),
]

OTHER = "dcb-outsider"

#: connect, send one request, close at once; ``sys.argv[2]`` times
RACER = r"""
import socket, sys
host, port = sys.argv[1].rsplit(":", 1)
for i in range(int(sys.argv[2])):
    s = socket.create_connection((host, int(port)))
    s.sendall(f"POST /echo?attack={i} HTTP/1.1\r\nHost: {sys.argv[1]}\r\nContent-Length: 2\r\n\r\nhi".encode())
    s.close()
print("done", flush=True)
"""

#: open ``sys.argv[2]`` connections and hold them (a partial request head on each) until stdin closes
HOLDER = r"""
import resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
host, port = sys.argv[1].rsplit(":", 1)
held = []
for _ in range(int(sys.argv[2])):
    s = socket.create_connection((host, int(port)))
    try:
        s.sendall(b"GET /echo?held HTTP/1.1\r\nHost: " + sys.argv[1].encode() + b"\r\n")  # never finished
    except OSError:
        pass  # refused and closed already: the connection was made all the same
    held.append(s)
print("held", len(held), flush=True)
sys.stdin.read()
"""


def as_other(script: str, *args: str, **kw: object) -> subprocess.Popen[str]:
    cmd = ["setpriv", "--reuid", OTHER, "--regid", OTHER, "--init-groups", "/usr/bin/python3", "-c", script, *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def other() -> str:
    ensure_user(OTHER, [])
    return OTHER


@pytest.fixture(scope="module")
def proxied(other: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(the proxy's address, the upstream's URL): root's proxy in front of a recording upstream."""
    with (
        dev_broker(tmp_path_factory.mktemp("proxy-users")) as (sock, _, _),
        running_upstream() as upstream,
        proxy_process(sock, upstream) as (addr, proc),
    ):
        yield addr, upstream
        assert proc.poll() is None, "the proxy died"


def seen(upstream: str) -> list[str]:
    return list(httpx.get(f"{upstream}/seen").json())


def test_a_client_that_closes_at_once_never_gets_a_request_through_as_root(proxied: tuple[str, str]) -> None:
    """Finding 1: connect, send and close at once leaves an orphan socket that /proc/net/tcp shows
    as uid 0; the proxy must refuse it, not send it upstream with root's token. 1,000 tries."""
    addr, upstream = proxied
    racer = as_other(RACER, addr, "1000")
    out, err = racer.communicate(timeout=120)
    assert racer.returncode == 0 and out.strip() == "done", err
    assert curl(f"http://{addr}/echo?after")[0] == 200  # the owner still gets through (and the proxy lives)
    got_through = [line for line in seen(upstream) if "attack=" in line]
    assert got_through == [], f"{len(got_through)} of 1000 requests of uid {OTHER} reached the upstream"


def test_the_owner_gets_through_while_another_uid_holds_3000_connections(proxied: tuple[str, str]) -> None:
    """Finding 2: another uid's connections take none of the owner's slots, and are turned away
    before their request head arrives."""
    addr, upstream = proxied
    holder = as_other(HOLDER, addr, "3000", stdin=subprocess.PIPE)
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline()
        assert line.strip() == "held 3000", (line, holder.stderr.read() if holder.poll() is not None else "")
        times = []
        for i in range(3):
            started = time.monotonic()
            code, body = curl(f"http://{addr}/echo?owner={i}", "--max-time", "5")
            times.append(time.monotonic() - started)
            assert code == 200, body
        assert max(times) < 1.0, times
    finally:
        holder.kill()
        holder.wait()
    # and once it lets go (the old code kept the owner out for about a minute more)
    for i in range(3):
        started = time.monotonic()
        code, body = curl(f"http://{addr}/echo?after-holder={i}", "--max-time", "5")
        assert code == 200, body
        assert time.monotonic() - started < 1.0, f"request {i} after the holder stopped"
    assert not [line for line in seen(upstream) if "?held" in line]


#: connect and send nothing: how long until the first byte of an answer came, and all that came
SILENT = r"""
import json, socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
s = socket.create_connection((host, int(port)))
started = time.monotonic()
s.settimeout(10)
answer = s.recv(65536)
took = time.monotonic() - started
while chunk := s.recv(65536):
    answer += chunk
print(json.dumps({"took": took, "answer": answer.decode()}), flush=True)
"""

#: open ``sys.argv[2]`` connections at once and send nothing on any; then read what each got (all
#: still open, so the proxy's refusals are all under way at once); then close them all and connect
#: again until one is answered (the refusals are counted at a time, not for ever)
CAPPED = r"""
import json, socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
held = [socket.create_connection((host, int(port))) for _ in range(int(sys.argv[2]))]
got = []
for s in held:
    s.settimeout(10)
    try:
        got.append(s.recv(65536).decode())
    except ConnectionResetError:
        got.append("reset")
for s in held:
    s.close()
deadline = time.monotonic() + 10
again = ""
while not again and time.monotonic() < deadline:
    with socket.create_connection((host, int(port))) as s:
        s.settimeout(10)
        again = s.recv(65536).decode()
    time.sleep(0.05)
print(json.dumps({"got": got, "again": again}), flush=True)
"""


def refused_as(other: str) -> str:
    """The body of the 403 another user's connection gets from root's proxy."""
    return f"dc-broker proxy: uid {pwd.getpwnam(other).pw_uid} may not use this proxy (it serves uid 0 only)\n"


def test_another_uids_connection_is_refused_at_once_without_a_request(proxied: tuple[str, str], other: str) -> None:
    """Finding 2: a foreign uid is told 403 as soon as it connects, not once its request head came
    (the old code waited up to 10 s for the head, holding a slot all that time)."""
    addr, _ = proxied
    out = as_other(SILENT, addr)
    stdout, stderr = out.communicate(timeout=30)
    assert out.returncode == 0, stderr
    told = json.loads(stdout)
    assert told["answer"].startswith("HTTP/1.1 403 Forbidden\r\n"), told
    assert told["answer"].endswith("\r\n\r\n" + refused_as(other)), told
    assert told["took"] < 1.0, told


def test_beyond_its_refusals_at_a_time_another_uids_connections_are_closed_unanswered(
    proxied: tuple[str, str], other: str
) -> None:
    """``Limits.refusals_per_uid`` (4) of one uid's connections are told 403 at a time; more, while
    those are still open, are closed without a word (a flood costs the proxy no task each). Once
    they are closed, the next is told again."""
    addr, _ = proxied
    at_once = Limits().refusals_per_uid
    out = as_other(CAPPED, addr, str(at_once + 2))
    stdout, stderr = out.communicate(timeout=60)
    assert out.returncode == 0, stderr
    result = json.loads(stdout)
    told = [answer for answer in result["got"] if answer]
    assert (len(told), result["got"].count("")) == (at_once, 2), result
    for answer in [*told, result["again"]]:
        assert answer.startswith("HTTP/1.1 403 Forbidden\r\n") and answer.endswith(refused_as(other)), result


#: a socket made as root by a process that becomes another user before it connects with it
DROPPER = r"""
import os, socket, sys
host, port = sys.argv[1].rsplit(":", 1)
s = socket.socket()
os.setgroups([]); os.setgid(int(sys.argv[2])); os.setuid(int(sys.argv[2]))
s.connect((host, int(port)))
s.sendall(f"GET /echo?dropped HTTP/1.1\r\nHost: {sys.argv[1]}\r\n\r\n".encode())
s.settimeout(10)
print(s.recv(65536).decode(errors="replace"), flush=True)
"""


def test_a_root_socket_held_by_another_users_process_is_refused(proxied: tuple[str, str], other: str) -> None:
    """The socket's uid is its creator's (root); the process that holds and uses it is another
    user's. The kernel's uid alone would admit it: the holder check refuses it."""
    addr, upstream = proxied
    uid = str(pwd.getpwnam(other).pw_uid)
    out = subprocess.run(["/usr/bin/python3", "-c", DROPPER, addr, uid], capture_output=True, text=True, timeout=30)
    assert out.stdout.startswith("HTTP/1.1 403 Forbidden\n"), (out.stdout, out.stderr)  # text mode: CRLF read as LF
    assert out.stdout.endswith("(no process of uid 0 holds the connection); refused\n\n"), out.stdout
    assert not [line for line in seen(upstream) if "?dropped" in line]
