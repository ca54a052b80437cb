"""The shared system broker under a real systemd, as docs/systemd.md tells an admin to set it up:
``dc-broker systemd install --system``, sysusers, the vault created as the service user with its key
as an encrypted credential (``LoadCredentialEncrypted=``), socket activation, per-user allow rules,
and the unit's hardening proven from inside the running unit.

One container for the module; the tests run in order (the broker of the first is used by the rest).
"""

from __future__ import annotations

import json
import time

import pytest

from tests.systemd import harness
from tests.systemd.harness import VENV, Machine

pytestmark = pytest.mark.systemd

SOCK = "/run/dc-broker/broker.sock"
CRED = "/etc/dc-broker/vault-key.cred"
CONFIG = "/etc/dc-broker/config.toml"
PROBE = "/opt/dc-tests/probe.py"
#: the profiles and who may use them (default deny in system mode)
PROFILES = {"etl_api": "user:etl", "ana_api": "user:ana", "report_api": "unit:report.service"}


def _config(idp: str) -> str:
    text = "[daemon]\n"
    for name, rule in PROFILES.items():
        text += f'\n[profiles.{name}]\nserver = "{idp}"\ntenant = "demo"\nclient_id = "dc-service"\n'
        text += f'grant = "client_credentials"\nallow = ["{rule}"]\n'
    return text


def _token(m: Machine, user: str, profile: str) -> tuple[int, str, str]:
    done = m.run("dc-token", profile, user=user, env={"DC_BROKER_SOCKET": SOCK}, check=False)
    return done.returncode, done.stdout.strip(), done.stderr.strip()


@pytest.fixture(scope="module")
def broker(machine: Machine) -> str:
    """The system install, step by step as docs/systemd.md says; returns the dev IdP's URL."""
    m = machine
    idp = m.start_idp()
    out = m.run("dc-broker", "systemd", "install", "--system").stdout
    assert f"ExecStart={VENV}/bin/dc-broker run --system" in m.read("/etc/systemd/system/dc-broker.service")
    assert "warning" not in out
    m.run("systemd-sysusers")
    assert m.run("getent", "passwd", "dc-broker").stdout.startswith("dc-broker:x:")
    # the vault key: 32 random bytes, encrypted with the host key (no TPM in the container), then shredded
    m.sh(
        "mkdir -p /etc/dc-broker && umask 077 && head -c 32 /dev/urandom > /root/vault.key"
        f" && systemd-creds encrypt --with-key=host --name=vault-key /root/vault.key {CRED}"
        " && shred -u /root/vault.key"
    )
    # the vault, created by the service user with the credential, as the service will see it
    out = m.run(
        "systemd-run",
        "--wait",
        "--pipe",
        "--collect",
        "-q",
        "-p",
        "User=dc-broker",
        "-p",
        "StateDirectory=dc-broker",
        "-p",
        "StateDirectoryMode=0700",
        "-p",
        f"LoadCredentialEncrypted=vault-key:{CRED}",
        "-E",
        "DC_BROKER_VAULT=/var/lib/dc-broker/vault.db",
        f"{VENV}/bin/dc-broker",
        "init",
        "--key-source",
        "systemd-credential",
    ).stdout
    assert "Created the vault /var/lib/dc-broker/vault.db (systemd-credential)" in out, out
    # start empty (the natural first step), then give it its profiles and reload
    m.write(CONFIG, "[daemon]\n")
    m.run("systemctl", "daemon-reload")
    m.run("systemctl", "start", "dc-broker.socket")
    assert "0 profile(s)" in m.run("dc-broker", "status", env={"DC_BROKER_SOCKET": SOCK}).stdout + m.show(
        "dc-broker.service", "StatusText"
    )
    m.write(CONFIG, _config(idp))
    m.run("systemctl", "reload", "dc-broker")
    m.wait_until("the reloaded profiles", lambda: "3 profile(s)" in m.show("dc-broker.service", "StatusText"), 15)
    # the client secret goes to the running broker over its socket (what `dc-broker add` does), never argv
    for name in PROFILES:
        m.run(
            f"{VENV}/bin/python",
            "-c",
            "import sys; from dc_broker.cli.talk import ask; "
            f"ask({SOCK!r}, 'set_secrets', profile={name!r}, client_secret=sys.stdin.readline().strip())",
            input="dc-service-secret\n",
        )
    for user in ("etl", "ana"):
        m.add_user(user, groups=["dc-broker"])
    m.add_user("eve")  # not in the socket's group
    return idp


