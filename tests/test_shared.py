"""The shared (system-mode) broker with real users, groups and a systemd-style cgroup unit.

Runs as root (as CI does): creates users and groups, starts `dc-broker run --system`, and connects as
those users with setpriv. The client in the child is stdlib-only python (frames are built here), so
no test user needs to read the project's venv. The caller's identity must come from the kernel: the
frames carry nothing about who sends them.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from dc_token.protocol import Request, encode
from tests.e2e import DC_BROKER, start_run, stop, wait_for_socket

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("useradd"),
        reason="needs root, setpriv, useradd",
    ),
]

USERS = {"dcb-etl": ["dcb-clients", "dcb-analytics"], "dcb-other": ["dcb-clients"], "dcb-outsider": []}
UNIT_CGROUP = Path("/sys/fs/cgroup/systemd/system.slice/report.service")
CLIENT = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX)
sys.stdin.readline()  # the parent has placed us (cgroup) and says go
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print("CONNECT", exc.errno); sys.exit(0)
s.sendall(bytes.fromhex(sys.argv[2]))
n, buf = int(sys.argv[3]), b""
s.settimeout(10)
while True:
    frames, rest = 0, buf
    while len(rest) >= 4 and len(rest) >= 4 + int.from_bytes(rest[:4], "big"):
        rest = rest[4 + int.from_bytes(rest[:4], "big"):]; frames += 1
    if frames >= n: break
    data = s.recv(65536)
    if not data: break
    buf += data
print(buf.hex())
"""


def ensure_group(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        subprocess.run(["groupadd", name], check=True)
        return grp.getgrnam(name).gr_gid


def ensure_user(name: str, groups: list[str]) -> int:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)
    if groups:
        subprocess.run(["usermod", "-a", "-G", ",".join(groups), name], check=True)
    return pwd.getpwnam(name).pw_uid


@pytest.fixture(scope="module")
def users() -> dict[str, int]:
    for g in ("dcb-clients", "dcb-analytics"):
        ensure_group(g)
    return {name: ensure_user(name, groups) for name, groups in USERS.items()}


@pytest.fixture(scope="module")
def shared(users: dict[str, int]) -> Iterator[str]:
    idp = subprocess.Popen(
        [os.path.join(os.path.dirname(DC_BROKER), "python"), "-m", "dc_broker.devserver"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert idp.stdout is not None
    base = idp.stdout.readline().strip()
    tmp = tempfile.mkdtemp(prefix="dcb-shared-", dir="/tmp")
    os.chmod(tmp, 0o755)
    sock = os.path.join(tmp, "broker.sock")
    rules = {
        "p_user": '["user:dcb-etl"]',
        "p_uid": f'["uid:{users["dcb-other"]}"]',
        "p_group": '["group:dcb-analytics"]',
        "p_unit": '["unit:report.service"]',
        "p_none": None,
    }
    cfg = Path(tmp) / "config.toml"
    text = '[daemon]\ngroup = "dcb-clients"\n'
    for name, allow in rules.items():
        text += f'[profiles.{name}]\nserver = "{base}"\ntenant = "demo"\nclient_id = "dc-service"\n'
        text += 'grant = "client_credentials"\n' + (f"allow = {allow}\n" if allow else "")
    cfg.write_text(text)
    secrets = "".join(f'[{n}]\nclient_secret = "dc-service-secret"\n' for n in rules)
    proc = start_run(cfg, sock, secrets, "--system", stderr=subprocess.DEVNULL, wait=False)
    try:
        wait_for_socket(sock, proc)
        yield sock
    finally:
        stop(proc)
        idp.terminate()
        idp.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def ask(sock: str, user: str, *requests: Request, unit: bool = False) -> list[dict]:
    """Send requests as ``user`` (optionally from inside report.service) and return the replies."""
    data = b"".join(encode(r) for r in requests)
    child = subprocess.Popen(
        [
            "setpriv",
            "--reuid",
            user,
            "--regid",
            user,
            "--init-groups",
            "/usr/bin/python3",
            "-c",
            CLIENT,
            sock,
            data.hex(),
            str(len(requests)),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if unit:
        UNIT_CGROUP.mkdir(parents=True, exist_ok=True)
        (UNIT_CGROUP / "cgroup.procs").write_text(str(child.pid))
    out, err = child.communicate("go\n", timeout=20)
    assert child.returncode == 0, err
    if out.startswith("CONNECT"):
        return [{"connect_errno": int(out.split()[1])}]
    raw, frames = bytes.fromhex(out.strip()), []
    while raw:
        size = int.from_bytes(raw[:4], "big")
        frames.append(msgpack.unpackb(raw[4 : 4 + size]))
        raw = raw[4 + size :]
    return frames


def token(profile: str) -> Request:
    return Request(1, "token", {"profile": profile})


def outcome(reply: dict) -> str:
    return "ok" if reply["ok"] else reply["error"]["code"]


def test_each_rule_kind_allows_exactly_its_callers(shared: str) -> None:
    etl = [outcome(ask(shared, "dcb-etl", token(p))[0]) for p in ("p_user", "p_uid", "p_group", "p_unit", "p_none")]
    assert etl == ["ok", "forbidden", "ok", "forbidden", "forbidden"]
    other = [outcome(ask(shared, "dcb-other", token(p))[0]) for p in ("p_user", "p_uid", "p_group", "p_unit", "p_none")]
    assert other == ["forbidden", "ok", "forbidden", "forbidden", "forbidden"]


@pytest.mark.skipif(not Path("/sys/fs/cgroup/systemd").is_dir(), reason="no name=systemd cgroup hierarchy")
def test_unit_rule_from_the_callers_cgroup(shared: str) -> None:
    [reply] = ask(shared, "dcb-other", token("p_unit"), unit=True)
    assert outcome(reply) == "ok"


def test_a_denied_caller_learns_nothing_about_other_profiles(shared: str) -> None:
    denied, missing = ask(shared, "dcb-other", token("p_user"), Request(2, "token", {"profile": "no_such"}))
    assert denied["error"]["code"] == missing["error"]["code"] == "forbidden"
    assert denied["error"]["message"].replace("p_user", "X") == missing["error"]["message"].replace("no_such", "X")
    [status] = ask(shared, "dcb-etl", Request(3, "status"))
    assert sorted(p["profile"] for p in status["result"]["profiles"]) == ["p_group", "p_user"]
    [status] = ask(shared, "dcb-other", Request(3, "status"))
    assert [p["profile"] for p in status["result"]["profiles"]] == ["p_uid"]


def test_a_user_outside_the_socket_group_cannot_connect(shared: str) -> None:
    [reply] = ask(shared, "dcb-outsider", token("p_user"))
    assert reply == {"connect_errno": 13}  # EACCES: the socket is 0660 root:dcb-clients


def test_the_client_cannot_claim_an_identity(shared: str) -> None:
    lying = Request(1, "token", {"profile": "p_user", "uid": 0, "user": "dcb-etl", "unit": "report.service"})
    [reply] = ask(shared, "dcb-other", lying)
    assert outcome(reply) == "forbidden"
