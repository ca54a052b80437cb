"""Allow rules: which callers may use a profile. Pure: rules and an identity in, a yes or no out.

    allow = ["user:etl", "uid:1001", "group:analytics", "gid:2000", "unit:report.service",
             "user-unit:alice/sync.service", "exe:/usr/bin/report-runner",
             "exe-any-ns:/usr/bin/report-runner", "exe-sha256:9f86d0..."]
    admin = ["user:ops"]        # same syntax: who may change the profile's login (``dc_broker.access.authorize``)

A caller matches a rule when the kernel-reported identity (``Identity`` below, read by
``dc_broker.access.identity``) has that user name or uid, has that group among its primary and
supplementary groups, runs in that systemd unit, or runs that program:

- ``unit:NAME`` is a *system* unit: the first unit in the caller's cgroup path below the slices, as
  systemd itself assigns it (``/system.slice/report.service/...``). A process in a user manager's tree
  (``.../user@1000.service/app.slice/report.service``, what ``systemd-run --user`` makes without root)
  is in the system unit ``user@1000.service``, never in ``report.service``; a cgroup that a delegated
  unit creates below itself does not change its unit either.
- ``user-unit:OWNER/NAME`` is a unit of a user manager (``systemctl --user``): the unit below
  ``user@UID.service``, and only when the manager's UID is the caller's uid and is OWNER (a user name
  or a uid). Another user's manager, or a process of another uid inside it, never matches.
- ``exe:/ABS/PATH`` is the *file* at that path as the broker's own mount namespace names it: the
  caller's running program (``/proc/PID/exe``, opened by the broker) must be that file (the same
  device and inode), and the caller must be in the broker's mount namespace or the host's (pid 1's,
  where the broker may read it: under the system unit the broker has a namespace of its own, whose
  ``/usr`` is the host's files). A path compared as text is what the caller's namespace calls it: a
  bind mount of another program over the pinned path in ``unshare -Urm`` met such a rule.
  ``exe-any-ns:/ABS/PATH`` is the same file from any mount namespace (a container that bind-mounts
  it). A binary replaced on disk after start is another inode, so it does not count.
  ``exe-sha256:HEX`` is the SHA-256 of the running program's content (hashed off the event loop,
  ``dc_broker.access.programs``). An interpreter names every script it runs:
  ``exe:/usr/bin/python3`` admits every Python program, so pin compiled programs (or a dedicated
  interpreter copy) only.

Rules are alternatives: a caller matching any one is allowed. Conditions joined by `` & `` in one rule
must all hold: ``"user:etl & exe:/usr/bin/report-runner"`` is etl's report-runner only, neither other
programs of etl nor report-runner run by anyone else.

A profile with no rules is open to every caller that may connect at all in user mode (only our own
uid can) and closed to everyone in system mode (default deny).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from dc_broker.errors import ConfigError

KINDS: Final = ("user", "uid", "group", "gid", "unit", "user-unit", "exe", "exe-any-ns", "exe-sha256")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@:-]{0,255}$")
_OWNER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: the rule kinds that need the caller's program (``/proc/PID/exe``) and its content hash
EXE_KINDS: Final = frozenset({"exe", "exe-any-ns", "exe-sha256"})
#: the rule kinds whose value is a path to compare as a file (device, inode)
FILE_KINDS: Final = frozenset({"exe", "exe-any-ns"})

#: a file as the kernel tells it apart: (device, inode)
FileId = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Rule:
    """One condition (``kind:value``), or with kind ``all`` the conditions in ``parts``, all required."""

    kind: str
    value: str
    parts: tuple[Rule, ...] = ()

    def __str__(self) -> str:
        return " & ".join(str(p) for p in self.parts) if self.kind == ALL else f"{self.kind}:{self.value}"


ALL: Final = "all"
_AND: Final = " & "


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a caller is, as the kernel says. Names, units and the program may be unknown (None).

    ``unit`` is the system unit; ``user_unit`` a user manager's unit, and ``user_unit_uid`` the uid
    of that manager (from ``user@UID.service``). ``exe`` is the program's path (for messages: never
    compared), ``exe_file`` the program's (device, inode) as the broker sees it, ``own_mount_ns``
    whether the caller is in the broker's or the host's mount namespace (``exe:`` rules need it),
    ``exe_sha256`` the program's content hash (once it is known: ``dc_broker.access.programs``)."""

    uid: int
    gid: int
    pid: int
    user: str | None = None
    groups: frozenset[int] = frozenset()
    group_names: frozenset[str] = frozenset()
    unit: str | None = None
    user_unit: str | None = None
    user_unit_uid: int | None = None
    exe: str | None = None
    exe_file: FileId | None = None
    #: the program's (device, inode, size, mtime_ns, ctime_ns): what its content hash is cached by
    exe_stamp: tuple[int, int, int, int, int] | None = None
    own_mount_ns: bool = False
    exe_sha256: str | None = None