def test_sysusers_credential_and_socket(machine: Machine, broker: str) -> None:
    m = machine
    assert m.show("dc-broker.service", "ActiveState") == "active"
    assert m.show("dc-broker.service", "User") == "dc-broker"
    pid = int(m.show("dc-broker.service", "MainPID"))
    uid = int(m.run("id", "-u", "dc-broker").stdout)
    assert f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}" in m.read(f"/proc/{pid}/status")
    # the key reached the service as a credential: a 0400 file in its private credentials directory
    cred = m.run("stat", "-c", "%a %U", "/run/credentials/dc-broker.service/vault-key").stdout.split()
    assert cred == ["400", "dc-broker"], cred
    assert m.run("stat", "-c", "%a %U %G", SOCK).stdout.split() == ["660", "dc-broker", "dc-broker"]


def test_each_user_gets_only_their_own_profile(machine: Machine, broker: str) -> None:
    m = machine
    for user, own, other in (("etl", "etl_api", "ana_api"), ("ana", "ana_api", "etl_api")):
        rc, token, err = _token(m, user, own)
        assert rc == 0 and token.count(".") == 2, (user, err)
        status = m.sh(
            f'curl -s -o /dev/null -w "%{{http_code}}" -H "Authorization: Bearer {token}" '
            f"{broker}/dp/api/v1/aiconnections/types"
        ).stdout
        assert status == "200"
        rc, token, err = _token(m, user, other)
        assert rc == 9 and not token and f"profile {other!r} is not available to uid" in err, (user, other, rc, err)


def test_a_user_outside_the_group_gets_a_permission_message(machine: Machine, broker: str) -> None:
    rc, token, err = _token(machine, "eve", "etl_api")
    assert rc == 9 and not token, (rc, err)  # the permission exit status, not "no broker" (3)
    assert f"no permission to use the broker socket {SOCK}" in err, err


def test_refusals_reach_the_journal_as_fields(machine: Machine, broker: str) -> None:
    """The broker writes to the journal with the native protocol: a refusal is found by its fields
    (`journalctl EVENT=caller_refused PROFILE=...`), not by a grep over text (issue 25)."""
    m = machine
    rc, _, _ = _token(m, "etl", "ana_api")
    assert rc == 9
    etl = m.uid("etl")

    def entries() -> list[dict[str, str]]:
        out = m.run(
            "journalctl", "-u", "dc-broker.service", "-o", "json", "--no-pager", "EVENT=caller_refused",
            "PROFILE=ana_api", check=False,
        ).stdout  # fmt: skip
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    found = m.wait_until("the refusal in the journal", lambda: [e for e in entries() if e["CALLER_UID"] == str(etl)])
    entry = found[0]  # type: ignore[index]
    assert entry["EVENT"] == "caller_refused" and entry["PROFILE"] == "ana_api" and entry["CALLER_UID"] == str(etl)
    assert entry["CALLER_USER"] == "etl" and entry["REASON"] == "not_allowed" and entry["ERROR_CODE"] == "forbidden"
    assert entry["OP"] == "token" and entry["PRIORITY"] == "4" and entry["LOGGER"] == "dc_broker.audit"
    assert entry["SYSLOG_IDENTIFIER"] == "dc-broker" and "refused uid" in entry["MESSAGE"]
    # the sessions' own lines carry their profile as a field too
    started = m.run(
        "journalctl", "-u", "dc-broker.service", "-o", "json", "--no-pager", "LOGGER=dc_broker", check=False
    ).stdout
    assert any(
        json.loads(line).get("MESSAGE", "").startswith("dc_broker: dc-broker ready") for line in started.splitlines()
    )


