# ruff: noqa: F811 - the home fixture comes from tests.test_cli
"""Editing profiles as a person does: init with no flags, set, add --force, rotate, list --json,
completion, Ctrl-C, config errors at the right line. Real processes, the real dev IdP, exact output."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dc_broker.cli.files import set_
from dc_broker.config import Profile
from dc_broker.config.edit import parse_assignment
from dc_broker.errors import ConfigError
from dc_broker.secret import Secret
from dc_broker.vault import Vault
from tests.e2e import DC_BROKER, DC_TOKEN, dc_token, dev_broker, stop, wait_for_socket
from tests.test_cli import add_demo, cli, home  # noqa: F401 - the home fixture

pytestmark = pytest.mark.e2e


def config_file(tmp: Path) -> Path:
    return tmp / "config" / "dc-broker" / "config.toml"


def init_default_keyfile(env: dict[str, str], tmp: Path) -> Path:
    result = cli(env, "init", "--key-source", "keyfile")
    data = tmp / "data" / "dc-broker"
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"Created the vault {data / 'vault.db'} (keyfile {data / 'vault.key'}). Next: `dc-broker add PROFILE ...`\n"
    )
    return data / "vault.key"


def stored_password(tmp: Path, key: Path, profile: str) -> str | None:
    with Vault.open(str(tmp / "data" / "dc-broker" / "vault.db"), auto_unlock=True) as vault:
        creds = vault.credentials(profile)
    return creds.password.reveal() if creds.password else None


def test_init_keyfile_needs_no_flag_in_a_fresh_home(home: dict[str, str], tmp_path: Path) -> None:
    key = init_default_keyfile(home, tmp_path)
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert oct(key.parent.stat().st_mode & 0o777) == "0o700"
    assert len(key.read_bytes()) == 32


def test_failed_init_leaves_no_key_file(home: dict[str, str], tmp_path: Path) -> None:
    init_default_keyfile(home, tmp_path)
    other_key = tmp_path / "keys" / "second.key"
    again = cli(home, "init", "--key-source", "keyfile", "--key-file", str(other_key))
    assert again.returncode == 2 and "already exists; refusing to overwrite a vault" in again.stderr
    assert not other_key.exists()  # the key it made for the vault it could not create is gone
    assert "Traceback" not in again.stderr


def test_init_creates_missing_parents(home: dict[str, str], tmp_path: Path) -> None:
    vault = tmp_path / "deep" / "er" / "vault.db"
    result = cli(home, "init", "--key-source", "keyfile", "--vault", str(vault))
    assert result.returncode == 0, result.stderr
    assert oct(vault.parent.stat().st_mode & 0o777) == "0o700" and (vault.parent / "vault.key").exists()


def test_set_changes_keys_in_place(idp: str, home: dict[str, str], tmp_path: Path) -> None:
    init_default_keyfile(home, tmp_path)
    assert add_demo(home, idp).returncode == 0
    cfg = config_file(tmp_path)
    cfg.write_text("# my profiles\n" + cfg.read_text().replace("[profiles.acme]", "[profiles.acme]  # the main one"))
    out = cli(home, "set", "acme", "scope=openid email", "legacy-paths=false", "allow=user:etl,group:analytics")
    assert out.returncode == 0, out.stderr
    assert out.stdout == (
        'Updated profile acme: allow = ["user:etl", "group:analytics"], legacy_paths = false, scope = "openid email".\n'
    )
    text = cfg.read_text()
    assert text.startswith("# my profiles\n[profiles.acme]  # the main one\n")
    assert 'scope = "openid email"\n' in text and "legacy_paths = false\n" in text
    assert 'allow = ["user:etl", "group:analytics"]\n' in text
    unset = cli(home, "set", "acme", "scope=")
    assert (unset.returncode, unset.stdout) == (0, "Updated profile acme: scope unset.\n")
    assert "scope" not in cfg.read_text()
    listed = json.loads(cli(home, "list", "--json").stdout)
    assert listed["profiles"][0]["legacy_paths"] is False
    assert listed["profiles"][0]["allow"] == ["user:etl", "group:analytics"]


def test_set_of_a_new_user_or_client_drops_the_old_ones_secrets_from_the_vault(
    idp: str, home: dict[str, str], tmp_path: Path
) -> None:
    """With no broker running, `set` of another username drops the stored password (the old user's)
    from the vault before it writes the config, and another client_id the client secret: the broker,
    at its next start, cannot tell whose they were. A scope change keeps them."""
    key = init_default_keyfile(home, tmp_path)
    assert add_demo(home, idp).returncode == 0
    scoped = cli(home, "set", "acme", "scope=openid")
    assert (scoped.returncode, scoped.stderr) == (0, "")
    assert stored_password(tmp_path, key, "acme") == "demo"
    out = cli(home, "set", "acme", "username=viewer")
    assert out.returncode == 0, out.stderr
    assert out.stdout == 'Updated profile acme: username = "viewer".\n'
    assert out.stderr == (
        "Note: dropped profile acme's stored password from the vault: it was the old user's. Store the new one "
        "with `dc-broker rotate acme`.\n"
    )
    assert stored_password(tmp_path, key, "acme") is None
    with Vault.open(str(tmp_path / "data" / "dc-broker" / "vault.db"), auto_unlock=True) as vault:
        assert vault.credentials("acme").client_secret is not None
    client = cli(home, "set", "acme", "client_id=dc-service")
    assert client.returncode == 0 and "stored client secret from the vault" in client.stderr, client.stderr
    with Vault.open(str(tmp_path / "data" / "dc-broker" / "vault.db"), auto_unlock=True) as vault:
        assert vault.credentials("acme").client_secret is None


def test_set_of_a_new_user_with_a_locked_vault_it_cannot_open_writes_nothing(
    idp: str, home: dict[str, str], tmp_path: Path
) -> None:
    assert cli(home, "init", "--passphrase-stdin", stdin="correct horse\n").returncode == 0
    assert add_demo(home, idp, vault_passphrase="correct horse").returncode == 0
    before = config_file(tmp_path).read_text()
    wrong = cli(home, "set", "acme", "username=viewer", stdin="wrong\n")
    assert wrong.returncode != 0 and "Traceback" not in wrong.stderr
    assert "is unchanged: a new username or client_id" in wrong.stderr, wrong.stderr
    assert config_file(tmp_path).read_text() == before
    with Vault.open(str(tmp_path / "data" / "dc-broker" / "vault.db")) as vault:
        vault.unlock(Secret("correct horse"))
        assert vault.credentials("acme").password == Secret("demo")  # still the user the config names
    right = cli(home, "set", "acme", "username=viewer", stdin="correct horse\n")
    assert right.returncode == 0, right.stderr
    with Vault.open(str(tmp_path / "data" / "dc-broker" / "vault.db")) as vault:
        vault.unlock(Secret("correct horse"))
        assert vault.credentials("acme").password is None


def test_set_help_names_every_key_it_takes() -> None:
    """`dc-broker set --help` lists exactly the profile's settings a KEY=VALUE can change."""
    keys = set(re.split(r"[\s,.]+", (set_.help or "").split("Keys:", 1)[1].split("Other lines", 1)[0])) - {""}
    for key in keys:
        parse_assignment(f"{key}=x" if key != "legacy_paths" else "legacy_paths=true")
    with pytest.raises(ConfigError, match="tables"):
        parse_assignment("sinks=x")
    assert keys == {f.name for f in dataclasses.fields(Profile)} - {"name", "sinks"}


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["acme", "colour=blue"], 2, "Error: unknown profile key 'colour'; keys: admin, allow, assertion_audience,"),
        (["acme", "grant=magic"], 2, "Error: profile 'acme': grant 'magic' is not one of password,"),
        (["acme", "scope"], 2, "Error: 'scope' is not KEY=VALUE; e.g. `scope=openid email`"),
        (["acme", "legacy_paths=maybe"], 2, "Error: legacy_paths must be true or false, not 'maybe'"),
        (["nope", "scope=x"], 4, "Error: no profile named 'nope' in"),
    ],
)
def test_set_refuses_bad_values_and_changes_nothing(
    idp: str, home: dict[str, str], tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    init_default_keyfile(home, tmp_path)
    assert add_demo(home, idp).returncode == 0
    before = config_file(tmp_path).read_text()
    out = cli(home, "set", *args)
    assert out.returncode == code and out.stderr.startswith(message), out.stderr
    assert config_file(tmp_path).read_text() == before


def test_add_force_replaces_after_checking(idp: str, home: dict[str, str], tmp_path: Path) -> None:
    init_default_keyfile(home, tmp_path)
    assert add_demo(home, idp).returncode == 0
    before = config_file(tmp_path).read_text()
    wrong = cli(
        home, "add", "--force", "acme", "--server", idp, "--tenant", "demo", "--client-id", "dc-cli",
        "--username", "viewer", "--password-stdin", "--secret-stdin", stdin="not-it\ndc-cli-secret\n",
    )  # fmt: skip
    assert wrong.returncode == 8 and config_file(tmp_path).read_text() == before  # checked before replaced
    assert stored_password(tmp_path, tmp_path / "data/dc-broker/vault.key", "acme") == "demo"
    out = cli(
        home, "add", "--force", "acme", "--server", idp, "--tenant", "demo", "--client-id", "dc-cli",
        "--username", "viewer", "--allow", "user:etl", "--password-stdin", "--secret-stdin",
        stdin="viewer\ndc-cli-secret\n",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout == (
        f"Replaced profile acme ({idp}/auth/realms/demo/protocol/openid-connect/token); secrets are in the vault. "
        "Next: `dc-broker run` (or `systemctl --user start dc-broker`), then `dc-token acme`\n"
    )
    text = config_file(tmp_path).read_text()
    assert text.count("[profiles.acme]") == 1 and 'username = "viewer"' in text and 'allow = ["user:etl"]' in text
    assert stored_password(tmp_path, tmp_path / "data/dc-broker/vault.key", "acme") == "viewer"


def test_rotate_checks_the_new_password_before_dropping_the_old(idp: str, home: dict[str, str], tmp_path: Path) -> None:
    key = init_default_keyfile(home, tmp_path)
    assert add_demo(home, idp).returncode == 0
    wrong = cli(home, "rotate", "acme", "--password-stdin", stdin="not-the-password\n")
    assert wrong.returncode == 8, wrong.stderr
    assert "not-the-password" not in wrong.stderr + wrong.stdout
    assert stored_password(tmp_path, key, "acme") == "demo"  # nothing changed
    ok = cli(home, "rotate", "acme", "--password-stdin", stdin="demo\n")
    assert (ok.returncode, ok.stdout) == (
        0,
        "Rotated the password of profile acme (checked at the identity provider); stored in the vault.\n",
    )
    secret = cli(home, "rotate", "acme", "--secret-stdin", "--no-verify", stdin="new-secret\n")
    assert secret.stdout == "Rotated the client secret of profile acme (stored without a check); stored in the vault.\n"
    unknown = cli(home, "rotate", "nope")
    assert unknown.returncode == 4 and unknown.stderr.startswith("Error: no profile named 'nope' in")


def test_rotate_through_a_running_broker(idp: str, home: dict[str, str], tmp_path: Path) -> None:
    init_default_keyfile(home, tmp_path)
    assert add_demo(home, idp).returncode == 0
    sock = home["DC_BROKER_SOCKET"]
    daemon = subprocess.Popen([DC_BROKER, "run"], env=home, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_socket(sock, daemon)
        first = dc_token(sock, "acme")
        assert first.returncode == 0, first.stderr
        wrong = cli(home, "rotate", "acme", "--password-stdin", stdin="not-the-password\n")
        assert wrong.returncode == 8 and "refused the password of user 'demo' (HTTP 401" in wrong.stderr, wrong.stderr
        assert dc_token(sock, "acme").stdout == first.stdout  # the working login was not touched
        ok = cli(home, "rotate", "acme", "--password-stdin", stdin="demo\n")
        assert ok.stdout == (
            "Rotated the password of profile acme (checked at the identity provider); the running broker uses it now.\n"
        )
        assert dc_token(sock, "acme").returncode == 0
        # set through the running broker: reloaded at once
        out = cli(home, "set", "acme", "scope=openid")
        assert out.stdout == (
            'Updated profile acme: scope = "openid". The running broker has reloaded it: its next token is got '
            "with these settings.\n"
        )
        unknown = dc_token(sock, "nope")
        assert unknown.returncode == 4  # dc-token's "unknown profile" status is dc-broker's
    finally:
        assert stop(daemon) == 0


def test_list_json_and_names(idp: str, home: dict[str, str], tmp_path: Path) -> None:
    init_default_keyfile(home, tmp_path)
    assert add_demo(home, idp).returncode == 0
    doc = json.loads(cli(home, "list", "--json").stdout)
    assert doc["config"] == str(config_file(tmp_path))
    (profile,) = doc["profiles"]
    assert profile["name"] == "acme" and profile["grant"] == "password" and profile["username"] == "demo"
    assert profile["endpoint"] == f"{idp}/auth/realms/demo/protocol/openid-connect/token"
    assert "dc-cli-secret" not in json.dumps(doc) and "password" not in {k for k, v in profile.items() if v == "demo"}
    assert cli(home, "list", "--names").stdout == "acme\n"


def test_config_error_names_the_line_of_the_bad_value(home: dict[str, str], tmp_path: Path) -> None:
    cfg = config_file(tmp_path)
    cfg.parent.mkdir(parents=True)
    cfg.write_text(
        '[profiles.x]\nserver = "https://sso.example.com"\ntenant = "t"\nclient_id = "c"\ngrant = "pasword"\n'
    )
    out = cli(home, "list")
    assert out.returncode == 2
    assert out.stderr == (
        f"Error: {cfg}:5: profile 'x': grant 'pasword' is not one of password, client_credentials, device, browser\n"
    )


def test_completion_scripts_and_profile_names(idp: str, home: dict[str, str], tmp_path: Path) -> None:
    init_default_keyfile(home, tmp_path)
    assert add_demo(home, idp).returncode == 0
    assert add_demo(home, idp, name="beta").returncode == 0
    for shell, marker in (("bash", "complete -o default -F _dc_token_complete dc-token"), ("zsh", "compdef"),
                          ("fish", "complete -c dc-token")):  # fmt: skip
        script = cli(home, "completion", shell)
        assert script.returncode == 0 and marker in script.stdout and "_DC_BROKER_COMPLETE" in script.stdout
    env = {**home, "_DC_BROKER_COMPLETE": "bash_complete", "COMP_WORDS": "dc-broker remove a", "COMP_CWORD": "2"}
    done = subprocess.run([DC_BROKER], env=env, capture_output=True, text=True, timeout=30)
    assert done.stdout.split() == ["plain,acme"]
    bash = subprocess.run(["bash", "-c", cli(home, "completion", "bash").stdout + "\ncomplete -p dc-broker"],
                          env=home, capture_output=True, text=True)  # fmt: skip
    assert bash.returncode == 0 and "dc-broker" in bash.stdout


def test_dc_token_completes_the_profiles_the_broker_serves(tmp_path: Path) -> None:
    with dev_broker(tmp_path) as (sock, _, _):
        out = subprocess.run(
            [DC_TOKEN, "--complete-profiles"],
            env={**os.environ, "DC_BROKER_SOCKET": sock},
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert out.stdout.split() == ["demo", "demo-device", "demo-service"]
    none = subprocess.run(
        [DC_TOKEN, "--complete-profiles"], env={**os.environ, "DC_BROKER_SOCKET": str(tmp_path / "no.sock")},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert (none.returncode, none.stdout, none.stderr) == (0, "", "")


def test_ctrl_c_during_a_device_login_exits_130(tmp_path: Path) -> None:
    with dev_broker(tmp_path) as (sock, _, _):
        env = {**os.environ, "DC_BROKER_SOCKET": sock}
        login = subprocess.Popen(
            [DC_BROKER, "login", "demo-device"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert login.stdout is not None
        deadline = time.monotonic() + 20
        while "enter the code" not in login.stdout.readline() and time.monotonic() < deadline:
            pass
        login.send_signal(signal.SIGINT)
        assert login.wait(20) == 130
        assert login.stderr is not None
        err = login.stderr.read()
        assert "Traceback" not in err and "left to log in" not in err  # no countdown into a pipe
    assert stop(login) == 130


def test_a_waiting_device_login_shows_the_time_left_on_a_terminal(tmp_path: Path) -> None:
    import pty

    with dev_broker(tmp_path) as (sock, _, _):
        env = {**os.environ, "DC_BROKER_SOCKET": sock}
        master, slave = pty.openpty()
        login = subprocess.Popen(
            [DC_BROKER, "login", "demo-device"], env=env, stdout=subprocess.PIPE, stderr=slave, text=True
        )
        os.close(slave)
        seen = b""
        deadline = time.monotonic() + 20
        try:
            while b"left to log in" not in seen and time.monotonic() < deadline:
                seen += os.read(master, 4096)
        finally:
            login.send_signal(signal.SIGINT)
            try:
                assert login.wait(20) == 130
            except subprocess.TimeoutExpired:  # say where each thread was, for the next time
                where = _threads(login.pid)
                login.kill()
                raise AssertionError(f"Ctrl-C did not end the login: {where}; seen {seen!r}") from None
            finally:
                os.close(master)
    assert re.search(rb"\r  \d+m\d\ds left to log in \(Ctrl-C cancels\)", seen), seen


def _threads(pid: int) -> list[tuple[str, str, str]]:
    """Each thread of ``pid``: its wait channel, its blocked and its pending signals."""
    found = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/wchan") as f:
            wchan = f.read()
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            status = dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
        found.append((wchan, status.get("SigBlk", "?"), status.get("SigPnd", "?")))
    return found
