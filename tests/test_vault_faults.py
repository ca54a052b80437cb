"""A full disk, a read-only vault and a config the broker cannot load (issue 13, findings 5 and 6),
provoked for real: the vault lives on a tiny tmpfs that is filled up or remounted read-only.

Each failure is one clear line naming the cause, never a traceback or the "this is a bug" path, and a
failed ``dc-broker add`` leaves nothing behind (config and vault change together or not at all).
``dc-broker add`` keeps config.toml's mode, owner and group. Needs root (mount)."""

from __future__ import annotations

import contextlib
import grp
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from dc_token.protocol import Request, encode
from tests.e2e import DC_BROKER, run, stop, wait_for_socket

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="needs root and mount"),
]


_ADD_ARGS = ("--token-url", "http://127.0.0.1:9/token", "--client-id", "c", "--grant", "client_credentials")
_ADD_ARGS += ("--secret-stdin", "--no-verify")


class Place:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.fs = root / "vaultfs"  # the tmpfs: the vault's directory
        self.vault = self.fs / "vault.db"
        self.key = root / "vault.key"
        self.config = root / "etc" / "config.toml"
        self.sock = str(root / "run" / "b.sock")
        self.env = {**os.environ, "DC_BROKER_VAULT": str(self.vault)}
        self.env.pop("DC_BROKER_SOCKET", None)

    def add(self, name: str, secret: str = "s3cret") -> subprocess.CompletedProcess[str]:
        return run(
            [DC_BROKER, "add", name, "--config", str(self.config), "--socket", self.sock, *_ADD_ARGS],
            input=secret + "\n",
            env=self.env,
        )

    def fill(self) -> None:
        """Fill the tmpfs to the last byte."""
        with contextlib.suppress(OSError), open(self.fs / "filler", "ab") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        with contextlib.suppress(OSError), open(self.fs / "filler", "ab") as f:
            while True:
                f.write(b"\0")
                f.flush()

    def vault_profiles(self) -> list[str]:
        out = subprocess.run(
            [os.path.join(os.path.dirname(DC_BROKER), "python"), "-c", _LIST, str(self.vault)],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.split()


_LIST = "import sys; from dc_broker.vault import Vault; print(' '.join(Vault.open(sys.argv[1]).profiles()))"


@pytest.fixture
def place() -> Iterator[Place]:
    root = Path(tempfile.mkdtemp(prefix="dcb-vaultfs-", dir="/tmp"))
    p = Place(root)
    p.fs.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(p.fs)], check=True)
    try:
        p.config.parent.mkdir()
        made = run([DC_BROKER, "init", "--key-source", "keyfile", "--key-file", str(p.key)], env=p.env)
        assert made.returncode == 0, made.stderr
        yield p
    finally:
        subprocess.run(["umount", "-l", str(p.fs)], check=False)
        shutil.rmtree(root, ignore_errors=True)


def clean_failure(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "bug" not in result.stderr, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


def test_a_full_disk_fails_add_clearly_and_leaves_nothing(place: Place) -> None:
    assert place.add("first").returncode == 0
    before = place.config.read_text()
    place.fill()
    clean_failure(place.add("second"), "full", str(place.vault))
    assert place.config.read_text() == before  # not half-added
    os.unlink(place.fs / "filler")
    assert place.vault_profiles() == ["first"]
    assert place.add("second").returncode == 0  # with space again, the same add works
    assert place.vault_profiles() == ["first", "second"]


def test_a_read_only_vault_fails_add_and_start_up_clearly(place: Place) -> None:
    assert place.add("first").returncode == 0
    before = place.config.read_text()
    subprocess.run(["mount", "-o", "remount,ro", str(place.fs)], check=True)
    clean_failure(place.add("second"), "read-only")
    assert place.config.read_text() == before
    started = run([DC_BROKER, "run", "--config", str(place.config), "--socket", place.sock], env=place.env)
    clean_failure(started, "read-only", str(place.vault))


@contextlib.contextmanager
def running(place: Place) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [DC_BROKER, "run", "--config", str(place.config), "--socket", place.sock],
        env=place.env,
        stdout=subprocess.DEVNULL,
        stderr=open(place.root / "broker.log", "w"),  # noqa: SIM115
        text=True,
    )
    try:
        wait_for_socket(place.sock, proc)
        yield proc
    finally:
        stop(proc)
        print((place.root / "broker.log").read_text())


def ask(sock: str, request: Request) -> dict:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(sock)
    s.sendall(encode(request))
    buf = b""
    while len(buf) < 4 or len(buf) < 4 + int.from_bytes(buf[:4], "big"):
        data = s.recv(65536)
        assert data
        buf += data
    s.close()
    return msgpack.unpackb(buf[4:])


def test_add_to_a_running_broker_keeps_mode_and_owner_and_is_all_or_nothing(place: Place) -> None:
    gid = grp.getgrnam("nogroup").gr_gid if _has_group("nogroup") else 1
    place.config.write_text("# the shared broker's profiles\n")
    os.chown(place.config, 0, gid)
    os.chmod(place.config, 0o640)
    with running(place):
        assert place.add("first").returncode == 0
        st = place.config.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 0, gid)
        assert place.config.read_text().startswith("# the shared broker's profiles\n")
        before = place.config.read_text()
        place.fill()
        failed = place.add("second")
        clean_failure(failed, "full")
        assert place.config.read_text() == before  # the broker's vault refused: the config is as it was
        status = ask(place.sock, Request(1, "status"))
        assert [p["profile"] for p in status["result"]["profiles"]] == ["first"]
        st = place.config.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 0, gid)


def test_a_config_error_on_reload_is_a_config_error(place: Place) -> None:
    place.config.write_text("")
    with running(place):
        place.config.write_text("[profiles.x]\nclient_id = 3\n")
        reply = ask(place.sock, Request(1, "reload"))
        assert reply["error"]["code"] == "config_error", reply
        assert str(place.config) in reply["error"]["message"] and "client_id" in reply["error"]["message"]
        assert ask(place.sock, Request(2, "hello"))["ok"]  # still serving


def _has_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True