def test_unit_rule_is_met_by_a_system_unit(machine: Machine, broker: str) -> None:
    out = machine.run(
        "systemd-run",
        "--unit=report.service",
        "--wait",
        "--pipe",
        "--collect",
        "-q",
        "-p",
        "User=etl",
        "-E",
        f"DC_BROKER_SOCKET={SOCK}",
        f"{VENV}/bin/dc-token",
        "report_api",
    )
    assert out.stdout.strip().count(".") == 2, out.stderr
    # etl itself, outside that unit, may not
    rc, _, err = _token(machine, "etl", "report_api")
    assert rc != 0 and "profile 'report_api' is not available to uid" in err, err


def test_unit_rule_is_not_met_by_a_users_transient_unit_of_that_name(machine: Machine, broker: str) -> None:
    done = machine.run(
        "systemd-run",
        "--user",
        "--unit=report.service",
        "--wait",
        "--pipe",
        "--collect",
        "-q",
        "-E",
        f"DC_BROKER_SOCKET={SOCK}",
        f"{VENV}/bin/dc-token",
        "report_api",
        user="etl",
        check=False,
    )
    assert done.returncode != 0 and not done.stdout.strip(), "a user's own report.service got the token"
    assert "profile 'report_api' is not available to uid" in done.stderr, done.stderr


def test_the_running_daemon_is_confined(machine: Machine, broker: str) -> None:
    """The daemon process itself: no capabilities, no_new_privs, a seccomp filter, not dumpable."""
    m = machine
    pid = int(m.show("dc-broker.service", "MainPID"))
    status = dict(line.split(":\t", 1) for line in m.read(f"/proc/{pid}/status").splitlines() if ":\t" in line)
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[cap], 16) == 0, (cap, status[cap])
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Seccomp"].strip() == "2"  # a filter is installed
    # not dumpable: another process of the same uid may not read its environment or memory
    peek = m.run("runuser", "-u", "dc-broker", "--", "cat", f"/proc/{pid}/environ", check=False)
    assert peek.returncode != 0 and "Permission denied" in peek.stderr, peek


def _probe(m: Machine) -> dict[str, object]:
    """Run tests/systemd/probe.py inside the unit: as ExecStartPost= it shares the service's sandbox
    (mount namespace, seccomp filter, capabilities, user). Its one JSON line lands in the journal."""
    dropin = "/etc/systemd/system/dc-broker.service.d/probe.conf"
    m.write(dropin, f"[Service]\nExecStartPost={VENV}/bin/python {PROBE}\n")
    m.run("systemctl", "daemon-reload")
    m.run("systemctl", "restart", "dc-broker.service")
    m.run("rm", dropin)
    m.run("systemctl", "daemon-reload")

    def line() -> str:
        out = m.run("journalctl", "-u", "dc-broker", "-o", "cat", "--no-pager").stdout
        found = [x for x in out.splitlines() if x.startswith("PROBE ")]
        return found[-1] if found else ""

    text = m.wait_until("the probe's report", line, 15)
    return dict(json.loads(str(text).removeprefix("PROBE ")))


