"""Allow rules and kernel identity, pure and on this process's own /proc."""

from __future__ import annotations

import os
import socket

import pytest

from dc_broker.acl import Identity, allowed, parse_rule, parse_rules
from dc_broker.identity import boottime, identify, peer_credentials, unit_from_cgroup
from dc_token.errors import ConfigError

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
    ("text", "unit"),
    [
        ("0::/system.slice/report.service\n", "report.service"),
        ("0::/user.slice/user-1000.slice/user@1000.service/app.slice/sync.service\n", "sync.service"),
        ("0::/user.slice/user-1000.slice/session-3.scope\n", "session-3.scope"),
        ("0::/user.slice/user-1000.slice/user@1000.service/init.scope\n", "init.scope"),
        ("9:name=systemd:/system.slice/etl.service\n1:cpu:/\n0::/\n", "etl.service"),
        ("0::/\n", None),
        ("", None),
    ],
)
def test_unit_from_cgroup(text: str, unit: str | None) -> None:
    assert unit_from_cgroup(text) == unit


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
