"""Processes that hold a secret keep it from the other processes of their own user (issue 22,
findings 7 and 9), with real users as tests/test_shared.py has them.

``dc-token exec --token-file``, a ``dc-broker add`` waiting at the IdP and a ``dc-broker login``
whose broker waits at the IdP run as dcb-other (from a world-readable copy of the project:
tests/user_site.py); another process of dcb-other then tries to read their memory through
``/proc/PID/mem`` and counts the copies of the token or the password it finds. Before the fix it
found 7 copies of the token and 3 of the password; now the kernel refuses to open the file, while
the same reader still reads the (unprotected) command beside dc-token. Each starts with a soft core
limit (``CORE_SOFT``): it lowers it to 0 for itself, and dc-token's command gets it back.
A ``kill -9`` of dc-token ends its command (the parent-death signal) and leaves its token file
behind only until the user's next ``dc-token exec --token-file``.
"""

from __future__ import annotations

import os
import pwd
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import wait_for, wait_for_socket
from tests.test_shared import hanging_idp, programs, shared, users  # noqa: F401 - the fixtures
from tests.user_site import PYTHON, as_user, make_user_site, user_env

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("useradd"),
        reason="needs root, setpriv, useradd",
    ),
]

USER = "dcb-other"  # may use p_uid on the shared broker (tests/test_shared.py)

#: the soft core-file limit these processes start with (the hard one: unlimited), as a user's shell
#: might set it: a process that holds a secret lowers it to 0 for itself, its command gets it back
CORE_SOFT = 7 * 1024 * 1024

#: run as the user: open /proc/PID/mem and count the needle in every readable mapping
READER = r"""
import sys
pid, needle = int(sys.argv[1]), sys.argv[2].encode()
try:
    mem = open(f"/proc/{pid}/mem", "rb", buffering=0)
except OSError as exc:
    print("refused", exc.errno)
    sys.exit(0)
found = 0
for line in open(f"/proc/{pid}/maps"):
    span, perms = line.split()[:2]
    if perms[0] != "r":
        continue
    start, end = (int(x, 16) for x in span.split("-"))
    try:
        mem.seek(start)
        found += mem.read(end - start).count(needle)
    except (OSError, OverflowError, ValueError):
        continue
print("read", found)
"""


@pytest.fixture(scope="module")
def site() -> Iterator[str]:
    path = make_user_site()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def user_dir() -> Iterator[Path]:
    """A private directory of the user's own (its runtime or home directory in these tests)."""
    path = Path(tempfile.mkdtemp(prefix="dcb-user-", dir="/tmp"))
    entry = pwd.getpwnam(USER)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def read_memory(pid: int, needle: str) -> str:
    """What another process of the user gets from ``/proc/PID/mem``: ``refused ERRNO`` or ``read N``
    (N copies of ``needle``)."""
    cmd = ["setpriv", "--reuid", USER, "--regid", USER, "--init-groups", PYTHON, "-c", READER, str(pid), needle]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def with_core_limit() -> None:
    """Popen's preexec_fn: the process (through setpriv) starts with ``CORE_SOFT``, hard unlimited."""
    resource.setrlimit(resource.RLIMIT_CORE, (CORE_SOFT, resource.RLIM_INFINITY))


def holding(site: str, env: dict[str, str], secret: str, *args: str) -> subprocess.Popen[str]:
    """`dc-broker ARGS` as the user, started with ``CORE_SOFT``, with ``secret`` written to its stdin
    (a line, flushed; the pipe is left open)."""
    proc = subprocess.Popen(
        as_user(USER, site, "dc-broker", *args),
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
        preexec_fn=with_core_limit,
    )
    assert proc.stdin is not None
    proc.stdin.write(secret + "\n")
    proc.stdin.flush()
    return proc


