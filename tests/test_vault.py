"""The encrypted vault: round trips, nothing in clear on disk, tamper detection per profile, key
sources, lock/unlock, passphrase change, one writer, file modes."""

from __future__ import annotations

import base64
import hashlib
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dc_broker.errors import RecordCorrupt, RecordRolledBack, VaultBusy, VaultError, WrongPassphrase
from dc_broker.secret import Secret
from dc_broker.sessions.session import Session
from dc_broker.sessions.states import State
from dc_broker.tokens import Credentials, TokenSet
from dc_broker.vault import (
    PRODUCTION_KDF,
    KdfParams,
    KeyFile,
    Passphrase,
    SystemdCredential,
    Vault,
    create_key_file,
    default_vault_path,
    unlock_delay,
)
from dc_broker.vault.keysource import derive_kek, read_key_file
from dc_token.errors import Locked, LoginRequired
from tests.conftest import CREDENTIALS, idp_transport, profile, running, trio_wall_clock

FAST = KdfParams(memory_kib=64, iterations=1, lanes=1)  # tests only: production is 64 MiB
REPO = Path(__file__).resolve().parent.parent

PASSWORD = "pässword-Zq81-unique"
CLIENT_SECRET = "client-secret-Hk27-unique"
DEVICE_REFRESH = "device-refresh-Lm55-unique"
ACCESS = "eyJhbGciOiJSUzI1NiJ9.access-Wx33-unique"
ROTATED_REFRESH = "rotated-refresh-Pq44-unique"
ID_TOKEN = "eyJhbGciOiJSUzI1NiJ9.id-Tt99-unique"
ALL_SECRETS = [PASSWORD, CLIENT_SECRET, DEVICE_REFRESH, ACCESS, ROTATED_REFRESH, ID_TOKEN, "hunter2-passphrase"]

FULL = Credentials(password=Secret(PASSWORD), client_secret=Secret(CLIENT_SECRET), refresh_token=Secret(DEVICE_REFRESH))
TOKENS = TokenSet(
    access_token=Secret(ACCESS),
    obtained_at=1_750_000_000.25,
    expires_at=1_750_001_800.25,
    token_type="Bearer",
    refresh_token=Secret(ROTATED_REFRESH),
    refresh_expires_at=1_750_001_800.5,
    scope="openid profile",
    id_token=Secret(ID_TOKEN),
)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    d = tmp_path / "vaults"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture
def key_file(home: Path) -> Path:
    key = home / "vault.key"
    create_key_file(str(key))
    return key


@pytest.fixture
def vault(home: Path, key_file: Path) -> Iterator[Vault]:
    v = Vault.create(home / "vault.db", KeyFile(str(key_file)))
    yield v
    v.close()


def pass_vault(home: Path, passphrase: str = "hunter2-passphrase") -> Vault:
    return Vault.create(home / "vault.db", Passphrase(), passphrase=Secret(passphrase), kdf_params=FAST)


def records(path: Path) -> dict[tuple[str, str], tuple[int, bytes, bytes]]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT profile, field, version, nonce, ciphertext FROM records").fetchall()
    finally:
        conn.close()
    return {(p, f): (v, n, c) for p, f, v, n, c in rows}


def sql(path: Path, statement: str, *args: object) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        with conn:
            return conn.execute(statement, args).fetchall()
    finally:
        conn.close()


# ------------------------------------------------------------------ round trips


async def test_every_field_round_trips_and_survives_reopen(vault: Vault) -> None:
    vault.set_credentials("acme", FULL)
    await vault.save_tokens("acme", TOKENS)
    assert vault.credentials("acme") == FULL
    assert vault.saved_tokens("acme") == TOKENS
    path = Path(vault.path)
    vault.close()
    with Vault.open(path, auto_unlock=True) as again:
        assert again.credentials("acme") == FULL
        assert again.saved_tokens("acme") == TOKENS
        assert again.profiles() == ["acme"]


async def test_optional_fields_stay_none(vault: Vault) -> None:
    minimal = TokenSet(access_token=Secret("a"), obtained_at=1.0, expires_at=2.0)
    vault.set_credentials("svc", Credentials(client_secret=Secret("s")))
    await vault.save_tokens("svc", minimal)
    assert vault.credentials("svc") == Credentials(client_secret=Secret("s"))
    assert vault.saved_tokens("svc") == minimal
    assert vault.credentials("nobody") == Credentials()
    assert vault.saved_tokens("nobody") is None