def test_hardening_holds_inside_the_unit(machine: Machine, broker: str) -> None:
    m = machine
    inside = _probe(m)
    # the same probe as the same user outside the unit: what the sandbox takes away
    outside = json.loads(m.run("runuser", "-u", "dc-broker", "--", f"{VENV}/bin/python", PROBE).stdout[6:])
    assert inside["user"] == outside["user"] == "dc-broker"
    assert inside["write_state"] == "ok"  # StateDirectory= is writable
    assert inside["write_opt"] == "EROFS" and inside["write_var_tmp_outside"] == "EROFS"  # ProtectSystem=strict
    assert outside["write_opt"] == "EACCES"  # (outside: only the file mode stops it)
    assert inside["home"] in ("EACCES", []), inside["home"]  # ProtectHome=yes: no home is visible
    assert "etl" in outside["home"]  # type: ignore[operator]
    assert inside["setpriority"] == "EPERM" and outside["setpriority"] == "ok"  # ~@resources in the filter
    assert inside["wx_mmap"] == "EPERM" and outside["wx_mmap"] == "ok"  # MemoryDenyWriteExecute=yes
    assert inside["cap_eff"] == 0 and inside["no_new_privs"] == 1
    assert inside["af_netlink"] == "EAFNOSUPPORT" and outside["af_netlink"] == "ok"  # RestrictAddressFamilies=
    assert "console" in outside["dev"] and "console" not in inside["dev"]  # PrivateDevices=yes
    # and the restarted broker still serves
    rc, token, err = _token(m, "etl", "etl_api")
    assert rc == 0 and token, err


def test_systemd_analyze_security(machine: Machine) -> None:
    out = machine.run("systemd-analyze", "security", "--no-pager", "dc-broker.service", check=False).stdout
    score = harness.exposure(out)
    harness.report.append(f"systemd-analyze security dc-broker.service (system unit, booted): {score}")
    assert score <= 2.0, out


def test_watchdog_restarts_a_stopped_system_daemon(machine: Machine, broker: str) -> None:
    m = machine
    dropin = "/etc/systemd/system/dc-broker.service.d/watchdog.conf"
    m.write(dropin, "[Service]\nWatchdogSec=2\nTimeoutAbortSec=2\n")  # the unit's own is 30 s
    m.run("systemctl", "daemon-reload")
    m.run("systemctl", "restart", "dc-broker.service")
    pid = int(m.show("dc-broker.service", "MainPID"))
    m.run("kill", "-STOP", str(pid))
    m.wait_until("the watchdog's restart", lambda: int(m.show("dc-broker.service", "MainPID")) not in (0, pid), 30)
    journal = m.run("journalctl", "-u", "dc-broker", "-o", "cat", "--no-pager").stdout
    assert "Watchdog timeout" in journal, journal[-2000:]
    m.run("rm", dropin)
    m.run("systemctl", "daemon-reload")
    rc, token, err = _token(m, "ana", "ana_api")
    assert rc == 0 and token, err


def test_root_adds_a_profile_to_the_system_broker(machine: Machine, broker: str) -> None:
    m = machine
    before = m.read(CONFIG)
    before_mode = m.run("stat", "-c", "%a %U:%G", CONFIG).stdout.strip()
    try:
        done = m.run(
            "dc-broker",
            "add",
            "late_api",
            "--config",
            CONFIG,
            "--socket",
            SOCK,
            "--server",
            broker,
            "--tenant",
            "demo",
            "--client-id",
            "dc-service",
            "--grant",
            "client_credentials",
            "--secret-stdin",
            input="dc-service-secret\n",
            check=False,
        )
        assert done.returncode == 0, done.stderr
        mode = m.run("stat", "-c", "%a %U:%G", CONFIG).stdout.strip()
        assert mode == before_mode, (mode, before_mode)  # root's add keeps the file the service reads
        # STATUS= is recomputed on a timer: poll for it
        m.wait_until("4 profiles in STATUS=", lambda: "4 profile(s)" in m.show("dc-broker.service", "StatusText"))
    finally:  # leave the broker as the other tests expect it
        m.write(CONFIG, before)
        m.run("systemctl", "reload", "dc-broker")