def core_limit(pid: int) -> list[str]:
    """The process's RLIMIT_CORE as ``/proc/PID/limits`` shows it: [soft, hard]."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            return line.removeprefix("Max core file size").split()[:2]
    raise AssertionError(f"no core limit in /proc/{pid}/limits")


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def token_dirs(where: Path) -> list[Path]:
    return sorted(p for p in where.iterdir() if p.name.startswith("dc-token-"))


def test_dc_token_exec_is_unreadable_to_the_users_other_processes_and_a_kill_9_ends_its_command(
    shared: str,  # noqa: F811 - the fixture
    site: str,
    user_dir: Path,
) -> None:
    """dc-token exec started with a soft core limit (as a user's shell may give it): the supervisor
    holds the token and dumps no core; the command it runs gets the limit it was started with."""
    env = user_env({"DC_BROKER_SOCKET": shared, "XDG_RUNTIME_DIR": str(user_dir)})
    argv = as_user(USER, site, "dc-token", "exec", "p_uid", "--token-file", "--", "sleep", "120")
    supervisor = subprocess.Popen(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=with_core_limit
    )
    try:
        wait_for(lambda: children_of(supervisor.pid), 30, "the command beside dc-token", process=supervisor)
        [command] = children_of(supervisor.pid)
        [directory] = token_dirs(user_dir)
        token = (directory / "token").read_text().strip()
        assert token.count(".") == 2
        assert read_memory(supervisor.pid, token) == f"refused {13}"  # EACCES: not dumpable
        # the same reader does read a process of the user that does not protect itself
        assert read_memory(command, "sleep").startswith("read ")
        assert core_limit(supervisor.pid) == ["0", "unlimited"]  # no core file of the supervisor
        assert core_limit(command) == [str(CORE_SOFT), "unlimited"]  # the command has its own back

        supervisor.kill()  # kill -9: no finally, no cleanup of its own
        supervisor.wait(10)
        wait_for(lambda: not alive(command), 10, "the command to get its parent-death signal")
        assert token_dirs(user_dir) == [directory]  # left behind...
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait(10)
    again = subprocess.run(
        as_user(USER, site, "dc-token", "exec", "p_uid", "--token-file", "--", "true"),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0, again.stderr
    assert token_dirs(user_dir) == []  # ...until the next one: it removed its own and the one left


def test_a_waiting_add_keeps_the_password_from_the_users_other_processes(site: str, user_dir: Path) -> None:
    """`dc-broker add` has read the client secret and waits for the IdP to answer its check (it never
    does): another process of the user cannot open its memory."""
    env = user_env(
        {
            "XDG_CONFIG_HOME": str(user_dir / "config"),
            "XDG_DATA_HOME": str(user_dir / "data"),
            "DC_BROKER_SOCKET": str(user_dir / "none.sock"),
        }
    )
    init = subprocess.run(
        as_user(USER, site, "dc-broker", "init", "--key-source", "keyfile"),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert init.returncode == 0, init.stderr
    secret = f"dcb-planted-{secrets.token_hex(8)}"
    with socket.socket() as idp:
        idp.bind(("127.0.0.1", 0))
        idp.listen(8)
        idp.settimeout(30)
        args = ["add", "svc", "--server", f"http://127.0.0.1:{idp.getsockname()[1]}", "--tenant", "t"]
        args += ["--client-id", "c", "--grant", "client_credentials", "--secret-stdin"]
        add = holding(site, env, secret, *args)
        try:
            conn, _ = idp.accept()  # the check at the IdP: the secret has been read and is in use
            with conn:
                time.sleep(0.2)  # the request is on its way; the answer never comes
                assert read_memory(add.pid, secret) == f"refused {13}"
                assert core_limit(add.pid) == ["0", "unlimited"]  # and it would dump no core
        finally:
            add.send_signal(signal.SIGKILL)
            add.wait(10)


def test_a_login_waiting_at_the_idp_keeps_the_password_from_the_users_other_processes(
    site: str, user_dir: Path
) -> None:
    """`dc-broker login --password-stdin` has read the password and sent it to the user's own broker,
    which is at the IdP with it (the IdP never answers): another process of the user cannot open the
    login's memory, and the login would dump no core."""
    env = user_env({"DC_BROKER_SOCKET": str(user_dir / "broker.sock")})
    password = f"dcb-planted-{secrets.token_hex(8)}"
    with socket.socket() as idp:
        idp.bind(("127.0.0.1", 0))
        idp.listen(8)
        idp.settimeout(30)
        cfg = user_dir / "config.toml"
        cfg.write_text(
            f'[profiles.pw]\ntoken_url = "http://127.0.0.1:{idp.getsockname()[1]}/token"\nclient_id = "c"\n'
            'grant = "password"\nusername = "someone"\n'
        )
        broker = subprocess.Popen(
            as_user(USER, site, "dc-broker", "run", "--config", str(cfg), "--secrets-stdin"),
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        login: subprocess.Popen[str] | None = None
        try:
            assert broker.stdin is not None
            broker.stdin.close()  # no secrets: the password comes with the login
            wait_for_socket(env["DC_BROKER_SOCKET"], broker)
            login = holding(site, env, password, "login", "pw", "--password-stdin")
            conn, _ = idp.accept()
            with conn:
                sent = b""
                while b"password=" + password.encode() not in sent:  # the login's password is at the IdP
                    data = conn.recv(65536)
                    assert data, sent
                    sent += data
                assert login.poll() is None  # it waits for the broker's answer
                assert read_memory(login.pid, password) == f"refused {13}"
                assert core_limit(login.pid) == ["0", "unlimited"]
        finally:
            for proc in (login, broker):
                if proc is not None:
                    proc.kill()
                    proc.wait(10)