def parse_rule(text: str) -> Rule:
    if _AND in text:
        parts = tuple(_parse_one(part.strip()) for part in text.split(_AND))
        return Rule(ALL, text, parts)
    return _parse_one(text)


def _parse_one(text: str) -> Rule:
    kind, sep, value = text.partition(":")
    if not sep or kind not in KINDS or not value:
        raise ConfigError(
            f"allow rule {text!r} is not one of {', '.join(k + ':' + _FORMS.get(k, 'NAME') for k in KINDS)}"
        )
    if kind in ("uid", "gid"):
        if not value.isdigit():
            raise ConfigError(f"allow rule {text!r}: {kind} must be a number")
    elif kind == "user-unit":
        owner, slash, unit = value.partition("/")
        if not slash or not _OWNER.match(owner) or not _NAME.match(unit):
            raise ConfigError(f"allow rule {text!r}: write user-unit:OWNER/UNIT, e.g. user-unit:alice/sync.service")
    elif kind in FILE_KINDS:
        if not value.startswith("/") or "\x00" in value or len(value) > 4096:
            raise ConfigError(
                f"allow rule {text!r}: {kind} needs the program's absolute path, e.g. {kind}:/usr/bin/app"
            )
    elif kind == "exe-sha256":
        if not _SHA256.match(value):
            raise ConfigError(f"allow rule {text!r}: exe-sha256 needs 64 lower-case hex digits (`sha256sum PROGRAM`)")
    elif not _NAME.match(value):
        raise ConfigError(f"allow rule {text!r}: {value!r} is not a valid {kind} name")
    return Rule(kind, value)


_FORMS: Final = {
    "uid": "N",
    "gid": "N",
    "user-unit": "OWNER/UNIT",
    "exe": "/PATH",
    "exe-any-ns": "/PATH",
    "exe-sha256": "HEX",
}


def parse_rules(texts: tuple[str, ...]) -> tuple[Rule, ...]:
    return tuple(parse_rule(t) for t in texts)


def _user_unit_matches(value: str, who: Identity) -> bool:
    owner, _, unit = value.partition("/")
    if who.user_unit != unit or who.user_unit_uid is None or who.user_unit_uid != who.uid:
        return False  # a user unit counts only inside the caller's own manager
    return who.uid == int(owner) if owner.isdigit() else who.user == owner


def matches(rule: Rule, who: Identity, files: Mapping[str, FileId | None] | None = None) -> bool:
    """Whether ``who`` meets ``rule``. ``files``: the (device, inode) of each path an ``exe`` or
    ``exe-any-ns`` rule names, as the broker's namespace has them (``pinned_paths``; None or absent:
    no such file, and the rule does not match)."""
    kind, value = rule.kind, rule.value
    if kind == ALL:
        return all(matches(part, who, files) for part in rule.parts)
    if kind == "uid":
        return who.uid == int(value)
    if kind == "user":
        return who.user == value
    if kind == "gid":
        return int(value) == who.gid or int(value) in who.groups
    if kind == "group":
        return value in who.group_names
    if kind == "unit":
        return who.unit == value
    if kind == "user-unit":
        return _user_unit_matches(value, who)
    if kind in FILE_KINDS:
        pinned = None if files is None else files.get(value)
        return pinned is not None and who.exe_file == pinned and (who.own_mount_ns or kind == "exe-any-ns")
    return who.exe_sha256 is not None and who.exe_sha256 == value


def allowed(
    rules: tuple[Rule, ...], who: Identity, *, default_allow: bool, files: Mapping[str, FileId | None] | None = None
) -> bool:
    if not rules:
        return default_allow
    return any(matches(rule, who, files) for rule in rules)


def pinned_paths(rules: tuple[Rule, ...]) -> frozenset[str]:
    """The paths these rules compare the caller's program with, as files (``exe``, ``exe-any-ns``)."""
    found: set[str] = set()
    for rule in rules:
        if rule.kind == ALL:
            found |= pinned_paths(rule.parts)
        elif rule.kind in FILE_KINDS:
            found.add(rule.value)
    return frozenset(found)


def needs_details(rules: tuple[Rule, ...]) -> bool:
    """Whether these rules need more than uid/gid (names, supplementary groups, unit) to decide."""
    return any(rule.kind != "uid" if rule.kind != ALL else needs_details(rule.parts) for rule in rules)


def needs_exe_hash(rules: tuple[Rule, ...]) -> bool:
    """Whether these rules need the content hash of the caller's program (costly: read once)."""
    return any(rule.kind == "exe-sha256" or needs_exe_hash(rule.parts) for rule in rules)
