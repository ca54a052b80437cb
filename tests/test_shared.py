"""The shared (system-mode) broker with real users, groups and a systemd-style cgroup unit.

Runs as root (as CI does): creates users and groups, starts `dc-broker run --system`, and connects as
those users with setpriv. The client in the child is stdlib-only python (frames are built here), so
no test user needs to read the project's venv. The caller's identity must come from the kernel: the
frames carry nothing about who sends them.

Issue 13 (the shared broker under attack) is reproduced here with real users: a consumer's login,
set_secrets and logout are forbidden, a user manager's ``report.service`` is not the system unit,
``exe:`` rules admit exactly the pinned program, one uid at its connection or in-flight quota does not
stop another, a refused uid reads ``forbidden``, and a failed chown leaves no socket.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import hashlib
import os
import pwd
import shutil
import signal
import socket
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

USERS = {
    "dcb-etl": ["dcb-clients", "dcb-analytics"],
    "dcb-other": ["dcb-clients"],
    "dcb-ops": ["dcb-clients"],
    "dcb-outsider": [],
}
CGROUPS = Path("/sys/fs/cgroup/systemd")
UNIT_CGROUP = CGROUPS / "system.slice/report.service"
#: dcb-etl's connection quota in this broker (daemon.max_connections_per_uid), and the requests one
#: uid may have waiting on a refresh (daemon.max_in_flight_per_uid)
QUOTA = 20
IN_FLIGHT_QUOTA = 5
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


@contextlib.contextmanager
def _accounts_lock() -> Iterator[None]:
    """One test process at a time changes users and groups (the suite runs in parallel processes:
    two useradd or usermod at once, one fails on /etc/passwd's lock)."""
    with open(os.path.join(tempfile.gettempdir(), "dc-broker-tests-accounts.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure_group(name: str) -> int:
    with _accounts_lock():
        try:
            return grp.getgrnam(name).gr_gid
        except KeyError:
            subprocess.run(["groupadd", name], check=True)
            return grp.getgrnam(name).gr_gid


def ensure_user(name: str, groups: list[str]) -> int:
    with _accounts_lock():
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
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Two programs besides /usr/bin/python3: a copy that differs by a trailing byte string (ELF
    ignores it) at report-runner, and a byte-identical copy of that at another path."""
    tmp = tmp_path_factory.mktemp("programs")
    os.chmod(tmp, 0o755)
    os.chmod(tmp.parent, 0o755)
    runner, twin = tmp / "report-runner", tmp / "runner-twin"
    runner.write_bytes(Path(os.path.realpath("/usr/bin/python3")).read_bytes() + b"\0dc-broker test")
    shutil.copyfile(runner, twin)
    for prog in (runner, twin):
        os.chmod(prog, 0o755)
    return {"runner": str(runner), "twin": str(twin), "python": "/usr/bin/python3"}


@pytest.fixture(scope="module")
def hanging_idp() -> Iterator[str]:
    """A token URL that accepts connections (the kernel's backlog) and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/token"
    finally:
        listener.close()


@pytest.fixture(scope="module")
def shared(users: dict[str, int], programs: dict[str, str], hanging_idp: str) -> Iterator[str]:
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
        "p_admin": '["user:dcb-etl"]\nadmin = ["user:dcb-ops"]',
        "p_uunit": '["user-unit:dcb-other/report.service"]',
        "p_exe": f'["exe:{programs["runner"]}"]',
        "p_hash": f'["exe-sha256:{hashlib.sha256(Path(programs["runner"]).read_bytes()).hexdigest()}"]',
        "p_both": f'["user:dcb-other & exe:{programs["runner"]}"]',
    }
    cfg = Path(tmp) / "config.toml"
    text = f'[daemon]\ngroup = "dcb-clients"\nmax_connections_per_uid = {QUOTA}\n'
    text += f"max_in_flight_per_uid = {IN_FLIGHT_QUOTA}\n"
    for name, allow in rules.items():
        text += f'[profiles.{name}]\nserver = "{base}"\ntenant = "demo"\nclient_id = "dc-service"\n'
        text += 'grant = "client_credentials"\n' + (f"allow = {allow}\n" if allow else "")
    text += f'[profiles.p_hang]\ntoken_url = "{hanging_idp}"\nclient_id = "c"\ngrant = "client_credentials"\n'
    text += 'allow = ["user:dcb-other"]\n'
    rules["p_hang"] = None
    cfg.write_text(text)
    secrets = "".join(f'[{n}]\nclient_secret = "dc-service-secret"\n' for n in rules)
    proc = start_run(cfg, sock, secrets, "--system", stderr=subprocess.DEVNULL, wait=False)
    try:
        wait_for_socket(sock, proc)
        yield sock
    finally:
        # p_hang's refresh never ends: a second SIGTERM (once the first is taken) stops at once
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(1)
        stop(proc)
        idp.terminate()
        idp.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def ask(
    sock: str,
    user: str,
    *requests: Request,
    unit: bool = False,
    cgroup: Path | None = None,
    program: str = "/usr/bin/python3",
    replies: int | None = None,
) -> list[dict]:
    """Send requests as ``user`` (optionally from inside report.service, or another cgroup of the
    name=systemd hierarchy, and from ``program``) and return the replies."""
    data = b"".join(encode(r) for r in requests)
    child = subprocess.Popen(
        [
            "setpriv",
            "--reuid",
            user,
            "--regid",
            user,
            "--init-groups",
            program,
            "-c",
            CLIENT,
            sock,
            data.hex(),
            str(len(requests) if replies is None else replies),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    cgroup = UNIT_CGROUP if unit else cgroup
    if cgroup is not None:
        cgroup.mkdir(parents=True, exist_ok=True)
        (cgroup / "cgroup.procs").write_text(str(child.pid))
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
    # two requests on one connection may be answered in either order (each reply carries its id)
    replies = ask(shared, "dcb-other", token("p_user"), Request(2, "token", {"profile": "no_such"}))
    denied, missing = sorted(replies, key=lambda r: r["id"])
    assert denied["error"]["code"] == missing["error"]["code"] == "forbidden"
    assert denied["error"]["message"].replace("p_user", "X") == missing["error"]["message"].replace("no_such", "X")
    [status] = ask(shared, "dcb-etl", Request(3, "status"))
    assert sorted(p["profile"] for p in status["result"]["profiles"]) == ["p_admin", "p_group", "p_user"]
    [status] = ask(shared, "dcb-other", Request(3, "status"))
    assert sorted(p["profile"] for p in status["result"]["profiles"]) == ["p_hang", "p_uid"]


def test_a_user_outside_the_socket_group_cannot_connect(shared: str) -> None:
    [reply] = ask(shared, "dcb-outsider", token("p_user"))
    assert reply == {"connect_errno": 13}  # EACCES: the socket is 0660 root:dcb-clients


def test_the_client_cannot_claim_an_identity(shared: str) -> None:
    lying = Request(1, "token", {"profile": "p_user", "uid": 0, "user": "dcb-etl", "unit": "report.service"})
    [reply] = ask(shared, "dcb-other", lying)
    assert outcome(reply) == "forbidden"


# ---------------------------------------------------------------- issue 13: the shared broker under attack


def test_a_consumer_cannot_change_the_login(shared: str) -> None:
    """dcb-etl may use p_admin, not change its login: password and device login, set_secrets and
    logout (and logout with forget, `dc-broker remove`'s) are all refused, and the profile still
    serves its original credentials afterwards."""
    attempts = [
        Request(1, "login", {"profile": "p_admin", "password": "chosen-by-the-consumer"}),
        Request(2, "login", {"profile": "p_admin"}),  # the device branch
        Request(3, "set_secrets", {"profile": "p_admin", "client_secret": "consumers-own-secret"}),
        Request(4, "logout", {"profile": "p_admin"}),
        Request(5, "login", {"profile": "p_user"}),
    ]
    replies = ask(shared, "dcb-etl", *attempts)
    assert [outcome(r) for r in replies] == ["forbidden"] * 5
    [forget] = ask(shared, "dcb-etl", Request(6, "logout", {"profile": "p_admin", "forget": True}))
    assert outcome(forget) == "forbidden"  # apart: a uid has at most IN_FLIGHT_QUOTA requests in flight
    assert "admin" in replies[0]["error"]["message"]
    [after] = ask(shared, "dcb-etl", token("p_admin"))
    assert outcome(after) == "ok"


def test_a_profile_admin_may_change_the_secret_and_nothing_else(shared: str) -> None:
    stored, other = ask(
        shared,
        "dcb-ops",
        Request(1, "set_secrets", {"profile": "p_admin", "client_secret": "dc-service-secret"}),
        Request(2, "set_secrets", {"profile": "p_user", "client_secret": "dc-service-secret"}),
    )
    assert outcome(stored) == "ok" and stored["result"]["stored"] == ["client_secret"]
    assert outcome(other) == "forbidden"
    [using] = ask(shared, "dcb-ops", token("p_admin"))
    assert outcome(using) == "forbidden"  # admin is not allow: an admin does not get tokens by it
    [unknown] = ask(shared, "dcb-ops", Request(1, "logout", {"profile": "no_such"}))
    assert outcome(unknown) == "forbidden"  # told apart from nothing


@pytest.fixture
def user_slices(users: dict[str, int]) -> Iterator[None]:
    """The fake user-manager cgroups a test makes are removed again (empty cgroups rmdir cleanly)."""
    yield
    for name in ("dcb-etl", "dcb-other"):
        top = CGROUPS / f"user.slice/user-{users[name]}.slice"
        for path in sorted(top.rglob("*"), key=lambda p: len(p.parts), reverse=True) if top.is_dir() else []:
            if path.is_dir():
                with contextlib.suppress(OSError):
                    path.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()


@pytest.mark.skipif(not CGROUPS.is_dir(), reason="no name=systemd cgroup hierarchy")
@pytest.mark.usefixtures("user_slices")
def test_a_user_managers_report_service_is_not_the_system_unit(shared: str, users: dict[str, int]) -> None:
    uid = users["dcb-other"]
    manager = CGROUPS / f"user.slice/user-{uid}.slice/user@{uid}.service"
    fake = manager / "app.slice/report.service"  # what `systemd-run --user --unit=report.service` makes
    [reply] = ask(shared, "dcb-other", token("p_unit"), cgroup=fake)
    assert outcome(reply) == "forbidden"
    # a cgroup named like the system one inside the user's own tree does not help either
    [reply] = ask(shared, "dcb-other", token("p_unit"), cgroup=manager / "system.slice/report.service")
    assert outcome(reply) == "forbidden"
    # the user-unit rule form admits it, pinned to the manager's uid
    [reply] = ask(shared, "dcb-other", token("p_uunit"), cgroup=fake)
    assert outcome(reply) == "ok"
    [reply] = ask(shared, "dcb-other", token("p_uunit"), unit=True)  # the system unit of that name
    assert outcome(reply) == "forbidden"
    etl = users["dcb-etl"]
    etl_unit = CGROUPS / f"user.slice/user-{etl}.slice/user@{etl}.service/app.slice/report.service"
    [reply] = ask(shared, "dcb-etl", token("p_uunit"), cgroup=etl_unit)  # another user's unit of that name
    assert outcome(reply) == "forbidden"
    # a process of dcb-etl placed inside dcb-other's manager is not dcb-other's user unit
    [reply] = ask(shared, "dcb-etl", token("p_uunit"), cgroup=fake)
    assert outcome(reply) == "forbidden"


def test_exe_rules_admit_exactly_the_pinned_program(shared: str, programs: dict[str, str]) -> None:
    def outcomes(program: str) -> list[str]:
        # replies come as they are ready (a new program's first one after its hash): in id order here
        replies = ask(shared, "dcb-other", token("p_exe"), Request(2, "token", {"profile": "p_hash"}), program=program)
        return [outcome(r) for r in sorted(replies, key=lambda r: r["id"])]

    assert outcomes(programs["runner"]) == ["ok", "ok"]
    assert outcomes(programs["python"]) == ["forbidden", "forbidden"]
    assert outcomes(programs["twin"]) == ["forbidden", "ok"]  # same content at another path: the hash form only

    def both(user: str, program: str) -> str:
        return outcome(ask(shared, user, token("p_both"), program=program)[0])

    # "user:dcb-other & exe:RUNNER": that user's runner only
    assert both("dcb-other", programs["runner"]) == "ok"
    assert both("dcb-etl", programs["runner"]) == "forbidden"
    assert both("dcb-other", programs["python"]) == "forbidden"


HOLDER = r"""
import socket, sys
held, hello = [], bytes.fromhex(sys.argv[4])
for _ in range(int(sys.argv[2])):  # each answers a hello first: accepted and counted, then idle
    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(hello); s.settimeout(10)
    ok = s.recv(65536)[4:]
    held.append(s)
    if b"server" not in ok:
        print("refused", ok.hex(), flush=True)
print("held", flush=True)
sys.stdin.readline()
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(bytes.fromhex(sys.argv[3]))
s.settimeout(10)
print(s.recv(65536).hex(), flush=True)
sys.stdin.readline()
"""

TIMED = r"""
import socket, sys, time
t0 = time.monotonic()
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(bytes.fromhex(sys.argv[2]))
s.settimeout(10)
buf = s.recv(65536)
while len(buf) < 4 or len(buf) < 4 + int.from_bytes(buf[:4], "big"):
    buf += s.recv(65536)
print(time.monotonic() - t0, buf.hex())
"""


def _as(user: str, script: str, *args: str) -> list[str]:
    return ["setpriv", "--reuid", user, "--regid", user, "--init-groups", "/usr/bin/python3", "-c", script, *args]


def _frame(hexed: str) -> dict:
    raw = bytes.fromhex(hexed)
    return msgpack.unpackb(raw[4 : 4 + int.from_bytes(raw[:4], "big")])


def test_one_uid_at_its_connection_quota_does_not_lock_out_another(shared: str) -> None:
    holder = subprocess.Popen(
        _as("dcb-etl", HOLDER, shared, str(QUOTA), encode(token("p_user")).hex(), encode(Request(1, "hello")).hex()),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdin is not None and holder.stdout is not None
    try:
        assert holder.stdout.readline().strip() == "held"
        holder.stdin.write("\n")
        holder.stdin.flush()
        over = _frame(holder.stdout.readline().strip())  # dcb-etl's connection beyond its quota
        assert over["error"]["code"] == "overloaded" and "max_connections_per_uid" in over["error"]["message"]
        times = []
        for _ in range(3):
            out = subprocess.run(
                _as("dcb-other", TIMED, shared, encode(token("p_uid")).hex()),
                capture_output=True,
                text=True,
                timeout=20,
            )
            seconds, hexed = out.stdout.split()
            assert _frame(hexed)["ok"], _frame(hexed)
            times.append(float(seconds))
        assert min(times) < 0.1, times
    finally:
        holder.kill()
        holder.wait()


def test_a_forbidden_uid_reads_forbidden_not_a_reset(users: dict[str, int]) -> None:
    """A per-user broker (here root's) whose socket was opened up: another uid gets ``forbidden``
    for its request, not a reset that dc-token would read as 'no broker running'."""
    tmp = Path(tempfile.mkdtemp(prefix="dcb-user-", dir="/tmp"))
    os.chmod(tmp, 0o755)
    cfg = tmp / "config.toml"
    cfg.write_text("")
    sock = str(tmp / "run" / "b.sock")
    proc = start_run(cfg, sock, "", stderr=subprocess.DEVNULL)
    try:
        os.chmod(os.path.dirname(sock), 0o755)
        os.chmod(sock, 0o666)
        for _ in range(3):
            [reply] = ask(sock, "dcb-other", Request(7, "hello"))
            assert reply["id"] == 7 and reply["error"]["code"] == "forbidden", reply
            assert "only its own user" in reply["error"]["message"]
    finally:
        stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def test_system_mode_without_permission_to_chown_the_socket_fails_cleanly(users: dict[str, int]) -> None:
    """Root without CAP_CHOWN (the bounding set dropped) may not give the socket to a group it is not
    in: one clear error naming the group, and no socket left behind."""
    tmp = Path(tempfile.mkdtemp(prefix="dcb-chown-", dir="/tmp"))
    try:
        cfg = tmp / "config.toml"
        cfg.write_text('[daemon]\ngroup = "dcb-clients"\n')
        sock = tmp / "run" / "b.sock"
        result = subprocess.run(
            [
                "setpriv",
                "--bounding-set=-chown",
                DC_BROKER,
                "run",
                "--system",
                "--config",
                str(cfg),
                "--socket",
                str(sock),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode != 0
        assert "dcb-clients" in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert not sock.exists()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_one_uid_cannot_hold_more_than_its_in_flight_quota(shared: str) -> None:
    """Requests waiting on a refresh (an IdP that never answers) count per uid: the one past the
    quota is told so at once, the others keep waiting."""
    waiting = [Request(i, "token", {"profile": "p_hang"}) for i in range(1, IN_FLIGHT_QUOTA + 2)]
    [first] = ask(shared, "dcb-other", *waiting, replies=1)  # the first answer to come back
    assert first["id"] == IN_FLIGHT_QUOTA + 1 and first["error"]["code"] == "overloaded", first
    assert "max_in_flight_per_uid" in first["error"]["message"]
    [other] = ask(shared, "dcb-etl", token("p_user"))  # another uid is not affected
    assert outcome(other) == "ok"


@pytest.fixture
def keys_shared(users: dict[str, int]) -> Iterator[str]:
    """A shared broker with p_keys alone: a profile that signs with a key of its own (none yet: its
    owner makes one), used by dcb-ops (allow), administered by nobody but the owner. Its IdP is never
    reached by what the test asks (a port nothing listens on)."""
    tmp = tempfile.mkdtemp(prefix="dcb-keys-", dir="/tmp")
    os.chmod(tmp, 0o755)
    sock = os.path.join(tmp, "broker.sock")
    cfg = Path(tmp) / "config.toml"
    cfg.write_text(
        '[daemon]\ngroup = "dcb-clients"\n[profiles.p_keys]\ntoken_url = "http://127.0.0.1:9/token"\n'
        'client_id = "dc-keys"\ngrant = "client_credentials"\nauth_method = "private_key_jwt"\n'
        'allow = ["user:dcb-ops"]\n'
    )
    proc = start_run(cfg, sock, "", "--system", stderr=subprocess.DEVNULL, wait=False)
    try:
        wait_for_socket(sock, proc)
        yield sock
    finally:
        stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def test_a_consumer_cannot_make_activate_or_check_a_client_key(keys_shared: str) -> None:
    """Issue 26: a key is changed and checked only by who may change the profile's login (its
    ``admin`` rules, the broker's owner), as a secret is. dcb-ops may use p_keys (allow), not make
    its next key, activate it or ask the IdP about it; the owner (root) may make one. What the
    consumer's status shows of it: the public keys (public by design: docs/keycloak.md), nothing private."""
    attempts = [
        Request(1, "set_secrets", {"profile": "p_keys", "new_key": "ec"}),
        Request(2, "set_secrets", {"profile": "p_keys", "activate_key": True, "verify": True}),
        Request(3, "set_secrets", {"profile": "p_keys", "activate_key": True}),
        Request(4, "set_secrets", {"profile": "p_keys", "verify": True}),  # `dc-broker keys --check`
    ]
    replies = ask(keys_shared, "dcb-ops", *attempts)
    assert [outcome(r) for r in replies] == ["forbidden"] * 4, replies
    assert all("may not change the login or secrets of profile 'p_keys'" in r["error"]["message"] for r in replies)
    [before] = ask(keys_shared, "dcb-ops", Request(5, "status", {"profile": "p_keys"}))
    assert before["result"]["profiles"][0]["client_auth"] == {"method": "private_key_jwt", "keys": []}
    [made] = ask(keys_shared, "root", Request(6, "set_secrets", {"profile": "p_keys", "new_key": "ec"}))
    assert outcome(made) == "ok" and made["result"]["stored"] == ["client_keys"], made
    jwks = made["result"]["jwks"]
    [status] = ask(keys_shared, "dcb-ops", Request(7, "status", {"profile": "p_keys"}))
    shown = status["result"]["profiles"][0]["client_auth"]
    assert shown["jwks"] == jwks and [k["kid"] for k in shown["keys"]] == [jwks["keys"][0]["kid"]]
    assert set(jwks["keys"][0]) == {"kty", "crv", "x", "y", "kid", "alg", "use"}  # no "d"
    assert "PRIVATE" not in repr(status) and "pem" not in repr(status)
    [still] = ask(keys_shared, "dcb-ops", Request(8, "set_secrets", {"profile": "p_keys", "activate_key": True}))
    assert outcome(still) == "forbidden"
