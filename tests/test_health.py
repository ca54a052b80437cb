"""`dc-broker check` and `dc-broker doctor` as an operator runs them (issue 25): the exact output and
exit status in each situation: all fine, the IdP down, the vault locked, no broker running, a socket
with the wrong permissions, a login that ends within --min-ttl. Real processes: the dev IdP,
`dc-broker run` on a keyfile (or passphrase) vault.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from dc_token.version import version
from tests.e2e import DC_BROKER, approve_device, dev_idp_process, device_code, stop, wait_for, wait_for_socket

pytestmark = pytest.mark.e2e

SYSTEMD_OK = "ok    systemd: no dc-broker unit installed (`dc-broker systemd install` makes one)\n"
CLOCK_OK = "ok    clock: in step with the identity provider (within 5 s)\n"


class Home:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("DC_BROKER_")}
        self.sock = str(tmp / "run" / "broker.sock")
        self.env.update(
            XDG_CONFIG_HOME=str(tmp / "config"), XDG_DATA_HOME=str(tmp / "data"), DC_BROKER_SOCKET=self.sock
        )
        self.config = tmp / "config" / "dc-broker" / "config.toml"
        self.vault = tmp / "data" / "dc-broker" / "vault.db"

    def cli(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([DC_BROKER, *args], input=stdin, capture_output=True, text=True, env=self.env, timeout=60)

    def add(self, idp: str, name: str = "acme") -> None:
        added = self.cli(
            "add", name, "--server", idp, "--tenant", "demo", "--client-id", "dc-cli", "--username", "demo",
            "--password-stdin", "--secret-stdin", stdin="demo\ndc-cli-secret\n",
        )  # fmt: skip
        assert added.returncode == 0, added.stderr

    @contextmanager
    def broker(self) -> Iterator[subprocess.Popen[str]]:
        proc = subprocess.Popen(
            [DC_BROKER, "run"], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            wait_for_socket(self.sock, proc)
            yield proc
        finally:
            stop(proc)

    def status(self, name: str) -> dict[str, object]:
        out = self.cli("status", "--json", name)
        assert out.returncode == 0, out.stderr
        entry: dict[str, object] = json.loads(out.stdout)["profiles"][0]
        return entry

    def fine(self, idp: str, *, profile: str = "acme", vault: str = "unlocked") -> str:
        """doctor's lines for a running broker where all is well, up to the profile lines."""
        return (
            f"ok    config: {self.config}: 1 profile(s)\n"
            f"ok    socket: {self.sock} mode 0600, owned by uid {os.getuid()}\n"
            f"ok    broker: dc-broker {version()} answers on {self.sock}\n"
            f"ok    vault: {vault}\n"
        )


@pytest.fixture
def home(tmp_path: Path) -> Home:
    h = Home(tmp_path)
    init = h.cli("init", "--key-source", "keyfile", "--key-file", str(tmp_path / "key"))
    assert init.returncode == 0, init.stderr
    return h


def test_all_fine(home: Home) -> None:
    with dev_idp_process() as (idp, _), home.broker():
        home.add(idp)
        wait_for(lambda: home.status("acme")["state"] == "fresh", 20, "a token for acme")
        check = home.cli("check")
        assert (check.returncode, check.stdout, check.stderr) == (
            0,
            "ok: 1 profile(s) can serve a token with at least 1m00s left\n",
            "",
        )
        named = home.cli("check", "acme", "nope", "--min-ttl", "30")
        assert (named.returncode, named.stdout) == (
            1,
            "FAIL nope: not a profile this broker shows you (`dc-broker status` lists them)\n",
        )
        doctor = home.cli("doctor")
        assert (doctor.returncode, doctor.stderr) == (0, "")
        assert doctor.stdout == (
            home.fine(idp)
            + "ok    profile acme: can serve a token with at least 1m00s left\n"
            + f"ok    idp acme: discovery served by {idp}/auth/realms/demo\n"
            + CLOCK_OK
            + SYSTEMD_OK
            + "doctor: no problems found\n"
        )