async def test_set_credentials_replaces_and_remove_forgets(vault: Vault) -> None:
    vault.set_credentials("acme", FULL)
    vault.set_credentials("device", Credentials())  # a device-login profile with no secret yet
    await vault.save_tokens("acme", TOKENS)
    vault.set_credentials("acme", Credentials(password=Secret("new")))
    assert vault.credentials("acme") == Credentials(password=Secret("new"))
    assert vault.saved_tokens("acme") == TOKENS  # credentials changes leave tokens alone
    assert vault.profiles() == ["acme", "device"]
    await vault.forget_tokens("acme")
    assert vault.saved_tokens("acme") is None
    assert vault.remove("acme") is True
    assert vault.remove("acme") is False
    assert vault.profiles() == ["device"]
    assert vault.credentials("acme") == Credentials()


async def test_concurrent_saves_of_many_profiles_all_land(vault: Vault) -> None:
    async with trio.open_nursery() as nursery:
        for i in range(40):
            tokens = TokenSet(
                access_token=Secret(f"a{i}"), obtained_at=0.0, expires_at=1.0, refresh_token=Secret(f"r{i}")
            )
            nursery.start_soon(vault.save_tokens, f"p{i}", tokens)
    for i in range(40):
        saved = vault.saved_tokens(f"p{i}")
        assert saved is not None and saved.refresh_token == Secret(f"r{i}")


# ------------------------------------------------------------------ nothing in clear


