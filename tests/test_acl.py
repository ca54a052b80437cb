"""Allow rules and kernel identity, pure and on this process's own /proc."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import pytest

from dc_broker.access.authorize import administered, authorized, permits
from dc_broker.access.caller import Caller
from dc_broker.access.identity import (
    Units,
    boottime,
    hash_program,
    identify,
    mount_namespaces,
    peer_credentials,
    unit_from_cgroup,
    units_from_cgroup,
)
from dc_broker.access.rules import Identity, allowed, needs_details, needs_exe_hash, parse_rule, parse_rules
from dc_broker.config import Profile
from dc_broker.errors import ConfigError

WHO = Identity(
    uid=1001,
    gid=1001,
    pid=42,
    user="etl",
    groups=frozenset({1001, 2000}),
    group_names=frozenset({"etl", "analytics"}),
    unit="report.service",
)


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("user:etl", True),
        ("user:other", False),
        ("uid:1001", True),
        ("uid:1002", False),
        ("group:analytics", True),
        ("group:wheel", False),
        ("gid:2000", True),
        ("gid:3000", False),
        ("unit:report.service", True),
        ("unit:other.service", False),
    ],
)
def test_each_rule_kind(rule: str, expected: bool) -> None:
    assert allowed((parse_rule(rule),), WHO, default_allow=False) is expected


def test_no_rules_follow_the_mode_default() -> None:
    assert allowed((), WHO, default_allow=True) and not allowed((), WHO, default_allow=False)
    assert allowed(parse_rules(("user:nobody", "group:analytics")), WHO, default_allow=False)


@pytest.mark.parametrize("bad", ["etl", "user:", "host:x", "uid:abc", "user:a b", "gid:-1"])
def test_bad_rules_are_config_errors(bad: str) -> None:
    with pytest.raises(ConfigError, match="allow rule"):
        parse_rule(bad)


@pytest.mark.parametrize(
    ("text", "units"),
    [
        ("0::/system.slice/report.service\n", Units("report.service")),
        # a user manager's unit is not the system unit of that name: the system unit is the manager
        (
            "0::/user.slice/user-1000.slice/user@1000.service/app.slice/report.service\n",
            Units("user@1000.service", "report.service", 1000),
        ),
        (
            "0::/user.slice/user-1000.slice/user@1000.service/init.scope\n",
            Units("user@1000.service", "init.scope", 1000),
        ),
        # a user can name cgroups in its delegated tree after system slices and units: still its manager
        (
            "0::/user.slice/user-1000.slice/user@1000.service/system.slice/report.service\n",
            Units("user@1000.service", "report.service", 1000),
        ),
        # a delegated system unit's own sub-cgroups do not change its unit
        ("0::/system.slice/runner.service/report.service\n", Units("runner.service")),
        ("0::/user.slice/user-1000.slice/session-3.scope\n", Units("session-3.scope")),
        ("0::/etl.slice/report.service\n", Units("report.service")),
        ("9:name=systemd:/system.slice/etl.service\n1:cpu:/\n0::/\n", Units("etl.service")),
        ("0::/user.slice/user-1000.slice/user@1000.service\n", Units("user@1000.service")),
        ("0::/system.slice\n", Units(None)),
        ("0::/\n", Units(None)),
        ("", Units(None)),
    ],
)
def test_units_from_cgroup(text: str, units: Units) -> None:
    assert units_from_cgroup(text) == units
    assert unit_from_cgroup(text) == units.system


def _in_cgroup(path: str, uid: int = 1001, user: str = "etl") -> Identity:
    units = units_from_cgroup(f"0::{path}\n")
    return Identity(
        uid=uid, gid=uid, pid=42, user=user, unit=units.system, user_unit=units.user, user_unit_uid=units.user_uid
    )


def test_a_user_managers_unit_does_not_meet_a_unit_rule() -> None:
    fake = _in_cgroup("/user.slice/user-1001.slice/user@1001.service/app.slice/report.service")
    assert not allowed(parse_rules(("unit:report.service",)), fake, default_allow=False)
    real = _in_cgroup("/system.slice/report.service")
    assert allowed(parse_rules(("unit:report.service",)), real, default_allow=False)


@pytest.mark.parametrize(
    ("rule", "path", "uid", "expected"),
    [
        (
            "user-unit:etl/report.service",
            "/user.slice/user-1001.slice/user@1001.service/app.slice/report.service",
            1001,
            True,
        ),
        (
            "user-unit:1001/report.service",
            "/user.slice/user-1001.slice/user@1001.service/app.slice/report.service",
            1001,
            True,
        ),
        # another user's manager, or another uid inside ours, or a system unit of that name: no
        (
            "user-unit:etl/report.service",
            "/user.slice/user-1002.slice/user@1002.service/app.slice/report.service",
            1001,
            False,
        ),
        (
            "user-unit:etl/report.service",
            "/user.slice/user-1001.slice/user@1001.service/app.slice/report.service",
            1002,
            False,
        ),
        ("user-unit:etl/report.service", "/system.slice/report.service", 1001, False),
        (
            "user-unit:alice/report.service",
            "/user.slice/user-1001.slice/user@1001.service/app.slice/report.service",
            1001,
            False,
        ),
        (
            "user-unit:etl/other.service",
            "/user.slice/user-1001.slice/user@1001.service/app.slice/report.service",
            1001,
            False,
        ),
    ],
)
def test_user_unit_rules_pin_the_uid(rule: str, path: str, uid: int, expected: bool) -> None:
    who = _in_cgroup(path, uid=uid, user="etl" if uid == 1001 else "x")
    assert allowed((parse_rule(rule),), who, default_allow=False) is expected


RUNNER = {"/usr/bin/report-runner": (8, 1234), "/usr/bin/other": (8, 99), "/usr/bin/gone": None}


def test_exe_rules() -> None:
    """exe: is the file (device, inode) at the pinned path as the broker's namespace has it, run from
    the broker's mount namespace; exe-any-ns: the same file from any namespace; the path the caller's
    namespace names its program by counts for nothing."""
    digest = "ab" * 32
    who = Identity(uid=1, gid=1, pid=2, exe="/elsewhere", exe_file=(8, 1234), own_mount_ns=True, exe_sha256=digest)

    def allows(rule: str, caller: Identity = who) -> bool:
        return allowed((parse_rule(rule),), caller, default_allow=False, files=RUNNER)

    assert allows("exe:/usr/bin/report-runner") and allows("exe-any-ns:/usr/bin/report-runner")
    assert not allows("exe:/usr/bin/other") and not allows("exe:/usr/bin/gone") and not allows("exe:/not/pinned")
    assert allows(f"exe-sha256:{digest}")
    assert not allows("exe-sha256:" + "cd" * 32)
    # what `unshare -Urm` + a bind mount over the pinned path gives: the path reads right, the file not
    bound = Identity(uid=1, gid=1, pid=2, exe="/usr/bin/report-runner", exe_file=(8, 555), own_mount_ns=False)
    assert not allows("exe:/usr/bin/report-runner", bound) and not allows("exe-any-ns:/usr/bin/report-runner", bound)
    # the very file, from another mount namespace (a container that bind-mounts it): exe-any-ns only
    contained = Identity(uid=1, gid=1, pid=2, exe="/app/runner", exe_file=(8, 1234), own_mount_ns=False)
    assert not allows("exe:/usr/bin/report-runner", contained)
    assert allows("exe-any-ns:/usr/bin/report-runner", contained)
    unknown = Identity(uid=1, gid=1, pid=2)  # /proc/PID/exe unreadable: exe rules deny
    assert not allowed(
        parse_rules(("exe:/usr/bin/report-runner", f"exe-sha256:{digest}")), unknown, default_allow=False, files=RUNNER
    )


@pytest.mark.parametrize(
    "bad",
    [
        "user-unit:report.service",
        "user-unit:/report.service",
        "user-unit:a b/x.service",
        "exe:relative/path",
        "exe-sha256:abc",
        "exe-sha256:" + "AB" * 32,
    ],
)
def test_bad_new_rules_are_config_errors(bad: str) -> None:
    with pytest.raises(ConfigError, match="allow rule"):
        parse_rule(bad)


def _fake_proc(tmp_path: Path, *, cgroup: str, uid: int, exe: str, start_ticks: int = 0) -> str:
    pid_dir = tmp_path / "proc" / "42"
    pid_dir.mkdir(parents=True)
    fields = ["S"] + ["0"] * 18 + [str(start_ticks)] + ["0"] * 30
    (pid_dir / "stat").write_text("42 (a prog) " + " ".join(fields) + "\n")
    (pid_dir / "status").write_text(f"Name:\ta\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nGroups:\t{uid} 4242\n")
    (pid_dir / "cgroup").write_text(cgroup)
    os.symlink(exe, pid_dir / "exe")
    return str(tmp_path / "proc")


def test_identify_reads_units_and_program_from_proc(tmp_path: Path) -> None:
    prog = tmp_path / "report-runner"
    prog.write_bytes(b"\x7fELF pretend program")
    proc = _fake_proc(
        tmp_path,
        cgroup="0::/user.slice/user-1001.slice/user@1001.service/app.slice/report.service\n",
        uid=1001,
        exe=str(prog),
    )
    who = identify(42, 1001, 1001, accepted_at=boottime(), proc=proc)
    assert (who.unit, who.user_unit, who.user_unit_uid) == ("user@1001.service", "report.service", 1001)
    assert who.exe == str(prog) and 4242 in who.groups
    st = prog.stat()
    assert who.exe_file == (st.st_dev, st.st_ino)
    assert who.exe_stamp == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    assert who.exe_sha256 is None  # hashed apart, off the event loop
    assert hash_program(42, 1001, boottime(), who.exe_stamp, proc=proc) == hashlib.sha256(prog.read_bytes()).hexdigest()
    prog.chmod(0o700)  # a new ctime: not the file the identity was read from any more
    assert hash_program(42, 1001, boottime(), who.exe_stamp, proc=proc) is None


def test_exe_rules_mean_the_brokers_or_the_hosts_mount_namespace(tmp_path: Path) -> None:
    """Under the system unit the broker has a mount namespace of its own (ProtectSystem, PrivateTmp,
    PrivateMounts) that no caller shares; the paths in its rules mean the host's files, so a caller
    in the host's namespace (pid 1's) running the pinned file meets an ``exe:`` rule. A caller in a
    third namespace (a container) meets ``exe-any-ns:`` only."""
    prog = tmp_path / "report-runner"
    prog.write_bytes(b"\x7fELF pretend program")
    proc = _fake_proc(tmp_path, cgroup="0::/system.slice/report.service\n", uid=1001, exe=str(prog))
    for who, ns in (("self", "mnt:[4026532900]"), ("1", "mnt:[4026531841]")):  # the broker's; the host's
        (Path(proc) / who / "ns").mkdir(parents=True)
        os.symlink(ns, Path(proc) / who / "ns" / "mnt")
    assert mount_namespaces(proc) == {"mnt:[4026532900]", "mnt:[4026531841]"}
    (Path(proc) / "42" / "ns").mkdir()
    link = Path(proc) / "42" / "ns" / "mnt"
    st = prog.stat()
    files = {str(prog): (st.st_dev, st.st_ino)}
    rules = {kind: (parse_rule(f"{kind}:{prog}"),) for kind in ("exe", "exe-any-ns")}
    for ns, exe_rule in (("mnt:[4026531841]", True), ("mnt:[4026532900]", True), ("mnt:[4026532777]", False)):
        link.unlink(missing_ok=True)
        os.symlink(ns, link)
        who = identify(42, 1001, 1001, accepted_at=boottime(), proc=proc)
        assert who.exe_file == (st.st_dev, st.st_ino) and who.own_mount_ns is exe_rule, ns
        assert allowed(rules["exe"], who, default_allow=False, files=files) is exe_rule, ns
        assert allowed(rules["exe-any-ns"], who, default_allow=False, files=files), ns
    # pid 1's namespace unreadable (no CAP_SYS_PTRACE): only the broker's own counts
    bare = tmp_path / "bare"
    (bare / "self" / "ns").mkdir(parents=True)
    os.symlink("mnt:[4026532900]", bare / "self" / "ns" / "mnt")
    assert mount_namespaces(str(bare)) == {"mnt:[4026532900]"}


def test_an_exe_rule_is_the_named_file_itself(tmp_path: Path) -> None:
    """Real processes: the program at the pinned path is allowed; a copy of it at another path (the
    same bytes, another inode) is not; nor is the pinned program once the file at the path was
    replaced after it started (it runs a deleted inode). (Device and inode, read through
    /proc/PID/exe, whatever mount namespace the caller names its program in.)"""
    from tests.test_programs import copy_of_sleep, running

    named = copy_of_sleep(tmp_path, "report-runner")
    profile = _profile(allow=(f"exe:{named}",))
    with running(named) as caller:
        assert permits(caller, profile, system=True)
    with running(copy_of_sleep(tmp_path, "copy")) as copy:
        assert copy.identity().exe_file is not None and not permits(copy, profile, system=True)
    with running(named) as old:
        os.replace(copy_of_sleep(tmp_path, "upgrade"), named)  # an upgrade: a new inode at the path
        assert old.identity().exe_file is not None and not permits(old, profile, system=True)
    with running(named) as new:
        assert permits(new, profile, system=True)


def test_a_reused_pid_lends_no_units_or_program(tmp_path: Path) -> None:
    # the process behind the pid started after the connection was accepted (at boot time 1 s)
    proc = _fake_proc(
        tmp_path,
        cgroup="0::/system.slice/report.service\n",
        uid=1001,
        exe="/bin/true",
        start_ticks=int(boottime() * os.sysconf("SC_CLK_TCK")),
    )
    who = identify(42, 1001, 1001, accepted_at=1.0, proc=proc)
    assert who.unit is None and who.exe is None and who.exe_file is None and who.groups == frozenset({1001})
    stamp = os.stat("/bin/true")
    key = (stamp.st_dev, stamp.st_ino, stamp.st_size, stamp.st_mtime_ns, stamp.st_ctime_ns)
    assert hash_program(42, 1001, 1.0, key, proc=proc) is None


def test_a_process_of_another_uid_behind_the_pid_lends_nothing(tmp_path: Path) -> None:
    proc = _fake_proc(tmp_path, cgroup="0::/system.slice/report.service\n", uid=0, exe="/bin/true")
    who = identify(42, 1001, 1001, accepted_at=boottime(), proc=proc)
    assert who.unit is None and who.exe is None


def test_identity_of_a_real_peer() -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    pid, uid, gid = peer_credentials(a)
    assert (pid, uid, gid) == (os.getpid(), os.getuid(), os.getgid())
    who = identify(pid, uid, gid, accepted_at=boottime())
    assert who.uid == os.getuid() and os.getgid() in who.groups and who.user
    a.close()
    b.close()


def test_a_process_younger_than_the_connection_lends_no_groups_or_unit() -> None:
    # as if our pid had been reused after the connection was accepted long ago
    who = identify(os.getpid(), os.getuid(), os.getgid(), accepted_at=0.0)
    assert who.unit is None and who.groups == frozenset({os.getgid()})


def _profile(**rules: tuple[str, ...]) -> Profile:
    return Profile(name="p", client_id="c", grant="client_credentials", token_url="https://idp.example/t", **rules)


def test_allow_rules_narrow_the_per_user_broker_to_one_program() -> None:
    """In the per-user broker a profile without rules is open to all the user's processes; with an
    exe rule only to that program (here: this test's own interpreter, read from /proc/self/exe)."""
    me = Caller(os.getuid(), os.getgid(), os.getpid(), accepted_at=boottime())
    ours = os.path.realpath("/proc/self/exe")
    assert permits(me, _profile(), system=False)
    assert permits(me, _profile(allow=(f"exe:{ours}",)), system=False)
    assert not permits(me, _profile(allow=("exe:/usr/bin/report-runner",)), system=False)
    digest = hashlib.sha256(Path(ours).read_bytes()).hexdigest()
    fresh = Caller(os.getuid(), os.getgid(), os.getpid(), boottime())
    assert not permits(fresh, _profile(allow=(f"exe-sha256:{digest}",)), system=False)  # not hashed yet
    stamp = fresh.identity().exe_stamp
    assert stamp is not None
    fresh.attest(hash_program(os.getpid(), os.getuid(), boottime(), stamp))
    assert permits(fresh, _profile(allow=(f"exe-sha256:{digest}",)), system=False)
    assert not permits(me, _profile(), system=True)  # system mode: no rules, nobody


def test_admin_rules_parse_like_allow_rules() -> None:
    assert _profile(admin=("user:ops", "group:wheel")).admin == ("user:ops", "group:wheel")
    with pytest.raises(ConfigError, match="admin: allow rule"):
        _profile(admin=("ops",))


def test_conditions_joined_by_and_must_all_hold() -> None:
    rule = parse_rule("user:etl & exe:/usr/bin/report-runner")
    assert str(rule) == "user:etl & exe:/usr/bin/report-runner"
    runner = Identity(uid=1001, gid=1001, pid=1, user="etl", exe_file=(8, 1234), own_mount_ns=True)
    assert allowed((rule,), runner, default_allow=False, files=RUNNER)
    python = Identity(uid=1001, gid=1001, pid=1, user="etl", exe_file=(8, 7), own_mount_ns=True)
    assert not allowed((rule,), python, default_allow=False, files=RUNNER)
    other = Identity(uid=1002, gid=1002, pid=1, user="x", exe_file=(8, 1234), own_mount_ns=True)
    assert not allowed((rule,), other, default_allow=False, files=RUNNER)
    assert needs_details((parse_rule("uid:1 & exe:/x"),)) and not needs_details((parse_rule("uid:1 & uid:2"),))
    assert needs_exe_hash((parse_rule("uid:1 & exe-sha256:" + "ab" * 32),))
    with pytest.raises(ConfigError, match="allow rule"):
        parse_rule("user:etl & nonsense")


def test_every_refusal_reads_the_identity_an_unknown_profile_reads() -> None:
    """Timing must not tell profile names apart: an unknown profile reads the caller's identity
    (/proc, and user and group names: milliseconds with LDAP or sssd), so a refused known profile
    does too, also where uid rules alone decided, and so does an admin op on a profile with no
    admin rules (or uid-only ones). The answers are alike but for the name."""
    from dc_broker.idp.transport import IdpTransport
    from dc_broker.sessions.registry import Sessions
    from dc_broker.store import MemoryStore
    from dc_token.errors import Forbidden

    stranger = next(uid for uid in range(4242, 5000) if uid not in (0, os.getuid()))
    profiles = {
        "p_uid": _profile(allow=("uid:1",)),
        "p_closed": _profile(),
        "p_admins": _profile(allow=("uid:1",), admin=("uid:1",)),
    }
    sessions = Sessions(profiles, MemoryStore(), IdpTransport())

    def refusal(decide, name: str) -> str:
        caller = Caller(stranger, stranger, os.getpid(), accepted_at=boottime())
        with pytest.raises(Forbidden) as caught:
            decide(caller, name)
        assert caller.known_identity() is not None, name
        return str(caught.value).replace(repr(name), "P")

    def use(caller: Caller, name: str) -> None:
        authorized(sessions, caller, name, system=True)

    def change(caller: Caller, name: str) -> None:
        administered(sessions, caller, name)

    assert len({refusal(use, name) for name in ("no_such", "p_uid", "p_closed")}) == 1
    assert len({refusal(change, name) for name in ("no_such", "p_uid", "p_admins")}) == 1
