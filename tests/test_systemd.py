"""systemd integration: the sd_notify / LISTEN_FDS / watchdog parsers, journal log lines, the unit
files (``systemd-analyze verify`` and ``security``), and real ``dc-broker run`` processes under
``systemd-socket-activate``, with a NOTIFY_SOCKET the test binds, and under SIGTERM and SIGHUP.

No running systemd is needed. The IdP is a stub token endpoint in a thread of this process, whose
answers can be slowed down to keep requests in flight.
"""

from __future__ import annotations

import ctypes
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from dc_broker import systemd
from dc_broker.cli import cli
from dc_broker.cli.units import DEFAULT_EXEC, SYSTEM_UNITS, SYSUSERS, USER_UNITS, render
from dc_broker.logs import JournalFormatter, setup_logging, stderr_is_journal, syslog_priority
from dc_token.sync import TokenClient
from tests import e2e
from tests.e2e import DC_BROKER, stop, wait_for, wait_for_socket

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
ANALYZE = shutil.which("systemd-analyze")
needs_activate = pytest.mark.skipif(SOCKET_ACTIVATE is None, reason="systemd-socket-activate not installed")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")


# ---------------------------------------------------------------- a stub token endpoint


class StubIdP:
    """POST /token -> a fresh client_credentials token, after ``delay`` seconds."""

    def __init__(self) -> None:
        self.delay = 0.0
        self.requests = 0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                stub.requests += 1
                n = stub.requests
                time.sleep(stub.delay)  # the slow IdP a test asks for (keeps requests in flight)
                body = json.dumps({"access_token": f"token-{n}", "expires_in": 1800, "token_type": "Bearer"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def idp() -> Iterator[StubIdP]:
    stub = StubIdP()
    yield stub
    stub.server.shutdown()


@pytest.fixture(autouse=True)
def _fast_idp(request: pytest.FixtureRequest) -> None:
    if "idp" in request.fixturenames:
        request.getfixturevalue("idp").delay = 0.0


def profile_toml(name: str, url: str) -> str:
    return (
        f'[profiles.{name}]\ntoken_url = "{url}"\nclient_id = "svc"\ngrant = "client_credentials"\n'
        'auth_method = "post"\n'
    )


def write_config(tmp: Path, url: str, *names: str) -> Path:
    cfg = tmp / "config.toml"
    cfg.write_text("\n".join(profile_toml(n, url) for n in names))
    return cfg


def secrets(*names: str) -> str:
    return "".join(f'[{n}]\nclient_secret = "s3cret-{n}"\n' for n in names)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_", "DC_BROKER"))}
    env.pop("JOURNAL_STREAM", None)
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def start_run(
    tmp: Path, cfg: Path, sock: str, secret_text: str, *, env: dict[str, str] | None = None, stderr: object = None
) -> subprocess.Popen[str]:
    return e2e.start_run(
        cfg, sock, secret_text, env=env or clean_env(), stderr=subprocess.PIPE if stderr is None else stderr, wait=False
    )  # type: ignore[arg-type]


# ---------------------------------------------------------------- pure parsers


def test_notify_address_forms() -> None:
    assert systemd.notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert systemd.notify_address("@abstract/name") == b"\0abstract/name"
    assert systemd.notify_address("") is None
    assert systemd.notify_address("vsock:2:1234") is None


def test_format_notify_is_newline_separated_and_refuses_newlines() -> None:
    assert systemd.format_notify(READY=1, STATUS="2 profile(s)") == b"READY=1\nSTATUS=2 profile(s)"
    with pytest.raises(ValueError, match="one line"):
        systemd.format_notify(STATUS="a\nb")


def test_listen_fds_only_for_our_pid_and_unset_after() -> None:
    pid = os.getpid()
    assert systemd.listen_fd_count({"LISTEN_PID": str(pid), "LISTEN_FDS": "2"}, pid) == 2
    assert systemd.listen_fd_count({"LISTEN_PID": str(pid + 1), "LISTEN_FDS": "2"}, pid) == 0
    assert systemd.listen_fd_count({"LISTEN_PID": str(pid), "LISTEN_FDS": "x"}, pid) == 0
    assert systemd.listen_fd_count({}, pid) == 0
    env = {"LISTEN_PID": str(pid + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x", "OTHER": "1"}
    assert systemd.listen_fds(env) == []
    assert env == {"OTHER": "1"}


def test_listening_unix_socket_checks_what_it_was_given() -> None:
    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with pytest.raises(systemd.ActivationError, match="ListenStream="):
        systemd.listening_unix_socket(dgram.fileno())
    dgram.close()
    r, w = os.pipe()
    with pytest.raises(systemd.ActivationError, match="not a socket"):
        systemd.listening_unix_socket(r)
    os.close(r)
    os.close(w)


def test_watchdog_interval() -> None:
    assert systemd.watchdog({"WATCHDOG_USEC": "30000000"}) == systemd.Watchdog(30.0)
    assert systemd.Watchdog(30.0).ping_every == 15.0
    assert systemd.watchdog({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}, pid=2) is None
    assert systemd.watchdog({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "2"}, pid=2) == systemd.Watchdog(1.0)
    assert systemd.watchdog({}) is None
    assert systemd.watchdog({"WATCHDOG_USEC": "0"}) is None


def test_notifier_sends_to_path_and_abstract_sockets(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    for address, bind_to in ((path, path), (f"@dc-broker-test-{os.getpid()}", f"\0dc-broker-test-{os.getpid()}")):
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        receiver.bind(bind_to)
        env = {"NOTIFY_SOCKET": address}
        notifier = systemd.Notifier.from_environ(env)
        assert env == {} and notifier.enabled
        assert notifier.send(READY=1, STATUS="ok")
        assert receiver.recv(4096) == b"READY=1\nSTATUS=ok"
        notifier.close()
        receiver.close()
    assert systemd.Notifier(None).send(READY=1) is False
    assert systemd.Notifier(str(tmp_path / "nobody")).send(READY=1) is False  # never raises


# ---------------------------------------------------------------- journal log lines


def test_syslog_priorities() -> None:
    assert [syslog_priority(lv) for lv in (50, 40, 30, 20, 10)] == [2, 3, 4, 6, 7]


def test_journal_formatter_prefixes_every_line() -> None:
    record = logging.LogRecord("dc_broker", logging.ERROR, __file__, 1, "first\nsecond", None, None)
    assert JournalFormatter().format(record) == "<3>dc_broker: first\n<3>second"


def test_journal_stream_must_be_our_stderr(tmp_path: Path) -> None:
    with open(tmp_path / "err", "w") as f:
        st = os.fstat(f.fileno())
        assert stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, f)  # type: ignore[arg-type]
        assert not stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, f)  # type: ignore[arg-type]
        assert not stderr_is_journal({}, f)  # type: ignore[arg-type]
    assert not stderr_is_journal({"JOURNAL_STREAM": "1:2"}, io.StringIO())


def test_setup_logging_plain_without_journal() -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        handler = setup_logging(False, {})
        assert root.handlers == [handler] and not isinstance(handler.formatter, JournalFormatter)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


# ---------------------------------------------------------------- unit files


def test_shipped_units_are_the_rendered_templates() -> None:
    for sub, units in (("user", USER_UNITS), ("system", SYSTEM_UNITS)):
        for name, text in render(units, DEFAULT_EXEC).items():
            assert (REPO / "systemd" / sub / name).read_text() == text, f"systemd/{sub}/{name} is out of date"
    assert (REPO / "systemd" / "system" / "dc-broker.sysusers").read_text() == SYSUSERS


def install(tmp: Path, *args: str) -> tuple[Path, str]:
    """Units for this checkout's venv (a developer's install: --allow-checkout), in tmp."""
    dest = tmp / "units"
    extra = ["--sysusers-dir", str(dest)] if "--system" in args else []
    result = CliRunner().invoke(cli, ["systemd", "install", *args, "--dest", str(dest), "--allow-checkout", *extra])
    assert result.exit_code == 0, result.output
    return dest, result.output


def test_install_writes_units_with_the_real_path_and_says_what_next(tmp_path: Path) -> None:
    dest, out = install(tmp_path, "--user")
    service = (dest / "dc-broker.service").read_text()
    assert f"ExecStart={DC_BROKER} run\n" in service
    assert "next: systemctl --user daemon-reload && systemctl --user enable --now dc-broker.socket" in out
    sysdest, out = install(tmp_path / "sys", "--system")
    assert f"ExecStart={DC_BROKER} run --system\n" in (sysdest / "dc-broker.service").read_text()
    assert (sysdest / "dc-broker.conf").read_text() == SYSUSERS
    assert "next: systemd-sysusers && systemctl daemon-reload && systemctl enable --now dc-broker.socket" in out


def test_install_refuses_a_checkouts_venv_and_says_how_to_install(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["systemd", "install", "--user", "--dest", str(tmp_path / "u")])
    assert result.exit_code == 1
    assert f"{DC_BROKER} lives in the git checkout {REPO}" in result.output
    assert "pipx install ." in result.output and not (tmp_path / "u").exists()
    system = CliRunner().invoke(cli, ["systemd", "install", "--system", "--dest", str(tmp_path / "s")])
    assert system.exit_code == 1 and "sudo python3 -m venv /opt/dc-broker" in system.output


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A directory every user can enter (pytest's tmp_path sits under a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="dc-broker-units-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_install_system_puts_sysusers_where_systemd_sysusers_looks(open_tmp: Path) -> None:
    tmp_path = open_tmp
    root = tmp_path / "root"
    units = root / "usr" / "lib" / "systemd" / "system"
    exe = tmp_path / "opt" / "bin" / "dc-broker"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/usr/bin/python3\n")
    exe.chmod(0o755)
    tmp_path.chmod(0o755)
    args = ["systemd", "install", "--system", "--dest", str(units), "--exec", str(exe)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert (root / "usr" / "lib" / "sysusers.d" / "dc-broker.conf").read_text() == SYSUSERS
    assert f"ExecStart={exe} run --system\n" in (units / "dc-broker.service").read_text()
    odd = CliRunner().invoke(cli, ["systemd", "install", "--system", "--dest", str(tmp_path / "x"), "--exec", str(exe)])
    assert odd.exit_code == 1 and "pass --sysusers-dir DIR" in odd.output


def test_install_system_refuses_what_the_service_user_cannot_read(open_tmp: Path) -> None:
    tmp_path = open_tmp
    private = tmp_path / "private"
    exe = private / "bin" / "dc-broker"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/usr/bin/python3\n")
    exe.chmod(0o755)
    tmp_path.chmod(0o755)
    private.chmod(0o700)
    args = ["systemd", "install", "--system", "--dest", str(tmp_path / "etc/systemd/system"), "--exec", str(exe)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert f"the system unit's user (dc-broker) cannot reach {private}" in result.output
    home = CliRunner().invoke(cli, [*args[:-1], "/home/alice/.local/bin/dc-broker"])
    assert home.exit_code == 1 and "under a home directory, which the system unit hides" in home.output


@needs_analyze
@pytest.mark.parametrize("mode", ["user", "system"])
def test_systemd_analyze_verify_passes(tmp_path: Path, mode: str) -> None:
    dest, _ = install(tmp_path, f"--{mode}")
    runtime = tmp_path / "rt"
    runtime.mkdir()
    scope = ["--user"] if mode == "user" else []
    result = subprocess.run(
        [ANALYZE, *scope, "verify", "./dc-broker.service", "./dc-broker.socket"],  # type: ignore[list-item]
        cwd=dest,
        capture_output=True,
        text=True,
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)},
        timeout=30,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@needs_analyze
def test_system_service_exposure_is_at_most_2(tmp_path: Path) -> None:
    dest, _ = install(tmp_path, "--system")
    result = subprocess.run(
        [ANALYZE, "security", "--offline=yes", "--no-pager", "./dc-broker.service"],  # type: ignore[list-item]
        cwd=dest,
        capture_output=True,
        text=True,
        timeout=30,
    )
    m = re.search(r"Overall exposure level for dc-broker.service: ([0-9.]+)", result.stdout)
    assert m, result.stdout + result.stderr
    exposure = float(m.group(1))
    print(f"\nsystemd-analyze security --offline=yes dc-broker.service: exposure {exposure}")
    assert exposure <= 2.0


# ---------------------------------------------------------------- real processes


@needs_activate
def test_socket_activated_daemon_serves_a_token_on_the_passed_socket(tmp_path: Path, idp: StubIdP) -> None:
    cfg = write_config(tmp_path, idp.url, "svc")
    sock = str(tmp_path / "activated.sock")
    proc = subprocess.Popen(
        [SOCKET_ACTIVATE, "-l", sock, "--", DC_BROKER, "run", "--config", str(cfg), "--secrets-stdin"],  # type: ignore[list-item]
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(DC_BROKER_SOCKET=str(tmp_path / "never-bound.sock")),
    )
    assert proc.stdin is not None
    proc.stdin.write(secrets("svc"))
    proc.stdin.close()
    try:
        wait_for_socket(sock, proc)  # the first connect is what starts the daemon
        with TokenClient(sock, timeout=20) as client:
            assert client.token("svc").startswith("token-")
            assert client.status()["broker"]["socket"] == sock
    finally:
        assert stop(proc, signal.SIGTERM) == 0
    err = proc.stderr.read() if proc.stderr else ""
    assert "serving the socket systemd passed" in err
    assert not os.path.exists(tmp_path / "never-bound.sock")
    assert "s3cret" not in err


def test_a_socket_activated_start_never_knocks_on_its_own_passed_socket(tmp_path: Path, monkeypatch) -> None:
    """`dc-broker run` first asks its socket whether a broker already answers there (to say so, and
    where). Under socket activation the socket systemd passed is the very one asked: nobody accepts
    on it yet, so the question waited out its whole 5 s timeout, and every socket-activated start
    under systemd took 5.3 s instead of 0.2 (`bench/coldstart.py` under systemd 252). A start with
    a passed socket does not ask; one without still does."""
    from dc_broker.cli import run as run_cli

    sock = str(tmp_path / "broker.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock)
    listener.listen(8)
    listener.setblocking(False)
    with listener:
        monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
        monkeypatch.setenv("LISTEN_FDS", "1")
        run_cli._refuse_a_second_broker(sock)
        with pytest.raises(BlockingIOError):  # nobody connected to it
            listener.accept()
        monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))  # passed to another process: not ours
        asked: list[str] = []
        monkeypatch.setattr("dc_broker.cli.talk.ask", lambda path, op, **kw: asked.append(path) or {"pid": 1})
        with pytest.raises(Exception, match="a dc-broker already runs on"):
            run_cli._refuse_a_second_broker(sock)
        assert asked == [sock]


def recv_notifications(receiver: socket.socket, until: str, timeout: float = 15.0) -> list[str]:
    """Datagrams (as lines) until one contains ``until``."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        receiver.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = receiver.recv(4096).decode()
        except TimeoutError:
            break
        lines.extend(data.split("\n"))
        if until in data.split("\n"):
            return lines
    raise AssertionError(f"no {until} in {lines}")


def received(receiver: socket.socket) -> list[str]:
    """The notification lines that have arrived on ``receiver`` since the last call (no waiting)."""
    lines: list[str] = []
    receiver.setblocking(False)
    try:
        while True:
            lines.extend(receiver.recv(4096).decode().split("\n"))
    except BlockingIOError:
        return lines
    finally:
        receiver.setblocking(True)


def test_notify_ready_status_watchdog_reload_stopping(tmp_path: Path, idp: StubIdP) -> None:
    cfg = write_config(tmp_path, idp.url, "svc")
    notify = str(tmp_path / "notify.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(notify)
    sock = str(tmp_path / "run" / "b.sock")
    proc = start_run(tmp_path, cfg, sock, secrets("svc"), env=clean_env(NOTIFY_SOCKET=notify, WATCHDOG_USEC="200000"))
    try:
        first = recv_notifications(receiver, "READY=1")
        status = [line for line in first if line.startswith("STATUS=")]
        assert status and re.fullmatch(r"STATUS=1 profile\(s\), \d fresh; vault in memory", status[0]), first
        assert TokenClient(sock).token("svc")
        assert "WATCHDOG=1" in recv_notifications(receiver, "WATCHDOG=1", timeout=2)
        proc.send_signal(signal.SIGHUP)
        reload = recv_notifications(receiver, "READY=1")
        assert "RELOADING=1" in reload and any(line.startswith("MONOTONIC_USEC=") for line in reload)
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in recv_notifications(receiver, "STOPPING=1")
        assert proc.wait(10) == 0
    finally:
        stop(proc)
        receiver.close()


def test_sigterm_answers_requests_in_flight_and_exits_0(tmp_path: Path, idp: StubIdP) -> None:
    cfg = write_config(tmp_path, idp.url, "slow")
    sock = str(tmp_path / "run" / "b.sock")
    idp.delay = 1.5  # the first refresh is slow: token requests wait on it
    before = idp.requests
    proc = start_run(tmp_path, cfg, sock, secrets("slow"))
    wait_for_socket(sock, proc)
    results: list[str | BaseException] = []
    answered_at: list[float] = []

    def ask() -> None:
        try:
            results.append(TokenClient(sock, timeout=20).token("slow"))
        except BaseException as exc:
            results.append(exc)
        answered_at.append(time.monotonic())

    threads = [threading.Thread(target=ask) for _ in range(5)]
    for t in threads:
        t.start()
    wait_for(
        lambda: idp.requests == before + 1 and e2e.connections_on(sock, accepted_only=True) == 5,
        10,
        "5 clients connected and waiting on the refresh",
    )
    assert idp.requests == before + 1 and not results
    signalled_at = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(20)
    assert proc.wait(10) == 0
    assert len(results) == 5 and all(r == f"token-{before + 1}" for r in results), results
    assert min(answered_at) > signalled_at  # answered after the signal, not before it
    assert not os.path.exists(sock)
    with pytest.raises(OSError):  # stopped accepting
        socket.socket(socket.AF_UNIX).connect(sock)


def test_sighup_adds_a_profile_keeps_tokens_and_survives_a_broken_config(tmp_path: Path, idp: StubIdP) -> None:
    cfg = write_config(tmp_path, idp.url, "svc")
    sock = str(tmp_path / "run" / "b.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    proc = start_run(tmp_path, cfg, sock, secrets("svc"), env=clean_env(NOTIFY_SOCKET=str(tmp_path / "notify.sock")))
    try:
        wait_for_socket(sock, proc)
        with TokenClient(sock) as client:
            token = client.token("svc")
            cfg.write_text(cfg.read_text() + "\n" + profile_toml("added", idp.url))
            proc.send_signal(signal.SIGHUP)
            wait_for(
                lambda: "added" in [p["profile"] for p in client.status()["profiles"]], 10, "SIGHUP to add the profile"
            )
            assert client.token("svc") == token  # unchanged profile kept its token
            cfg.write_text("[profiles.broken\n")
            proc.send_signal(signal.SIGHUP)
            # the reload is done when READY=1 comes back, its STATUS= telling of the failure
            wait_for(
                lambda: any("last reload failed" in line for line in received(notify)),
                10,
                "READY=1 with the failed reload in STATUS=",
            )
            assert sorted(p["profile"] for p in client.status()["profiles"]) == ["added", "svc"]
            assert client.token("svc") == token
    finally:
        assert stop(proc, signal.SIGTERM) == 0
        notify.close()
    err = proc.stderr.read() if proc.stderr else ""
    assert "SIGHUP: reloaded" in err and "added added" in err
    assert "SIGHUP: config not reloaded, still serving the 2 profile(s) loaded before" in err


def test_journal_stream_gets_priority_prefixes(tmp_path: Path, idp: StubIdP) -> None:
    cfg = write_config(tmp_path, idp.url, "svc")
    sock = str(tmp_path / "run" / "b.sock")
    err_path = tmp_path / "stderr"
    with open(err_path, "w") as err:
        st = os.fstat(err.fileno())
        proc = start_run(
            tmp_path, cfg, sock, secrets("svc"), env=clean_env(JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}"), stderr=err
        )
        try:
            wait_for_socket(sock, proc)
            # a connect succeeds from listen(); an answered request means serving began, and the
            # ready line is logged before the accept loop first runs
            TokenClient(sock, cache=False).hello()
        finally:
            assert stop(proc, signal.SIGTERM) == 0
    lines = err_path.read_text().splitlines()
    assert lines and all(re.match(r"<[0-7]>", line) for line in lines), lines
    assert any(line.startswith("<6>dc_broker: dc-broker ready on") for line in lines)


MDWE_WRAPPER = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS, as NoNewPrivileges=yes
    raise SystemExit("no_new_privs: " + os.strerror(ctypes.get_errno()))
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE: the kernel's MemoryDenyWriteExecute=yes
    raise SystemExit("mdwe unsupported: " + os.strerror(ctypes.get_errno()))
os.execv(sys.argv[1], sys.argv[1:])
"""


def _mdwe_supported() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(66, 0, 0, 0, 0) >= 0)  # PR_GET_MDWE (Linux 6.3+)


@pytest.mark.skipif(not _mdwe_supported(), reason="kernel has no PR_SET_MDWE (Linux < 6.3)")
def test_daemon_and_cryptography_run_without_writable_executable_memory(tmp_path: Path, idp: StubIdP) -> None:
    """MemoryDenyWriteExecute=yes + NoNewPrivileges=yes, applied by the kernel as systemd would; the
    vault's primitives (AES-GCM, Argon2id) included."""
    wrapper = tmp_path / "mdwe.py"
    wrapper.write_text(MDWE_WRAPPER)
    crypto = subprocess.run(
        [
            sys.executable,
            str(wrapper),
            sys.executable,
            "-c",
            "import os; from cryptography.hazmat.primitives.ciphers.aead import AESGCM; "
            "k = AESGCM.generate_key(bit_length=256); "
            "assert AESGCM(k).decrypt(b'0'*12, AESGCM(k).encrypt(b'0'*12, b'x', b'id'), b'id') == b'x'; "
            "from cryptography.hazmat.primitives.kdf.argon2 import Argon2id; "
            "Argon2id(salt=b's'*16, length=32, iterations=1, lanes=1, memory_cost=64).derive(b'pass'); "
            "print(open('/proc/self/status').read().count('NoNewPrivs:\\t1'))",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (crypto.returncode, crypto.stdout.strip()) == (0, "1"), crypto.stderr
    cfg = write_config(tmp_path, idp.url, "svc")
    sock = str(tmp_path / "run" / "b.sock")
    proc = subprocess.Popen(
        [sys.executable, str(wrapper), DC_BROKER, "run", "--config", str(cfg), "--socket", sock, "--secrets-stdin"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    assert proc.stdin is not None
    proc.stdin.write(secrets("svc"))
    proc.stdin.close()
    try:
        wait_for_socket(sock, proc)
        assert TokenClient(sock).token("svc").startswith("token-")
    finally:
        assert stop(proc, signal.SIGTERM) == 0