def test_plain_load_credential_dropin(machine: Machine, broker: str) -> None:
    """Without systemd-creds: the drop-in of docs/systemd.md, a root-only plain key file."""
    m = machine
    dropin = "/etc/systemd/system/dc-broker.service.d/plain-key.conf"
    m.sh(f"umask 077 && systemd-creds decrypt --name=vault-key {CRED} /etc/dc-broker/vault-key")
    m.write(dropin, "[Service]\nLoadCredentialEncrypted=\nLoadCredential=vault-key:/etc/dc-broker/vault-key\n")
    try:
        m.run("systemctl", "daemon-reload")
        m.run("systemctl", "restart", "dc-broker.service")
        assert "LoadCredential=" in m.run("systemctl", "cat", "dc-broker.service").stdout
        rc, token, err = _token(m, "etl", "etl_api")
        assert rc == 0 and token, err
    finally:
        m.run("rm", "-f", dropin, "/etc/dc-broker/vault-key")
        m.run("systemctl", "daemon-reload")
        m.run("systemctl", "restart", "dc-broker.service")


def test_add_through_a_socket_whose_service_cannot_start(machine: Machine, broker: str) -> None:
    m = machine
    dropin = "/etc/systemd/system/dc-broker.service.d/broken.conf"
    m.run("systemctl", "stop", "dc-broker.service")
    m.write(dropin, "[Service]\nLoadCredentialEncrypted=\nLoadCredential=vault-key:/etc/dc-broker/missing\n")
    m.run("systemctl", "daemon-reload")
    try:
        t0 = time.monotonic()
        done = m.run(
            "dc-broker",
            "add",
            "late_api",
            "--config",
            "/root/unused.toml",
            "--socket",
            SOCK,
            "--server",
            broker,
            "--tenant",
            "demo",
            "--client-id",
            "dc-service",
            "--grant",
            "client_credentials",
            "--secret-stdin",
            "--no-verify",
            input="dc-service-secret\n",
            check=False,
            timeout=90,
        )
        elapsed = time.monotonic() - t0
        # before the fix: 60 s, then a TimeoutError traceback. Now the bounded first wait and what to do:
        assert done.returncode == 3 and "Traceback" not in done.stderr, done.stderr
        assert f"{SOCK} accepted the connection but no broker answered in 15 s" in done.stderr, done.stderr
        assert "systemctl status dc-broker.service" in done.stderr
        assert elapsed < 25, elapsed
        # the socket may be starting the service once more just now (a connection still queued on
        # it): its status names the credential failure once that attempt has failed too
        m.wait_until(
            "the credential failure in the service's status",
            lambda: "243/CREDENTIALS" in m.run("systemctl", "status", "dc-broker.service", check=False).stdout,
            15,
        )
    finally:
        m.run("rm", "-f", dropin)
        m.run("systemctl", "daemon-reload")
        m.run("systemctl", "reset-failed", "dc-broker.service", "dc-broker.socket")
        m.run("systemctl", "start", "dc-broker.socket")
    rc, token, err = _token(m, "ana", "ana_api")
    assert rc == 0 and token, err


def test_only_our_failed_units_are_ours_to_judge_and_they_are_named(machine: Machine) -> None:
    """The container booted with a unit that is not ours failed (the ``machine`` fixture), and every
    test here passed regardless; a failed unit of ours is named, with its status, by the harness."""
    assert harness.UNRELATED in machine.failed_units()
    machine.run("systemd-run", "--unit=dc-broker-doomed", "/bin/sh", "-c", "echo doomed-on-purpose; exit 3")
    machine.wait_until("the doomed unit to fail", lambda: "dc-broker-doomed.service" in machine.failed_units())
    with pytest.raises(AssertionError) as err:
        machine.run("false")
    message = str(err.value)
    assert "failed units: dc-broker-doomed.service" in message and "status=3" in message
    assert harness.UNRELATED not in message  # not ours: never blamed
    machine.run("systemctl", "reset-failed", "dc-broker-doomed.service")


