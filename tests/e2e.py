"""Helpers for end-to-end tests: real broker processes on real sockets, and ``wait_for``, the one way a
test waits for something a real process does (poll a condition; never sleep and hope)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from dc_token.protocol import Request, encode

BIN = Path(sys.executable).parent
DC_BROKER = str(BIN / "dc-broker")
DC_TOKEN = str(BIN / "dc-token")
T = TypeVar("T")


def wait_for(
    condition: Callable[[], T],
    timeout: float,
    what: str,
    *,
    process: subprocess.Popen[Any] | None = None,
    every: float = 0.05,
) -> T:
    """Poll ``condition`` every ``every`` s until it returns something truthy; return that value.

    ``what`` names what is awaited ("a broker answering on PATH"). Fails with "timed out after N s
    waiting for {what}", or, as soon as ``process`` (the program that should bring it about) has
    exited, with its exit status, what it left in its pipes, and ``what``.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            left = "".join(f"\n{pipe.read()!s}" for pipe in (process.stdout, process.stderr) if pipe is not None)
            raise AssertionError(f"{process.args!r} exited with {process.returncode} while waiting for {what}{left}")
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


def wait_for_socket(path: str, proc: subprocess.Popen[str] | None = None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout

    def answers_hello() -> bool:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            # a connect succeeds from listen(); an answered hello means the broker is serving
            s.connect(path)
            s.sendall(encode(Request(1, "hello")))
            return bool(s.recv(65536))
        except OSError:
            return False
        finally:
            s.close()

    wait_for(answers_hello, timeout, f"a broker answering on {path}", process=proc, every=0.02)


def connections_on(path: str, *, accepted_only: bool = False) -> int:
    """How many connections to the Unix socket bound at ``path`` are open on its server's side:
    accepted, or (unless ``accepted_only``) still waiting in the listen backlog. From the kernel's
    table, /proc/net/unix: a server-side socket carries the listener's path; the listener has the
    __SO_ACCEPTCON flag; one not yet accepted has no inode (no file) yet."""
    with open("/proc/net/unix") as table:
        next(table)  # the header: Num RefCount Protocol Flags Type St Inode Path
        rows = [line.split() for line in table]
    return sum(
        1
        for row in rows
        if len(row) > 7 and row[7] == path and row[3] != "00010000" and not (accepted_only and row[6] == "0")
    )


def stop(proc: subprocess.Popen[str], sig: int = 15, timeout: float = 10.0) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("broker did not stop on signal") from None


@contextmanager
def dev_idp(*flags: str, port: int = 0) -> Iterator[str]:
    """``python -m dc_broker.devserver [flags]`` (the dev IdP and demo API alone); yields its base URL."""
    with dev_idp_process(*flags, port=port) as (base, _):
        yield base


def idp_stats(base: str) -> dict[str, Any]:
    """The dev IdP's counters (``/_dev/stats``): token requests by grant type, refresh-token reuse."""
    import httpx

    stats: dict[str, Any] = httpx.get(f"{base}/_dev/stats", timeout=30).json()
    return stats


@contextmanager
def dev_idp_process(*flags: str, port: int = 0) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """``dev_idp``, yielding the process too (to stop and continue it)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dc_broker.devserver", "--port", str(port), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        base = proc.stdout.readline().strip()
        assert base.startswith(("http://", "https://")), base
        yield base, proc
    finally:
        proc.send_signal(signal.SIGCONT)  # a test may have stopped it
        proc.terminate()
        proc.wait(10)


@contextmanager
def dev_broker(tmp: Path, *args: str) -> Iterator[tuple[str, str, subprocess.Popen[str]]]:
    """`dc-broker dev` on a socket in tmp; yields (socket path, IdP base URL, process)."""
    sock = str(tmp / "run" / "broker.sock")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("DC_BROKER_SOCKET", None)
    proc = subprocess.Popen(
        [DC_BROKER, "dev", "--socket", sock, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        wait_for_socket(sock, proc)
        assert proc.stdout is not None
        base = ""
        for line in proc.stdout:
            m = re.search(r"dev IdP:\s+(http://\S+)/realms/demo", line)
            if m:
                base = m.group(1)
                break
        assert base, "dc-broker dev did not print the IdP URL"
        yield sock, base, proc
    finally:
        stop(proc)


def start_run(
    cfg: str | Path,
    sock: str,
    secrets: str,
    *extra_args: str,
    env: dict[str, str] | None = None,
    stderr: int | None = subprocess.PIPE,
    wait: bool = True,
) -> subprocess.Popen[str]:
    """`dc-broker run --config CFG --socket SOCK --secrets-stdin [extra]` with ``secrets`` (TOML) on stdin."""
    proc = subprocess.Popen(
        [DC_BROKER, "run", *extra_args, "--config", str(cfg), "--socket", sock, "--secrets-stdin"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=env,
    )
    assert proc.stdin is not None
    proc.stdin.write(secrets)
    proc.stdin.close()
    if wait:
        wait_for_socket(sock, proc)
    return proc


def dc_token(sock: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "DC_BROKER_SOCKET": sock, **(env or {})}
    return subprocess.run([DC_TOKEN, *args], capture_output=True, text=True, env=full_env, timeout=30)


def run(cmd: Sequence[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=30, **kw)  # type: ignore[call-overload]


def device_code(login: subprocess.Popen[str]) -> str:
    """The user code a running `dc-broker login` (stdout a pipe) shows for a device login; fails
    with what it wrote to stderr if it ends before showing one."""
    assert login.stdout is not None
    shown = ""
    while (found := re.search(r"enter the code (\S+)", shown)) is None:
        line = login.stdout.readline()
        if not line:
            err = login.stderr.read() if login.stderr else ""
            raise AssertionError(f"dc-broker login ended without showing a code: {shown!r} {err!r}")
        shown += line
    return found.group(1)


def approve_device(base: str, code: str, username: str = "demo", password: str = "demo") -> None:
    """What the person does on the dev IdP's verification page: sign in and approve ``code``."""
    import httpx

    form = {"user_code": code, "username": username, "password": password}
    page = httpx.post(f"{base}/realms/demo/device", data=form)
    assert page.status_code == 200, page.text


def device_login(base: str, sock: str, profile: str = "dev") -> None:
    """`dc-broker login PROFILE --socket SOCK` (a device login), approved by user demo at the dev
    IdP at ``base`` as a person does; it must end with exit status 0."""
    login = subprocess.Popen(
        [DC_BROKER, "login", profile, "--socket", sock], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    approve_device(base, device_code(login))
    code = login.wait(30)
    assert code == 0, f"dc-broker login {profile} exited with {code}: {login.stderr.read() if login.stderr else ''}"
