"""The per-user broker under a real systemd user manager, as the README and docs/systemd.md tell a
person to run it: the installed wheel in /opt/dc-broker, ``dc-broker systemd install --user``, a
lingering user, socket activation, and the demo API accepting the token.

One container for the module; the tests run in order and build on each other (alice's broker is
first started by the socket, then reloaded, killed, stopped and started again as a service).
"""

from __future__ import annotations

import json
import re
import signal

import pytest

from tests.systemd.harness import VENV, Machine

pytestmark = pytest.mark.systemd

ALICE = "alice"
BOB = "bob"
API = "/dp/api/v1/aiconnections/types"
ADD = ["dc-broker", "add", "demo", "--tenant", "demo", "--client-id", "dc-cli", "--username", "demo"]
ADD += ["--password-stdin", "--secret-stdin"]
SECRETS = "demo\ndc-cli-secret\n"


@pytest.fixture(scope="module")
def idp(machine: Machine) -> str:
    return machine.start_idp()


@pytest.fixture(scope="module")
def alice(machine: Machine) -> str:
    machine.add_user(ALICE)
    return ALICE


def _curl_status(m: Machine, user: str, profile: str, base: str) -> str:
    """The issue's own check: curl with the broker's token, as the user, in one shell line."""
    line = f'curl -s -o /dev/null -w "%{{http_code}}" -H "Authorization: Bearer $(dc-token {profile})" {base}{API}'
    return m.sh(line, user=user).stdout.strip()


def _main_pid(m: Machine, user: str) -> int:
    return int(m.show("dc-broker.service", "MainPID", user=user))


def test_install_units_and_socket_activation(machine: Machine, alice: str, idp: str) -> None:
    m = machine
    out = m.run("dc-broker", "systemd", "install", "--user", user=alice).stdout
    assert f"ExecStart={VENV}/bin/dc-broker run" in m.read(f"/home/{alice}/.config/systemd/user/dc-broker.service")
    assert "systemctl --user" in out
    out = m.run("dc-broker", "init", "--key-source", "keyfile", user=alice).stdout
    assert "Created the vault" in out
    m.run("systemctl", "--user", "daemon-reload", user=alice)
    m.run("systemctl", "--user", "start", "dc-broker.socket", user=alice)
    assert m.show("dc-broker.service", "ActiveState", user=alice) == "inactive"  # nothing runs until a client
    # `add` finds the socket: its hello starts the broker (with no profile yet), then it reloads
    out = m.run(*ADD, "--server", idp, user=alice, input=SECRETS).stdout
    assert "secrets are in the running broker" in out, out
    assert m.show("dc-broker.service", "ActiveState", user=alice) == "active"
    assert _curl_status(m, alice, "demo", idp) == "200"


def test_status_shows_the_status_line(machine: Machine, alice: str) -> None:
    def status_line() -> str:
        out = machine.run("systemctl", "--user", "status", "dc-broker", user=alice, check=False).stdout
        found = re.search(r"Status: \"([^\"]*)\"", out)
        return found.group(1) if found else ""

    line = machine.wait_until("the STATUS= line", lambda: "1 fresh" in status_line() and status_line(), 15)
    assert line == "1 profile(s), 1 fresh; vault unlocked"


def test_reload_picks_up_a_new_profile(machine: Machine, alice: str, idp: str) -> None:
    m = machine
    pid = _main_pid(m, alice)
    config = f"/home/{alice}/.config/dc-broker/config.toml"
    text = m.read(config)
    m.write(
        config,
        text
        + f'\n[profiles.second]\nserver = "{idp}"\ntenant = "demo"\nclient_id = "dc-public"\ngrant = "device"\nauth_method = "none"\n',
    )
    m.run("chown", f"{alice}:{alice}", config)
    m.run("systemctl", "--user", "reload", "dc-broker", user=alice)
    # systemd 252 returns once ExecReload's kill has run (it waits for RELOADING=1 only from 253 on)
    listed = m.wait_until(
        "the reloaded profile", lambda: (out := m.run("dc-broker", "status", user=alice).stdout) * ("second" in out)
    )
    assert "demo" in str(listed), listed
    assert _main_pid(m, alice) == pid  # the same process, not a restart
    assert _curl_status(m, alice, "demo", idp) == "200"  # the unchanged profile kept serving
    journal = m.run(
        "journalctl",
        "_SYSTEMD_USER_UNIT=dc-broker.service",
        f"_UID={m.uid(alice)}",
        "-o",
        "cat",
        "--no-pager",
        check=False,
    ).stdout
    assert "SIGHUP: reloaded" in journal and "added second" in journal, journal[-2000:]


def test_kill_9_is_restarted_and_serves_again(machine: Machine, alice: str, idp: str) -> None:
    m = machine
    pid = _main_pid(m, alice)
    m.run("kill", "-9", str(pid))
    m.wait_until("a restarted broker", lambda: _main_pid(m, alice) not in (0, pid), 20)
    assert int(m.show("dc-broker.service", "NRestarts", user=alice)) >= 1
    assert _curl_status(m, alice, "demo", idp) == "200"


def test_stop_exits_0_and_start_serves_as_a_service(machine: Machine, alice: str, idp: str) -> None:
    m = machine
    m.run("systemctl", "--user", "stop", "dc-broker.service", "dc-broker.socket", user=alice)
    assert m.show("dc-broker.service", "Result", user=alice) == "success"
    assert m.show("dc-broker.service", "ExecMainStatus", user=alice) == "0"
    # `systemctl --user start dc-broker` (the service, not the socket): Requires= brings the socket
    m.run("systemctl", "--user", "start", "dc-broker", user=alice)
    assert m.show("dc-broker.socket", "ActiveState", user=alice) == "active"
    assert _curl_status(m, alice, "demo", idp) == "200"


