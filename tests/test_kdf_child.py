"""A production Argon2id runs in a child process: the same key as in the broker's own process, the
passphrase never on a command line, a failure a clear VaultError."""

from __future__ import annotations

import subprocess

import pytest

from dc_broker.errors import VaultError
from dc_broker.secret import Secret
from dc_broker.vault import keysource
from dc_broker.vault.keysource import KdfParams, derive_kek

PARAMS = KdfParams(memory_kib=keysource.CHILD_FROM_KIB, iterations=1, lanes=1)


def test_the_child_derives_the_same_key_and_never_sees_the_passphrase_in_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    real = subprocess.run

    def watched(args: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
        seen.append(list(args))
        return real(args, **kw)  # type: ignore[call-overload, no-any-return]

    monkeypatch.setattr(subprocess, "run", watched)
    secret = Secret("a passphrase 8c2e")
    key = derive_kek(secret, b"s" * 16, PARAMS)
    assert len(seen) == 1 and not any("8c2e" in a for a in seen[0])
    assert key == derive_kek(secret, b"s" * 16, PARAMS, in_process=True)
    small = KdfParams(memory_kib=8 * 1024, iterations=1, lanes=1)
    derive_kek(secret, b"s" * 16, small)  # small: in this process
    assert len(seen) == 1


def test_a_child_that_fails_is_a_vault_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keysource, "_CHILD", "raise SystemExit('no argon2 here')")
    with pytest.raises(VaultError, match=r"could not derive the vault key .*no argon2 here"):
        derive_kek(Secret("pw"), b"s" * 16, PARAMS)