def encodings(secret: str) -> Iterator[bytes]:
    raw = secret.encode()
    yield raw
    yield raw.hex().encode()
    yield raw.hex().upper().encode()
    yield secret.encode("utf-16-le")
    yield secret.encode("utf-16-be")
    for shift in range(3):  # base64 of the secret at each alignment, without the ragged ends
        for enc in (base64.b64encode, base64.urlsafe_b64encode):
            body = enc(raw[shift:]).rstrip(b"=")
            yield body[: len(body) // 4 * 4 - 4]


def assert_no_secret_in(paths: list[Path]) -> None:
    for path in paths:
        if not path.exists():
            continue
        data = path.read_bytes()
        for secret in ALL_SECRETS:
            for needle in encodings(secret):
                assert len(needle) >= 12
                assert needle not in data, f"{secret!r} found in {path.name} as {needle!r}"


async def test_the_files_hold_no_secret_in_any_encoding(home: Path) -> None:
    v = pass_vault(home)
    v.set_credentials("acme", FULL)
    await v.save_tokens("acme", TOKENS)
    v.change_passphrase(Secret("hunter2-passphrase"), Secret("hunter2-passphrase-2"))
    path = Path(v.path)
    files = [path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}.lock")]
    assert Path(f"{path}-wal").stat().st_size > 0  # checked while the WAL still holds the writes
    assert_no_secret_in(files)
    v.close()
    assert_no_secret_in(files)


def test_the_data_key_is_not_in_the_file_either(vault: Vault) -> None:
    data_key = vault._unwrap(None)
    vault.close()
    data = Path(vault.path).read_bytes()
    assert data_key not in data and data_key.hex().encode() not in data


# ------------------------------------------------------------------ tampering


@pytest.fixture(scope="module")
def template() -> Iterator[Path]:
    """A closed two-profile key-file vault, built once; tests work on copies."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "t"
        d.mkdir(mode=0o700)
        key = d / "vault.key"
        create_key_file(str(key))
        v = Vault.create(d / "vault.db", KeyFile(str(key)))
        for name in ("acme", "other"):
            v.set_credentials(name, FULL)
            trio.run(v.save_tokens, name, TOKENS)
        v.close()
        yield d


def copy_of(template: Path, into: Path) -> Path:
    into.mkdir(mode=0o700, exist_ok=True)
    shutil.copy(template / "vault.key", into / "vault.key")
    shutil.copy(template / "vault.db", into / "vault.db")
    sql(into / "vault.db", "UPDATE data_key SET reference = ?", str(into / "vault.key"))
    return into / "vault.db"


def read_profile(v: Vault, name: str) -> None:
    v.credentials(name)
    v.saved_tokens(name)


FIELDS = ["password", "client_secret", "refresh_token", "tokens"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    field=st.sampled_from(FIELDS),
    column=st.sampled_from(["nonce", "ciphertext"]),
    position=st.integers(min_value=0, max_value=10_000),
    bit=st.integers(min_value=0, max_value=7),
)
def test_a_flipped_bit_in_any_record_names_its_profile_only(
    template: Path, field: str, column: str, position: int, bit: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = copy_of(template, Path(tmp) / "v")
        (blob,) = sql(path, f"SELECT {column} FROM records WHERE profile = 'acme' AND field = ?", field)[0]
        assert isinstance(blob, bytes)
        flipped = bytearray(blob)
        flipped[position % len(blob)] ^= 1 << bit
        sql(path, f"UPDATE records SET {column} = ? WHERE profile = 'acme' AND field = ?", bytes(flipped), field)
        with Vault.open(path, auto_unlock=True) as v:
            with pytest.raises(RecordCorrupt, match=rf"profile 'acme': its {field} record") as info:
                read_profile(v, "acme")
            assert all(s not in str(info.value) for s in ALL_SECRETS)
            assert v.credentials("other") == FULL
            assert v.saved_tokens("other") == TOKENS


def test_a_flipped_byte_in_the_raw_file_is_detected(template: Path, tmp_path: Path) -> None:
    path = copy_of(template, tmp_path / "v")
    (ciphertext,) = sql(path, "SELECT ciphertext FROM records WHERE profile = 'acme' AND field = 'password'")[0]
    assert isinstance(ciphertext, bytes)
    data = bytearray(path.read_bytes())
    at = data.find(ciphertext)
    assert at > 0 and data.find(ciphertext, at + 1) == -1
    data[at + len(ciphertext) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    with Vault.open(path, auto_unlock=True) as v:
        with pytest.raises(RecordCorrupt, match="profile 'acme'"):
            v.credentials("acme")
        assert v.saved_tokens("acme") == TOKENS  # the same profile's other records are fine
        assert v.credentials("other") == FULL


@pytest.mark.parametrize(
    ("source", "target"),
    [
        (("other", "password"), ("acme", "password")),  # another profile's record
        (("acme", "client_secret"), ("acme", "password")),  # another field of the same profile
        (("acme", "refresh_token"), ("acme", "tokens")),
    ],
)
def test_swapped_records_fail_the_associated_data_check(
    template: Path, tmp_path: Path, source: tuple[str, str], target: tuple[str, str]
) -> None:
    path = copy_of(template, tmp_path / "v")
    version, nonce, ciphertext = records(path)[source]
    sql(
        path,
        "UPDATE records SET version = ?, nonce = ?, ciphertext = ? WHERE profile = ? AND field = ?",
        version,
        nonce,
        ciphertext,
        *target,
    )
    with (
        Vault.open(path, auto_unlock=True) as v,
        pytest.raises(RecordCorrupt, match=rf"profile '{target[0]}': its {target[1]} record"),
    ):
        read_profile(v, target[0])


def test_a_record_from_a_newer_format_is_refused_for_that_profile(template: Path, tmp_path: Path) -> None:
    path = copy_of(template, tmp_path / "v")
    sql(path, "UPDATE records SET version = 3 WHERE profile = 'acme' AND field = 'tokens'")
    with Vault.open(path, auto_unlock=True) as v:
        with pytest.raises(RecordCorrupt, match="format version 3"):
            v.saved_tokens("acme")
        assert v.credentials("acme") == FULL


# ------------------------------------------------------------------ generations: no rolling back

ROTATED = Credentials(password=Secret("rotated-password-Ab12"), client_secret=Secret("rotated-secret-Cd34"))


def row(path: Path, profile: str, field: str) -> tuple[object, ...]:
    return sql(
        path,
        "SELECT version, generation, nonce, ciphertext FROM records WHERE profile = ? AND field = ?",
        profile,
        field,
    )[0]


def put_back(path: Path, profile: str, field: str, old: tuple[object, ...]) -> None:
    sql(
        path,
        "INSERT OR REPLACE INTO records (profile, field, version, generation, nonce, ciphertext) VALUES (?, ?, ?, ?, ?, ?)",
        profile,
        field,
        *old,
    )


def test_a_record_put_back_after_a_rotate_is_refused_as_rolled_back(template: Path, tmp_path: Path) -> None:
    """Finding 8: the client secret's record from before `rotate`, copied back into the vault,
    decrypted as the old secret. Now its generation is in its associated data and the index says
    which is current: refused, saying it was rolled back; the other profile is untouched."""
    path = copy_of(template, tmp_path / "v")
    old_secret, old_tokens = row(path, "acme", "client_secret"), row(path, "acme", "tokens")
    with Vault.open(path, auto_unlock=True) as v:
        v.set_credentials("acme", ROTATED)  # `dc-broker rotate`
        assert v.saved_tokens("acme") == TOKENS  # kept, in the new generation
    put_back(path, "acme", "client_secret", old_secret)
    with Vault.open(path, auto_unlock=True) as v:
        with pytest.raises(RecordRolledBack) as caught:
            v.credentials("acme")
        assert str(caught.value).startswith(
            "profile 'acme': its client_secret record in the vault is from before the profile's last change "
            "(generation 1; the vault is at 2): an older copy was put back (rolled back); store it again with "
            "`dc-broker add acme`"
        ), caught.value
        assert all(secret not in str(caught.value) for secret in ALL_SECRETS)
        assert v.credentials("other") == FULL and v.saved_tokens("other") == TOKENS
    # the generation column says nothing by itself: set to the current one, the old record's
    # associated data does not match
    put_back(path, "acme", "client_secret", (old_secret[0], 2, *old_secret[2:]))
    put_back(path, "acme", "tokens", old_tokens)
    with Vault.open(path, auto_unlock=True) as v:
        with pytest.raises(RecordCorrupt, match="client_secret record in the vault fails authentication"):
            v.credentials("acme")
        with pytest.raises(RecordRolledBack, match=r"tokens record .* \(rolled back\)"):
            v.saved_tokens("acme")


def test_an_index_put_back_with_the_record_shows_in_the_other_profiles(template: Path, tmp_path: Path) -> None:
    """Putting back the index too, from the same older copy, makes acme's old record current again,
    and every other profile changed since then newer than the index: refused, naming the index.
    (A copy of the whole vault from before is an older vault: no file can tell.)"""
    path = copy_of(template, tmp_path / "v")
    old_secret = row(path, "acme", "client_secret")
    (old_index,) = sql(path, "SELECT nonce, ciphertext FROM generations")
    with Vault.open(path, auto_unlock=True) as v:
        v.set_credentials("acme", ROTATED)
        v.set_credentials("other", ROTATED)
    put_back(path, "acme", "client_secret", old_secret)
    sql(path, "UPDATE generations SET nonce = ?, ciphertext = ?", *old_index)
    newer = r"is newer than the vault's index says .* the index was put back"
    with Vault.open(path, auto_unlock=True) as v, pytest.raises(RecordRolledBack, match=newer):
        v.credentials("other")


@pytest.mark.parametrize("change", ["remove", "forget_tokens"])
def test_records_put_back_after_a_remove_or_a_logout_are_refused(template: Path, tmp_path: Path, change: str) -> None:
    path = copy_of(template, tmp_path / "v")
    old = {field: row(path, "acme", field) for field in FIELDS}
    with Vault.open(path, auto_unlock=True) as v:
        if change == "remove":
            assert v.remove("acme")
            v.set_credentials("acme", ROTATED)  # added again: its generations go on, never back to 1
        else:
            trio.run(v.forget_tokens, "acme")  # logout
            assert v.credentials("acme") == FULL
    for field, record in old.items():
        put_back(path, "acme", field, record)
    with Vault.open(path, auto_unlock=True) as v:
        with pytest.raises(RecordRolledBack):
            v.credentials("acme")
        with pytest.raises(RecordRolledBack):
            v.saved_tokens("acme")


def test_a_format_1_vault_keeps_working_and_gets_generations_at_its_first_unlock(tmp_path: Path) -> None:
    """A vault written before generations (tests/data/vault-format1, made by that dc-broker): opened
    locked it is still format 1 and lists its profiles; unlocked it is migrated in one transaction
    and reads as before; a rotate afterwards puts its old records out of date like any other's."""
    into = tmp_path / "old"
    into.mkdir(mode=0o700)
    for name in ("vault.db", "vault.key"):
        shutil.copy(REPO / "tests" / "data" / "vault-format1" / name, into / name)
        (into / name).chmod(0o600)
    path = into / "vault.db"
    sql(path, "UPDATE data_key SET reference = ?", str(into / "vault.key"))
    assert sql(path, "SELECT format FROM meta") == [(1,)]
    old_secret = sql(
        path, "SELECT version, 0, nonce, ciphertext FROM records WHERE profile = 'acme' AND field = 'client_secret'"
    )[0]
    with Vault.open(path) as v:
        assert v.profiles() == ["acme", "svc"]
    assert sql(path, "SELECT format FROM meta") == [(1,)]  # nothing written without the key
    with Vault.open(path, auto_unlock=True) as v:
        assert v.credentials("acme") == Credentials(
            password=Secret("format1-password"), client_secret=Secret("format1-client-secret")
        )
        assert v.credentials("svc") == Credentials(client_secret=Secret("format1-svc-secret"))
        saved = v.saved_tokens("acme")
        assert saved is not None and saved.refresh_token == Secret("format1-refresh")
        v.set_credentials("acme", ROTATED)
    assert sql(path, "SELECT format FROM meta") == [(2,)]
    assert sql(path, "PRAGMA integrity_check") == [("ok",)]
    put_back(path, "acme", "client_secret", old_secret)
    with Vault.open(path, auto_unlock=True) as v:
        with pytest.raises(RecordRolledBack, match=r"generation 0; the vault is at 1"):
            v.credentials("acme")
        assert v.credentials("svc") == Credentials(client_secret=Secret("format1-svc-secret"))  # untouched: still 0


def test_rotate_then_a_copy_put_back_is_refused_by_the_running_broker(tmp_path: Path) -> None:
    """The red team's steps with the real commands: `dc-broker add`, `dc-broker rotate
    --client-secret`, the old record put back with sqlite3, then `dc-broker run`: dc-token is told
    the record was rolled back (and to store the secret again), not served the old secret's token."""
    from tests.e2e import DC_BROKER, dc_token, dev_idp, wait_for_socket

    env = {k: v for k, v in os.environ.items() if not k.startswith("DC_BROKER_")}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "config"), XDG_DATA_HOME=str(tmp_path / "data"))
    env["DC_BROKER_SOCKET"] = sock = str(tmp_path / "run" / "broker.sock")

    def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([DC_BROKER, *args], input=stdin, capture_output=True, text=True, env=env, timeout=60)

    with dev_idp() as base:
        assert cli("init", "--key-source", "keyfile").returncode == 0
        added = cli(
            *("add", "svc", "--server", base, "--tenant", "demo", "--client-id", "dc-service"),
            *("--grant", "client_credentials", "--secret-stdin"),
            stdin="dc-service-secret\n",
        )
        assert added.returncode == 0, added.stderr
        path = tmp_path / "data" / "dc-broker" / "vault.db"
        old = row(path, "svc", "client_secret")
        rotated = cli("rotate", "svc", "--client-secret", "--secret-stdin", "--no-verify", stdin="new-secret-Ef56\n")
        assert rotated.returncode == 0, rotated.stderr
        put_back(path, "svc", "client_secret", old)
        daemon = subprocess.Popen(
            [DC_BROKER, "run"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            wait_for_socket(sock, daemon)
            got = dc_token(sock, "svc")
        finally:
            daemon.terminate()
            daemon.wait(20)
    assert got.returncode == 5, got.stderr  # login_required: a person must store the secret again
    assert "client_secret record in the vault is from before the profile's last change" in got.stderr
    assert "(rolled back)" in got.stderr and "dc-service-secret" not in got.stderr


def test_record_corrupt_tells_sessions_a_person_must_act() -> None:
    assert issubclass(RecordCorrupt, LoginRequired)  # a session goes to login_required, others carry on
    assert issubclass(WrongPassphrase, Locked)


# ------------------------------------------------------------------ passphrase, lock, unlock


def test_a_passphrase_vault_opens_locked(home: Path) -> None:
    v = pass_vault(home)
    v.set_credentials("acme", FULL)
    v.close()
    with Vault.open(home / "vault.db", auto_unlock=True) as v:  # auto_unlock cannot help a passphrase vault
        assert v.locked
        assert v.profiles() == ["acme"]  # names are not secret
        for call in (lambda: v.credentials("acme"), lambda: v.saved_tokens("acme")):
            with pytest.raises(Locked, match=r"the vault is locked; run `dc-broker unlock`"):
                call()
        with pytest.raises(Locked):
            v.set_credentials("acme", FULL)
        with pytest.raises(Locked):
            trio.run(v.save_tokens, "acme", TOKENS)
        v.unlock(Secret("hunter2-passphrase"))
        assert v.credentials("acme") == FULL
        v.lock()
        assert v.locked
        with pytest.raises(Locked):
            v.credentials("acme")
        with pytest.raises(Locked, match="none was given"):
            v.unlock()


def test_wrong_passphrase_leaves_the_vault_locked_and_unharmed(home: Path) -> None:
    v = pass_vault(home)
    v.set_credentials("acme", FULL)
    v.close()
    path = home / "vault.db"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with Vault.open(path) as v:
        for attempt in (1, 2, 3):
            with pytest.raises(WrongPassphrase) as info:
                v.unlock(Secret("not-it"))
            assert v.locked and v.failed_unlocks == attempt
            assert info.value.retry_after == unlock_delay(attempt)
            assert "not-it" not in str(info.value)
        with pytest.raises(WrongPassphrase):
            v.unlock(Secret(""))
        v.unlock(Secret("hunter2-passphrase"))
        assert not v.locked and v.failed_unlocks == 0
        with pytest.raises(WrongPassphrase):  # checked even when unlocked; stays unlocked
            v.unlock(Secret("not-it"))
        assert not v.locked
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert WrongPassphrase.exit_code == Locked.exit_code == 6


def test_unlock_delay_policy() -> None:
    assert [unlock_delay(n) for n in range(9)] == [0, 1, 2, 4, 8, 16, 30, 30, 30]
    assert unlock_delay(10_000) == 30


def test_change_passphrase_rewraps_only_the_key_row(home: Path) -> None:
    v = pass_vault(home, "old-passphrase")
    v.set_credentials("acme", FULL)
    trio.run(v.save_tokens, "acme", TOKENS)
    path = Path(v.path)
    tables = ("meta", "profiles", "records")
    before = {t: sql(path, f"SELECT * FROM {t} ORDER BY 1") for t in tables}
    key_before = sql(path, "SELECT * FROM data_key")
    with pytest.raises(WrongPassphrase):
        v.change_passphrase(Secret("wrong"), Secret("new-passphrase"))
    assert sql(path, "SELECT * FROM data_key") == key_before
    v.change_passphrase(Secret("old-passphrase"), Secret("new-passphrase"))
    assert {t: sql(path, f"SELECT * FROM {t} ORDER BY 1") for t in tables} == before
    key_after = sql(path, "SELECT kind, kdf, salt, nonce, wrapped FROM data_key")
    assert len(key_after) == 1 and key_after != key_before
    assert not v.locked  # stays as it was
    with pytest.raises(VaultError):
        v.change_passphrase(Secret("new-passphrase"), Secret(""))
    v.close()
    with Vault.open(path) as v:
        with pytest.raises(WrongPassphrase):
            v.unlock(Secret("old-passphrase"))
        v.unlock(Secret("new-passphrase"))
        assert v.credentials("acme") == FULL
        assert v.saved_tokens("acme") == TOKENS


def test_change_passphrase_needs_a_passphrase_vault(vault: Vault) -> None:
    with pytest.raises(VaultError, match="keyfile"):
        vault.change_passphrase(Secret("a"), Secret("b"))


def test_kdf_defaults_are_production_strength(home: Path) -> None:
    assert PRODUCTION_KDF.memory_kib >= 64 * 1024
    assert Vault.create.__kwdefaults__["kdf_params"] is PRODUCTION_KDF
    with pytest.raises(VaultError):
        KdfParams(memory_kib=4, lanes=1)
    v = pass_vault(home)
    v.close()
    (kdf,) = sql(home / "vault.db", "SELECT kdf FROM data_key")[0]
    assert KdfParams.from_json(str(kdf)) == FAST
    assert len(derive_kek(Secret("x"), b"s" * 16, FAST)) == 32


def test_create_refuses_bad_passphrase_arguments(home: Path, key_file: Path) -> None:
    with pytest.raises(VaultError, match="non-empty passphrase"):
        Vault.create(home / "a.db", Passphrase(), passphrase=Secret(""), kdf_params=FAST)
    with pytest.raises(VaultError, match="no passphrase"):
        Vault.create(home / "b.db", KeyFile(str(key_file)), passphrase=Secret("x"))
    assert not (home / "a.db").exists() and not (home / "b.db").exists()


# ------------------------------------------------------------------ key files and systemd credentials


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o602])
def test_a_key_file_open_to_group_or_other_is_refused(home: Path, key_file: Path, mode: int) -> None:
    Vault.create(home / "vault.db", KeyFile(str(key_file))).close()
    key_file.chmod(mode)
    with pytest.raises(VaultError, match=rf"{key_file} has mode {mode:04o}.*chmod 600"):
        Vault.open(home / "vault.db", auto_unlock=True)
    with pytest.raises(VaultError, match="mode"):
        Vault.create(home / "other.db", KeyFile(str(key_file)))
    key_file.chmod(0o600)
    with Vault.open(home / "vault.db", auto_unlock=True) as v:
        assert not v.locked