def _refreshes(m: Machine, user: str, profile: str) -> int:
    out = json.loads(m.run("dc-broker", "status", "--json", user=user).stdout)
    return int(next(p["refreshes"] for p in out["profiles"] if p["profile"] == profile))


def test_stop_loses_no_rotated_refresh_token(machine: Machine, alice: str) -> None:
    """An IdP that rotates refresh tokens (reuse ends the session) and 6 s access tokens: after a
    stop and a start, the next refresh uses the refresh token stored before the stop; a lost one
    would be refused and the broker would fall back to the password (and say so)."""
    m = machine
    rotating = m.start_idp(18081, "--rotate", "--access-lifespan", "6")
    add = ["dc-broker", "add", "rot", "--server", rotating, *ADD[3:]]
    m.run(*add, user=alice, input=SECRETS)
    m.wait_until("two rotations", lambda: _refreshes(m, alice, "rot") >= 3, 40, 0.5)
    m.run("systemctl", "--user", "stop", "dc-broker.service", user=alice)
    assert m.show("dc-broker.service", "ExecMainStatus", user=alice) == "0"
    m.run("systemctl", "--user", "start", "dc-broker.service", user=alice)
    pid = _main_pid(m, alice)
    m.wait_until("a refresh after the restart", lambda: _refreshes(m, alice, "rot") >= 1, 40, 0.5)
    journal = m.run(
        "journalctl", "_SYSTEMD_USER_UNIT=dc-broker.service", f"_PID={pid}", "-o", "cat", "--no-pager"
    ).stdout
    refused = [line for line in journal.splitlines() if "profile rot" in line and "refresh token refused" in line]
    assert not refused, journal
    assert m.run("dc-token", "rot", user=alice).stdout.count(".") == 2


def test_passphrase_vault_and_unlock(machine: Machine, idp: str) -> None:
    m = machine
    m.add_user(BOB)
    m.run("dc-broker", "init", "--passphrase-stdin", user=BOB, input="correct horse\n")
    # no broker yet: add opens the vault itself (the passphrase is the next line of stdin)
    m.run(*ADD, "--server", idp, user=BOB, input=SECRETS + "correct horse\n")
    m.run("dc-broker", "systemd", "install", "--user", user=BOB)
    m.run("systemctl", "--user", "daemon-reload", user=BOB)
    m.run("systemctl", "--user", "start", "dc-broker", user=BOB)
    locked = m.run("dc-token", "demo", user=BOB, check=False)
    assert locked.returncode != 0 and "unlock" in locked.stderr, locked.stderr
    out = m.run("dc-broker", "unlock", "--passphrase-stdin", user=BOB, input="correct horse\n").stdout
    assert "Unlocked" in out
    assert _curl_status(m, BOB, "demo", idp) == "200"


def test_journal_has_priorities(machine: Machine, alice: str) -> None:
    m = machine
    config = f"/home/{alice}/.config/dc-broker/config.toml"
    good = m.read(config)
    m.write(config, good + "\n[profiles.broken\n")
    m.run("systemctl", "--user", "reload", "dc-broker", user=alice)
    m.write(config, good)
    m.run("chown", f"{alice}:{alice}", config)

    def priorities() -> dict[str, set[str]]:
        out = m.run(
            "journalctl",
            "_SYSTEMD_USER_UNIT=dc-broker.service",
            f"_UID={m.uid(alice)}",
            "-o",
            "json",
            "--output-fields=PRIORITY,MESSAGE",
        )
        seen: dict[str, set[str]] = {}
        for line in out.stdout.splitlines():
            entry = __import__("json").loads(line)
            seen.setdefault(str(entry.get("PRIORITY")), set()).add(str(entry.get("MESSAGE")))
        return seen

    seen = m.wait_until("the reload error in the journal", lambda: "3" in priorities() and priorities(), 10)
    assert isinstance(seen, dict)
    assert any("config not reloaded" in msg for msg in seen["3"]), seen  # log.error -> <3>
    assert any("dc-broker ready" in msg for msg in seen["6"]), seen  # log.info -> <6>
    assert not any(msg.startswith("<") for msgs in seen.values() for msg in msgs)  # prefixes became levels


def test_watchdog_restarts_a_stopped_daemon(machine: Machine, alice: str, idp: str) -> None:
    m = machine
    dropin = f"/home/{alice}/.config/systemd/user/dc-broker.service.d/watchdog.conf"
    # the test's only change: a short watchdog (the unit's is 30 s) and a short abort timeout
    m.write(dropin, "[Service]\nWatchdogSec=2\nTimeoutAbortSec=2\n")
    m.run("systemctl", "--user", "daemon-reload", user=alice)
    m.run("systemctl", "--user", "restart", "dc-broker", user=alice)
    pid = _main_pid(m, alice)
    m.run("kill", f"-{signal.SIGSTOP.value}", str(pid))
    m.wait_until("the watchdog's restart", lambda: _main_pid(m, alice) not in (0, pid), 30, 0.2)
    journal = m.run(
        "journalctl", "USER_UNIT=dc-broker.service", "-o", "cat", "--no-pager"
    ).stdout  # the manager's lines
    assert "Watchdog timeout" in journal, journal[-2000:]
    assert _curl_status(m, alice, "demo", idp) == "200"
    m.run("rm", dropin)
    m.run("systemctl", "--user", "daemon-reload", user=alice)