def test_no_broker_running(home: Home) -> None:
    with dev_idp_process() as (idp, _):
        home.add(idp)
        check = home.cli("check")
        assert (check.returncode, check.stdout) == (3, "")
        assert check.stderr == (
            f"Error: no dc-broker is running on {home.sock}\n"
            "  start it with `systemctl --user start dc-broker` or `dc-broker run`\n"
        )
        doctor = home.cli("doctor")
        assert doctor.returncode == 1
        assert doctor.stdout == (
            f"ok    config: {home.config}: 1 profile(s)\n"
            f"FAIL  broker: not running (no socket at {home.sock}); the files are checked below\n"
            "      fix: start it: `systemctl --user start dc-broker` (or `dc-broker run`)\n"
            f"ok    vault: {home.vault} opens (key: keyfile)\n"
            f"ok    idp acme: discovery served by {idp}/auth/realms/demo\n"
            + CLOCK_OK
            + SYSTEMD_OK
            + "doctor: 1 problem(s)\n"
        )


def test_wrong_socket_permissions(home: Home) -> None:
    """check answers whether profiles can serve (they can); doctor says who else may connect."""
    with dev_idp_process() as (idp, _), home.broker():
        home.add(idp)
        wait_for(lambda: home.status("acme")["state"] == "fresh", 20, "a token for acme")
        os.chmod(home.sock, 0o666)
        check = home.cli("check")
        assert (check.returncode, check.stdout) == (0, "ok: 1 profile(s) can serve a token with at least 1m00s left\n")
        doctor = home.cli("doctor")
        assert doctor.returncode == 1
        assert doctor.stdout.splitlines()[1:3] == [
            f"FAIL  socket: {home.sock} is mode 0666: any local user may connect to it",
            f"      fix: `chmod 600 {home.sock}` (a restarted broker makes it 0600, or 0660 for the shared "
            "broker's group)",
        ]
        assert doctor.stdout.endswith(SYSTEMD_OK + "doctor: 1 problem(s)\n")
        os.chmod(home.sock, 0o600)
        os.chmod(os.path.dirname(home.sock), 0o777)
        doctor = home.cli("doctor")
        run = os.path.dirname(home.sock)
        assert doctor.stdout.splitlines()[1:3] == [
            f"FAIL  socket: its directory {run} is mode 0777: anyone may replace the socket",
            f"      fix: `chmod 700 {run}`",
        ]
        os.chmod(run, 0o700)


def test_idp_down(home: Home) -> None:
    """The IdP stops: doctor names it at once; check fails once the token cannot last --min-ttl."""
    with dev_idp_process("--access-lifespan", "4") as (idp, idp_proc):
        home.add(idp)
        with home.broker():
            wait_for(lambda: home.status("acme")["state"] == "fresh", 20, "a token for acme")
            idp_proc.terminate()
            idp_proc.wait(10)
            doctor = home.cli("doctor")
            url = f"{idp}/auth/realms/demo/.well-known/openid-configuration"
            assert doctor.returncode == 1
            assert doctor.stdout.endswith(
                f"FAIL  idp acme: cannot reach {url}: connection refused or host unreachable\n"
                "      fix: check that the identity provider is up and the profile's URL is right (`dc-broker set "
                "acme server=...`); behind a proxy, set https_proxy or the profile's proxy\n"
                + SYSTEMD_OK
                + "doctor: 1 problem(s)\n"
            )
            wait_for(lambda: home.status("acme")["state"] in ("stale", "unavailable"), 20, "a failed refresh")
            # the 4 s token may expire while check runs (stale -> unavailable): its line is the one of the
            # state before or after it
            before = home.status("acme")
            check = home.cli("check")
            after = home.status("acme")
            assert check.returncode == 1
            shapes = []
            for entry in (before, after):
                if entry["state"] == "stale":
                    shapes.append(
                        r"FAIL acme: stale: its token has \d+s left, less than 1m00s, and refreshing fails \("
                        + re.escape(str(entry["last_error"]))
                        + r"\)\n"
                    )
                else:
                    shapes.append(re.escape(f"FAIL acme: unavailable (upstream_unavailable): {entry['last_error']}\n"))
            assert any(re.fullmatch(shape, check.stdout) for shape in shapes), (check.stdout, shapes)
            assert str(entry["last_error"]).startswith("profile 'acme': ")


