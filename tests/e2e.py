"""Helpers for end-to-end tests: real broker processes on real sockets."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from dc_token.protocol import Request, encode

BIN = Path(sys.executable).parent
DC_BROKER = str(BIN / "dc-broker")
DC_TOKEN = str(BIN / "dc-token")


def wait_for_socket(path: str, proc: subprocess.Popen[str] | None = None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            err = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"broker exited with {proc.returncode}:\n{out}\n{err}")
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            # a connect succeeds from listen(); an answered hello means the broker is serving
            s.connect(path)
            s.sendall(encode(Request(1, "hello")))
            if s.recv(65536):
                return
        except OSError:
            time.sleep(0.02)
        finally:
            s.close()
    raise AssertionError(f"no broker on {path} after {timeout} s")


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