def test_key_file_format_and_creation(home: Path, key_file: Path) -> None:
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert len(read_key_file(str(key_file))) == 32
    with pytest.raises(VaultError, match="refusing to overwrite"):
        create_key_file(str(key_file))
    short = home / "short.key"
    short.write_bytes(b"x" * 31)
    short.chmod(0o600)
    with pytest.raises(VaultError, match="exactly 32"):
        read_key_file(str(short))
    with pytest.raises(VaultError, match="cannot open"):
        read_key_file(str(home / "missing.key"))


def test_the_wrong_key_file_does_not_open_the_vault(vault: Vault, home: Path, key_file: Path) -> None:
    path = Path(vault.path)
    vault.close()
    key_file.unlink()
    create_key_file(str(key_file))  # same path, different key
    with pytest.raises(VaultError, match="does not open the vault"):
        Vault.open(path, auto_unlock=True)
    with Vault.open(path) as v:
        assert v.locked
        with pytest.raises(VaultError, match="not by a passphrase"):
            v.unlock(Secret("x"))


def test_systemd_credential_source(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = home / "credentials"
    creds.mkdir(mode=0o500 | 0o200)
    create_key_file(str(creds / "dc-broker-vault"))
    (creds / "dc-broker-vault").chmod(0o440)  # systemd's ACL mask shows as group bits
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    v = Vault.create(home / "vault.db", SystemdCredential("dc-broker-vault"))
    v.set_credentials("svc", Credentials(client_secret=Secret(CLIENT_SECRET)))
    v.close()
    with Vault.open(home / "vault.db", auto_unlock=True) as v:
        assert v.key_source == SystemdCredential("dc-broker-vault")
        assert v.credentials("svc").client_secret == Secret(CLIENT_SECRET)
    (creds / "dc-broker-vault").chmod(0o444)
    with pytest.raises(VaultError, match="mode 0444"):
        Vault.open(home / "vault.db", auto_unlock=True)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(VaultError, match=r"\$CREDENTIALS_DIRECTORY is not set"):
        Vault.open(home / "vault.db", auto_unlock=True)
    with pytest.raises(VaultError):
        SystemdCredential("../etc/key")


# ------------------------------------------------------------------ one writer, files, modes


def test_a_second_opener_is_refused_naming_the_path(vault: Vault) -> None:
    with pytest.raises(VaultBusy, match=rf"{vault.path} is already open"):
        Vault.open(vault.path)
    code = "import sys\nfrom dc_broker.vault import Vault\ntry:\n    Vault.open(sys.argv[1])\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
    out = subprocess.run(
        [sys.executable, "-c", code, vault.path], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert out.startswith(f"VaultBusy the vault {vault.path} is already open")
    vault.close()
    with Vault.open(vault.path, auto_unlock=True) as again:
        assert not again.locked


async def test_file_and_directory_modes(tmp_path: Path, key_file: Path) -> None:
    old_umask = os.umask(0o002)  # a careless umask must not matter
    try:
        path = tmp_path / "data" / "dc-broker" / "vault.db"
        with Vault.create(path, KeyFile(str(key_file))) as v:
            v.set_credentials("acme", FULL)
            await v.save_tokens("acme", TOKENS)
            assert path.parent.stat().st_mode & 0o777 == 0o700
            for suffix in ("", "-wal", "-shm", ".lock"):
                assert Path(f"{path}{suffix}").stat().st_mode & 0o777 == 0o600, suffix
    finally:
        os.umask(old_umask)


def test_an_open_directory_or_file_is_refused(tmp_path: Path, key_file: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o700)
    shared.chmod(0o755)
    with pytest.raises(VaultError, match="chmod 700"):
        Vault.create(shared / "vault.db", KeyFile(str(key_file)))
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    Vault.create(private / "vault.db", KeyFile(str(key_file))).close()
    (private / "vault.db").chmod(0o644)
    with pytest.raises(VaultError, match="chmod 600"):
        Vault.open(private / "vault.db")


def test_create_refuses_to_overwrite(vault: Vault, home: Path, key_file: Path) -> None:
    with pytest.raises(VaultBusy):  # open: the lock says so first
        Vault.create(vault.path, KeyFile(str(key_file)))
    vault.close()
    with pytest.raises(VaultError, match="refusing to overwrite"):
        Vault.create(vault.path, KeyFile(str(key_file)))
    Path(f"{home}/fresh.db-wal").write_bytes(b"stale")
    with pytest.raises(VaultError, match="refusing to overwrite"):
        Vault.create(home / "fresh.db", KeyFile(str(key_file)))


def test_missing_or_foreign_files_are_clear_errors(home: Path) -> None:
    with pytest.raises(VaultError, match=r"no vault at .*dc-broker init"):
        Vault.open(home / "none.db")
    junk = home / "junk.db"
    junk.write_bytes(os.urandom(4096))
    junk.chmod(0o600)
    with pytest.raises(VaultError, match="cannot be used"):
        Vault.open(junk)
    other = home / "other.db"
    sql(other, "CREATE TABLE t (x)")
    other.chmod(0o600)
    with pytest.raises(VaultError, match=f"{other} is not a dc-broker vault"):
        Vault.open(other)
    assert sql(other, "PRAGMA journal_mode") == [("delete",)]  # refused before anything changed


def test_closed_vault_refuses_use(vault: Vault) -> None:
    vault.close()
    vault.close()  # idempotent
    with pytest.raises(VaultError, match="closed"):
        vault.profiles()
    assert "closed" in repr(vault)


def test_reprs_show_no_secrets(vault: Vault, key_file: Path) -> None:
    vault.set_credentials("acme", FULL)
    text = repr(vault) + repr(vault.credentials("acme")) + repr(vault.key_source)
    assert all(s not in text for s in ALL_SECRETS)
    assert "keyfile" in repr(vault) and "unlocked" in repr(vault)


def test_default_vault_path() -> None:
    assert default_vault_path({"XDG_DATA_HOME": "/data", "HOME": "/h"}) == "/data/dc-broker/vault.db"
    assert default_vault_path({"XDG_DATA_HOME": "relative"}).endswith("/.local/share/dc-broker/vault.db")
    assert default_vault_path({}) == os.path.expanduser("~/.local/share/dc-broker/vault.db")
    assert default_vault_path({"DC_BROKER_VAULT": "/x/v.db", "XDG_DATA_HOME": "/data"}) == "/x/v.db"


# ------------------------------------------------------------------ as a session's SecretStore


async def test_sessions_store_and_restore_through_the_vault(vault: Vault, make_idp) -> None:  # type: ignore[no-untyped-def]
    idp = make_idp()
    vault.set_credentials("demo", CREDENTIALS["demo"])

    def session() -> Session:
        return Session(profile("demo"), vault, idp_transport(idp), rng=random.Random(1), wall_clock=trio_wall_clock)

    first = session()
    async with running(first.run):
        token = await first.get(min_ttl=60)
    saved = vault.saved_tokens("demo")
    assert saved is not None and saved.access_token == token.access_token
    restored = session()  # a restart: serves at once from the vault
    assert restored.state is State.FRESH
    assert restored.token is not None and restored.token.access_token == token.access_token


async def test_tokens_are_not_restored_for_a_profile_edited_since(vault: Vault, make_idp) -> None:  # type: ignore[no-untyped-def]
    """`dc-broker set acme username=viewer` (or add --force) must not serve the old user's token."""
    idp = make_idp()
    vault.set_credentials("demo", CREDENTIALS["demo"])
    first = Session(profile("demo"), vault, idp_transport(idp), rng=random.Random(1), wall_clock=trio_wall_clock)
    async with running(first.run):
        token = await first.get(min_ttl=60)
    saved = vault.saved_tokens("demo")
    assert saved is not None and saved.issued_for == profile("demo").login_fingerprint()
    edited = profile("demo", username="viewer")
    assert edited.login_fingerprint() != profile("demo").login_fingerprint()
    again = Session(edited, vault, idp_transport(idp), rng=random.Random(1), wall_clock=trio_wall_clock)
    assert again.token is None and again.state is not State.FRESH
    same = Session(
        profile("demo", allow=("user:etl",)),
        vault,
        idp_transport(idp),
        rng=random.Random(1),
        wall_clock=trio_wall_clock,
    )  # who may use it is not whom the token is for: still restored
    assert same.token is not None and same.token.access_token == token.access_token