def test_vault_locked(tmp_path: Path) -> None:
    home = Home(tmp_path)
    assert home.cli("init", "--passphrase-stdin", stdin="correct horse\n").returncode == 0
    with dev_idp_process() as (idp, _):
        added = home.cli(
            "add", "acme", "--server", idp, "--tenant", "demo", "--client-id", "dc-cli", "--username", "demo",
            "--password-stdin", "--secret-stdin", stdin="demo\ndc-cli-secret\ncorrect horse\n",
        )  # fmt: skip
        assert added.returncode == 0, added.stderr
        with home.broker():
            check = home.cli("check")
            locked = str(home.status("acme")["last_error"])
            assert (check.returncode, check.stdout) == (1, f"FAIL acme: locked (locked): {locked}\n")
            assert "dc-broker unlock" in locked
            doctor = home.cli("doctor")
            assert doctor.returncode == 1
            assert doctor.stdout == (
                f"ok    config: {home.config}: 1 profile(s)\n"
                f"ok    socket: {home.sock} mode 0600, owned by uid {os.getuid()}\n"
                f"ok    broker: dc-broker {version()} answers on {home.sock}\n"
                "FAIL  vault: locked: no token is served\n"
                "      fix: `dc-broker unlock`\n"
                f"FAIL  profile acme: locked (locked): {locked}\n"
                "      fix: `dc-broker unlock`\n"
                f"ok    idp acme: discovery served by {idp}/auth/realms/demo\n"
                + CLOCK_OK
                + SYSTEMD_OK
                + "doctor: 2 problem(s)\n"
            )


@pytest.mark.slow
def test_a_login_that_ends_within_min_ttl(home: Home) -> None:
    """A device login at an IdP whose SSO Session Max is 26 s (idle 20 s, tokens of 4 s): once a
    refresh no longer moves its deadline (the session sees its refresh tokens' lives shrink), the end
    is known, and check fails naming it."""
    with dev_idp_process("--access-lifespan", "4", "--sso-idle", "20", "--sso-max", "26") as (idp, _):
        added = home.cli(
            "add", "dev", "--server", idp, "--tenant", "demo", "--client-id", "dc-public", "--grant", "device",
            "--no-verify",
        )  # fmt: skip
        assert added.returncode == 0, added.stderr
        with home.broker():
            login = subprocess.Popen(
                [DC_BROKER, "login", "dev"], env=home.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            approve_device(idp, device_code(login))
            assert login.wait(30) == 0
            assert home.cli("check", "--min-ttl", "1").returncode == 0
            entry = wait_for(
                lambda: (e := home.status("dev"))["login_end_final"] and e, 25, "the session maximum to show"
            )
            check = home.cli("check", "--min-ttl", "60")
            doctor = home.cli("doctor", "--min-ttl", "60")
            assert entry["login_ends_in"] < 26  # type: ignore[operator]
            assert check.returncode == 1
            assert re.fullmatch(
                r"FAIL dev: its login ends in \d+s \(the identity provider's session maximum\), within 1m00s: run "
                r"`dc-broker login dev` before then\n",
                check.stdout,
            ), check.stdout
            assert doctor.returncode == 1
            assert re.search(
                r"\nFAIL  profile dev: its login ends in \d+s \(the identity provider's session maximum\), within "
                r"1m00s: run `dc-broker login dev` before then\n      fix: `dc-broker login dev`\n",
                doctor.stdout,
            ), doctor.stdout
            status = home.cli("status")
            assert re.search(r"\ndev\s+fresh\s+\S+\s+at \d\d:\d\d ", status.stdout), status.stdout