def test_root_running_status_on_the_shared_broker_sees_every_profile(machine: Machine, broker: str) -> None:
    out = machine.run("dc-broker", "status", env={"DC_BROKER_SOCKET": SOCK}).stdout
    for name in PROFILES:
        assert name in out, out


def test_a_consumer_sees_its_own_profiles_in_metrics_check_and_doctor(machine: Machine, broker: str) -> None:
    """What a member of the socket's group sees of the shared broker (issue 25): `dc-broker metrics`
    has its profile only, and counts only that one (`status` does the same); `check` and `doctor`
    check the socket, the broker and that profile, and leave the config, vault and IdPs to the
    broker's owner; each exact."""
    from prometheus_client.parser import text_string_to_metric_families

    m = machine
    env = {"DC_BROKER_SOCKET": SOCK}
    assert _token(m, "etl", "etl_api")[0] == 0
    metrics = m.run("dc-broker", "metrics", user="etl", env=env)
    families = {f.name: f for f in text_string_to_metric_families(metrics.stdout)}
    labelled = {s.labels["profile"] for f in families.values() for s in f.samples if "profile" in s.labels}
    assert labelled == {"etl_api"}, metrics.stdout
    assert [s.value for s in families["dc_broker_profiles"].samples] == [1.0]
    assert "ana_api" not in metrics.stdout and "report_api" not in metrics.stdout
    check = m.run("dc-broker", "check", user="etl", env=env, check=False)
    assert (check.returncode, check.stdout, check.stderr) == (
        0,
        "ok: 1 profile(s) can serve a token with at least 1m00s left\n",
        "",
    )
    owner = m.uid("dc-broker")
    version = m.run("dc-broker", "--version").stdout.split()[-1]
    doctor = m.run("dc-broker", "doctor", user="etl", env=env, check=False)
    assert (doctor.returncode, doctor.stderr) == (0, ""), doctor.stderr
    assert doctor.stdout == (
        "ok    config: /home/etl/.config/dc-broker/config.toml: 0 profile(s)\n"
        f"ok    socket: {SOCK} mode 0660, owned by uid {owner}\n"
        f"ok    broker: dc-broker {version} answers on {SOCK}\n"
        f"ok    access: you use the broker of uid {owner}: its config, vault and IdPs are for its owner to check\n"
        "ok    profile etl_api: can serve a token with at least 1m00s left\n"
        "doctor: no problems found\n"
    )


def test_the_journal_names_the_callers_unit_and_the_logins_generation(machine: Machine, broker: str) -> None:
    """Journal fields beyond the refusal's uid: a refused caller inside a system unit is found by
    CALLER_UNIT, and the broker's own re-logins carry the GENERATION they happened in. (A user of its
    own: refusals are written at most once per caller uid per 10 s, and etl's were just written.)"""
    m = machine
    m.add_user("fin", groups=["dc-broker"])
    refused = m.run(
        "systemd-run", "--unit=report.service", "--wait", "--pipe", "--collect", "-q", "-p", "User=fin",
        "-E", f"DC_BROKER_SOCKET={SOCK}", f"{VENV}/bin/dc-token", "ana_api", check=False,
    )  # fmt: skip
    assert refused.returncode == 9, refused.stderr

    def entries(*match: str) -> list[dict[str, str]]:
        out = m.run("journalctl", "-u", "dc-broker.service", "-o", "json", "--no-pager", *match, check=False).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    found = m.wait_until(
        "fin's refusal from report.service in the journal",
        lambda: entries("EVENT=caller_refused", "CALLER_UNIT=report.service", "CALLER_USER=fin"),
    )
    entry = found[-1]  # type: ignore[index]
    assert (entry["PROFILE"], entry["CALLER_UID"], entry["REASON"]) == ("ana_api", str(m.uid("fin")), "not_allowed")
    relogins = entries("EVENT=relogin", "PROFILE=etl_api")
    assert relogins and all(e["GRANT"] == "client_credentials" and e["GENERATION"].isdigit() for e in relogins)
