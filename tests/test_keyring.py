"""The ``keyring`` key source against a real GNOME Keyring: a private D-Bus session bus (dbus-daemon
with its own config: no service activation, so "no Secret Service" is real too) and a real
``gnome-keyring-daemon --unlock --components=secrets`` given its password on stdin, per test in a
fresh HOME. No mocks: the vault's KEK goes into the keyring and comes back over D-Bus.

The two programs are installed before pytest starts (`make test-packages`, .ci/packages), never by
a test; where they are missing the tests skip saying so, and under CI=true they fail instead
(tests/conftest.py). secretstorage and jeepney come with the test extra (dc-broker[keyring])."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import secretstorage
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import Proxy, open_dbus_connection

from dc_broker.errors import VaultError
from dc_broker.secret import Secret
from dc_broker.tokens import Credentials
from dc_broker.vault import Keyring, KeySourceKind, Vault, create_keyring_key
from tests.e2e import DC_BROKER, dc_token, stop, wait_for, wait_for_socket

pytestmark = pytest.mark.e2e

PROGRAMS = ("dbus-daemon", "gnome-keyring-daemon")
KEYRING_PASSWORD = "login-password"  # the desktop login password gnome-keyring is unlocked with
BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


def _ensure_programs() -> None:
    """dbus-daemon and gnome-keyring-daemon on PATH (installed by `make test-packages`, not here)."""
    missing = [name for name in PROGRAMS if shutil.which(name) is None]
    if missing:
        pytest.skip(
            f"{' and '.join(missing)} not installed: run `make test-packages` as root "
            "(apt-get install gnome-keyring dbus dbus-x11)"
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def session_bus() -> Iterator[str]:
    """The address of a private session bus of our own (short path: a unix socket name has 108 bytes)."""
    _ensure_programs()
    directory = tempfile.mkdtemp(prefix="dck-bus-")
    socket = os.path.join(directory, "bus")
    config = os.path.join(directory, "bus.conf")
    Path(config).write_text(BUS_CONFIG.format(socket=socket))
    proc = subprocess.Popen(
        ["dbus-daemon", f"--config-file={config}", "--nofork", "--nopidfile"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: os.path.exists(socket), 20, "dbus-daemon's socket", process=proc, every=0.02)
        yield f"unix:path={socket}"
    finally:
        _stop(proc)
        shutil.rmtree(directory, ignore_errors=True)


def _on_bus(address: str, name: str) -> bool:
    with contextlib.closing(open_dbus_connection(address)) as conn:
        return bool(Proxy(message_bus, conn).NameHasOwner(name)[0])


@dataclass
class Desktop:
    """A desktop session for one test: the env its programs see, and what the keyring holds."""

    env: dict[str, str]
    tmp: Path

    def items(self) -> list[tuple[dict[str, str], bytes]]:
        """Every dc-broker item in the keyring: (attributes, secret)."""
        with contextlib.closing(secretstorage.dbus_init()) as conn:
            found = secretstorage.search_items(conn, {"application": "dc-broker"})
            return [(item.get_attributes(), item.get_secret()) for item in found]

    def lock(self) -> None:
        with contextlib.closing(secretstorage.dbus_init()) as conn:
            secretstorage.Collection(conn).lock()

    def cli(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([DC_BROKER, *args], input=stdin, capture_output=True, text=True, env=self.env, timeout=60)


def _desktop_env(tmp_path: Path, bus: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DC_BROKER_")}
    env.update(
        HOME=str(tmp_path / "home"),
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        XDG_DATA_HOME=str(tmp_path / "data"),
        DC_BROKER_SOCKET=str(tmp_path / "run" / "broker.sock"),
        DBUS_SESSION_BUS_ADDRESS=bus,
    )
    return env


@pytest.fixture
def no_keyring(session_bus: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Desktop:
    """A session bus with nothing answering for org.freedesktop.secrets."""
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", session_bus)
    assert not _on_bus(session_bus, "org.freedesktop.secrets")
    return Desktop(_desktop_env(tmp_path, session_bus), tmp_path)


@contextlib.contextmanager
def _gnome_keyring(
    session_bus: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, unlock: bool
) -> Iterator[Desktop]:
    env = _desktop_env(tmp_path, session_bus)
    runtime = tempfile.mkdtemp(prefix="dck-run-")  # gnome-keyring's control socket lives here
    env["XDG_RUNTIME_DIR"] = runtime
    os.makedirs(env["HOME"], mode=0o700)
    proc = subprocess.Popen(
        ["gnome-keyring-daemon", "--foreground", *(["--unlock"] if unlock else []), "--components=secrets"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    assert proc.stdin is not None
    proc.stdin.write(KEYRING_PASSWORD.encode() if unlock else b"")
    proc.stdin.close()
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", session_bus)

    def ready() -> bool:
        if not _on_bus(session_bus, "org.freedesktop.secrets"):
            return False
        if not unlock:
            return True
        with contextlib.closing(secretstorage.dbus_init()) as conn:
            try:
                return not secretstorage.Collection(conn).is_locked()
            except secretstorage.ItemNotFoundException:
                return False

    try:
        what = "gnome-keyring-daemon" + (" with an unlocked login keyring" if unlock else "") + " on the bus"
        wait_for(ready, 20, what, process=proc, every=0.02)
        yield Desktop(env, tmp_path)
    finally:
        _stop(proc)
        # stopped on purpose: its name leaves the bus with it
        wait_for(
            lambda: not _on_bus(session_bus, "org.freedesktop.secrets"),
            20,
            "gnome-keyring-daemon's name to leave the bus",
            every=0.02,
        )
        shutil.rmtree(runtime, ignore_errors=True)


@pytest.fixture
def desktop(session_bus: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Desktop]:
    """A real gnome-keyring-daemon on the private bus, its login keyring made and unlocked with a
    password on stdin (what PAM does at a desktop login), in a fresh HOME."""
    with _gnome_keyring(session_bus, tmp_path, monkeypatch, unlock=True) as made:
        yield made


@pytest.fixture
def bare_keyring(session_bus: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Desktop]:
    """A gnome-keyring-daemon started with no login password: no login keyring, no default collection."""
    with _gnome_keyring(session_bus, tmp_path, monkeypatch, unlock=False) as made:
        yield made


def _stored_reference(path: Path) -> tuple[str, str]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        kind, reference = db.execute("SELECT kind, reference FROM data_key").fetchone()
    return kind, reference


def _file_bytes(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())


def test_init_keyring_vault_opens_with_no_passphrase(desktop: Desktop) -> None:
    vault_path = desktop.tmp / "data" / "dc-broker" / "vault.db"
    result = desktop.cli("init", "--key-source", "keyring")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"Created the vault {vault_path} (keyring). Next: `dc-broker add PROFILE ...`\n"

    # `add` with no broker running opens the vault itself: stdin holds the profile's secrets and no
    # vault passphrase, and nothing prompts (stdin is not a terminal; a prompt would fail the command)
    added = desktop.cli(
        "add",
        "acme",
        "--server",
        "https://idp.example",
        "--tenant",
        "demo",
        "--client-id",
        "dc-cli",
        "--username",
        "demo",
        "--password-stdin",
        "--secret-stdin",
        "--no-verify",
        stdin="demo-password\ndc-cli-secret\n",
    )
    assert added.returncode == 0, added.stderr

    [(attributes, key)] = desktop.items()
    kind, reference = _stored_reference(vault_path)
    assert (kind, len(reference)) == ("keyring", 32)
    assert attributes == {
        "application": "dc-broker",
        "dc-broker-key": reference,
        "dc-broker-vault": str(vault_path),
        "xdg:schema": "org.dc-broker.VaultKey",
    }
    assert len(key) == 32
    on_disk = _file_bytes(vault_path)
    assert key not in on_disk and key.hex().encode() not in on_disk  # the vault holds only the reference

    with Vault.open(vault_path, auto_unlock=True) as vault:  # no passphrase: the keyring unlocked it
        assert not vault.locked
        assert vault.key_source == Keyring(reference)
        assert vault.profiles() == ["acme"]
        creds = vault.credentials("acme")
        assert creds.password is not None and creds.password.reveal() == "demo-password"
        assert creds.client_secret is not None and creds.client_secret.reveal() == "dc-cli-secret"


def keyring_vault_with_acme(desktop: Desktop, idp: str) -> None:
    """A keyring vault holding profile acme's secrets (added with no broker running)."""
    assert desktop.cli("init", "--key-source", "keyring").returncode == 0
    added = desktop.cli(
        "add", "acme", "--server", idp, "--tenant", "demo", "--client-id", "dc-cli", "--username", "demo",
        "--password-stdin", "--secret-stdin", stdin="demo\ndc-cli-secret\n",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr


def test_daemon_serves_tokens_at_start_with_no_unlock(desktop: Desktop, idp: str) -> None:
    """The desktop user's day: the broker starts (at login), the keyring opens the vault, tokens flow."""
    keyring_vault_with_acme(desktop, idp)
    sock = desktop.env["DC_BROKER_SOCKET"]
    tokens = []
    for _start in range(2):
        daemon = subprocess.Popen(
            [DC_BROKER, "run"], env=desktop.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            wait_for_socket(sock, daemon)
            got = dc_token(sock, "acme")
            assert got.returncode == 0, got.stderr
            tokens.append(got.stdout)
        finally:
            assert stop(daemon) == 0
    assert tokens[0] == tokens[1]  # the restart served the stored token from the vault, no new login
    err = daemon.stderr.read() if daemon.stderr else ""
    assert "locked" not in err
    for secret in ("dc-cli-secret", tokens[0].strip(), desktop.items()[0][1].hex()):
        assert secret not in err


def test_a_keyring_still_locked_at_start_leaves_the_broker_up_and_locked(desktop: Desktop, idp: str) -> None:
    """A user service can start before the desktop session has unlocked the keyring: the broker then
    serves, locked (tokens are `locked`, exit 6), says why once, and `dc-broker unlock` opens the
    vault as soon as the keyring is open; nothing stored is lost on the way."""
    keyring_vault_with_acme(desktop, idp)
    desktop.lock()
    sock = desktop.env["DC_BROKER_SOCKET"]
    daemon = subprocess.Popen(
        [DC_BROKER, "run"], env=desktop.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    replacement: subprocess.Popen[bytes] | None = None
    try:
        wait_for_socket(sock, daemon)
        locked = dc_token(sock, "acme")
        assert locked.returncode == 6, locked.stderr
        early = desktop.cli("unlock")  # the keyring is still locked: said, and the broker stays up
        assert early.returncode == 13, early.stderr
        assert "the desktop keyring is locked" in early.stderr and "Traceback" not in early.stderr
        assert "free space" not in early.stderr  # no disk-full hint for a locked keyring
        # the person logs in to the desktop: a keyring daemon unlocked with the login password
        replacement = subprocess.Popen(
            ["gnome-keyring-daemon", "--replace", "--foreground", "--unlock", "--components=secrets"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=desktop.env,
        )  # fmt: skip
        assert replacement.stdin is not None
        replacement.stdin.write(KEYRING_PASSWORD.encode())
        replacement.stdin.close()
        wait_for(lambda: desktop.cli("unlock").returncode == 0, 20, "`dc-broker unlock` to open the vault")
        got = dc_token(sock, "acme")
        assert got.returncode == 0, got.stderr
    finally:
        assert stop(daemon) == 0
        if replacement is not None:
            _stop(replacement)
    err = daemon.stderr.read() if daemon.stderr else ""
    assert "stays locked for now: the desktop keyring is locked" in err and "Traceback" not in err


def test_vault_api_round_trip_and_several_vaults_coexist(desktop: Desktop) -> None:
    paths = [desktop.tmp / name / "vault.db" for name in ("one", "two")]
    for n, path in enumerate(paths):
        source = create_keyring_key(str(path))
        with Vault.create(path, source) as vault:
            assert vault.key_source.kind is KeySourceKind.KEYRING
            vault.set_credentials("p", Credentials(password=Secret(f"secret-{n}")))
    items = desktop.items()
    assert sorted(attrs["dc-broker-vault"] for attrs, _ in items) == sorted(map(str, paths))
    assert items[0][1] != items[1][1]  # a key per vault
    for n, path in enumerate(paths):
        with Vault.open(path) as vault:
            assert vault.locked
            vault.unlock()
            password = vault.credentials("p").password
            assert password is not None and password.reveal() == f"secret-{n}"

    # one vault's item deleted: that vault says so; the other still opens
    _, reference = _stored_reference(paths[0])
    with contextlib.closing(secretstorage.dbus_init()) as conn:
        (item,) = secretstorage.search_items(conn, {"application": "dc-broker", "dc-broker-key": reference})
        item.delete()
    with pytest.raises(VaultError, match=f"the desktop keyring holds no dc-broker key {reference} "):
        Vault.open(paths[0], auto_unlock=True)
    with Vault.open(paths[1], auto_unlock=True) as vault:
        assert not vault.locked


def test_an_item_that_is_not_a_key_is_refused(desktop: Desktop) -> None:
    path = desktop.tmp / "v" / "vault.db"
    Vault.create(path, create_keyring_key(str(path))).close()
    with contextlib.closing(secretstorage.dbus_init()) as conn:
        (item,) = secretstorage.search_items(conn, {"application": "dc-broker"})
        item.set_secret(b"a password, not a key")
    _, reference = _stored_reference(path)
    with pytest.raises(VaultError, match=f"^the desktop keyring's dc-broker key {reference} does not hold 32 bytes$"):
        Vault.open(path, auto_unlock=True)
    with contextlib.closing(secretstorage.dbus_init()) as conn:
        (item,) = secretstorage.search_items(conn, {"application": "dc-broker"})
        item.set_secret(os.urandom(32))  # a key, but another one: the wrap's tag says so
    with pytest.raises(VaultError, match=f"^the keyring {reference} does not open the vault {path} "):
        Vault.open(path, auto_unlock=True)


def test_locked_keyring_is_a_clear_error(desktop: Desktop) -> None:
    vault_path = desktop.tmp / "data" / "dc-broker" / "vault.db"
    assert desktop.cli("init", "--key-source", "keyring").returncode == 0
    desktop.lock()

    with pytest.raises(VaultError, match=r"^the desktop keyring is locked; unlock it \(log in to the desktop"):
        Vault.open(vault_path, auto_unlock=True)
    with Vault.open(vault_path) as vault, pytest.raises(VaultError, match="the desktop keyring is locked"):
        vault.unlock()

    # a new vault cannot be made either, and the failed init leaves no vault behind
    other = desktop.tmp / "other" / "vault.db"
    result = desktop.cli("init", "--vault", str(other), "--key-source", "keyring")
    assert result.returncode == 2
    assert result.stderr.startswith("Error: the desktop keyring is locked; unlock it")
    assert not other.exists()


def test_failed_init_leaves_no_keyring_item(desktop: Desktop) -> None:
    assert desktop.cli("init", "--key-source", "keyring").returncode == 0
    [(first, _)] = desktop.items()
    again = desktop.cli("init", "--key-source", "keyring")  # the vault exists: refused after making a key
    assert again.returncode == 2
    assert "already exists; refusing to overwrite a vault" in again.stderr
    assert [attrs for attrs, _ in desktop.items()] == [first]


def test_no_secret_service_is_a_clear_error(no_keyring: Desktop, monkeypatch: pytest.MonkeyPatch) -> None:
    vault_path = no_keyring.tmp / "data" / "dc-broker" / "vault.db"
    result = no_keyring.cli("init", "--key-source", "keyring")
    assert result.returncode == 2
    assert result.stderr.startswith(
        "Error: no Secret Service answers on the session bus (org.freedesktop.secrets is not on the bus); "
        "the keyring key source needs a desktop keyring"
    )
    assert not vault_path.exists()

    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS")
    with pytest.raises(VaultError, match=r"DBUS_SESSION_BUS_ADDRESS is unset.*use `--key-source keyfile`"):
        create_keyring_key(str(vault_path))
    # a vault whose keyring is unreachable says so, and names its fix
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", f"unix:path={no_keyring.tmp}/no-such-bus")
    with pytest.raises(VaultError, match="no Secret Service answers on the session bus"):
        Keyring("0" * 32).read_key()


def test_no_default_collection_is_a_clear_error(bare_keyring: Desktop) -> None:
    result = bare_keyring.cli("init", "--key-source", "keyring")
    assert result.returncode == 2
    assert result.stderr == (
        "Error: the desktop keyring has no default collection; make one (Passwords and Keys / seahorse: "
        "a new password keyring, then `Set as default`) and try again\n"
    )
    assert not (bare_keyring.tmp / "data" / "dc-broker" / "vault.db").exists()
    assert bare_keyring.items() == []


def test_without_secretstorage_the_error_names_the_extra(tmp_path: Path) -> None:
    """The daemon's base install has no secretstorage: a keyring vault says which command adds it."""
    program = (
        "import sys; sys.modules['secretstorage'] = None\n"  # what an install without the extra sees
        "from dc_broker.cli import main\n"
        f"sys.argv = ['dc-broker', 'init', '--vault', {str(tmp_path / 'v' / 'vault.db')!r}, '--key-source', 'keyring']\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr == (
        "Error: the keyring key source needs the Python package secretstorage, which is not installed: "
        "run `pip install 'dc-broker[keyring]'` in dc-broker's environment\n"
    )
    assert not (tmp_path / "v" / "vault.db").exists()


def test_keyring_reference_is_checked() -> None:
    with pytest.raises(VaultError, match="is not a dc-broker keyring key id"):
        Keyring("../../etc")
