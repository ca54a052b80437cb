"""Allow rules: which callers may use a profile. Pure: rules and an identity in, a yes or no out.

    allow = ["user:etl", "uid:1001", "group:analytics", "gid:2000", "unit:report.service"]

A caller matches a rule when the kernel-reported identity (``dc_broker.identity.Identity``) has that
user name or uid, has that group among its primary and supplementary groups, or runs in that systemd
unit. A profile with no rules is open to every caller that may connect at all in user mode (only our
own uid can) and closed to everyone in system mode (default deny).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from dc_token.errors import ConfigError

KINDS: Final = ("user", "uid", "group", "gid", "unit")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@:-]{0,255}$")


@dataclass(frozen=True, slots=True)
class Rule:
    kind: str
    value: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a caller is, as the kernel says. ``user``/``groups`` names and ``unit`` may be unknown."""

    uid: int
    gid: int
    pid: int
    user: str | None = None
    groups: frozenset[int] = frozenset()
    group_names: frozenset[str] = frozenset()
    unit: str | None = None


def parse_rule(text: str) -> Rule:
    kind, sep, value = text.partition(":")
    if not sep or kind not in KINDS or not value:
        raise ConfigError(f"allow rule {text!r} is not one of {', '.join(k + ':NAME' for k in KINDS)}")
    if kind in ("uid", "gid"):
        if not value.isdigit():
            raise ConfigError(f"allow rule {text!r}: {kind} must be a number")
    elif not _NAME.match(value):
        raise ConfigError(f"allow rule {text!r}: {value!r} is not a valid {kind} name")
    return Rule(kind, value)


def parse_rules(texts: tuple[str, ...]) -> tuple[Rule, ...]:
    return tuple(parse_rule(t) for t in texts)


def matches(rule: Rule, who: Identity) -> bool:
    kind, value = rule.kind, rule.value
    if kind == "uid":
        return who.uid == int(value)
    if kind == "user":
        return who.user == value
    if kind == "gid":
        return int(value) == who.gid or int(value) in who.groups
    if kind == "group":
        return value in who.group_names
    return who.unit == value


def allowed(rules: tuple[Rule, ...], who: Identity, *, default_allow: bool) -> bool:
    if not rules:
        return default_allow
    return any(matches(rule, who) for rule in rules)


def needs_details(rules: tuple[Rule, ...]) -> bool:
    """Whether these rules need more than uid/gid (names, supplementary groups, unit) to decide."""
    return any(rule.kind not in ("uid",) for rule in rules)
