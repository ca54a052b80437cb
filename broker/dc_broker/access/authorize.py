"""Who may do what: the one place that decides. A caller may *use* a profile (``authorized``: its
``allow`` rules; in user mode no rules means open, in system mode closed) or *change* its login and
secrets (``administered``: the broker's own uid, root, or the profile's ``admin`` rules).

Unknown and refused profiles get the same answer where the caller is not the owner, and cost the same
work, so neither the reply nor its timing tells a neighbour which profiles exist: every refusal
(system mode's ``authorized``, and ``administered``) reads the caller's identity first (``/proc`` and
the user and group databases, which take milliseconds with LDAP or sssd), as an unknown profile
does, even when the rules decided on the uid alone or there were none; a program's hash, when any
profile pins one, is read before the connection's first decision whatever it is about
(``dc_broker.access.programs``). The identity is read once per connection, so this costs an allowed
caller nothing: system mode reads it for the audit trail anyway.

``exe:`` and ``exe-any-ns:`` rules compare the caller's program with the file at the pinned path as
this process's mount namespace has it (``os.stat``: device and inode); what a connection's rules come
to is kept on its ``Caller`` (its identity does not change while it is connected).

Must never: trust anything the request says about the caller; grant by default in system mode;
refuse a known profile more cheaply than an unknown one.
"""

from __future__ import annotations

import functools
import logging
import os

from dc_broker.access.caller import Caller
from dc_broker.access.rules import FileId, Identity, Rule, allowed, needs_details, parse_rules, pinned_paths
from dc_broker.config import Profile
from dc_broker.sessions.registry import Sessions
from dc_broker.sessions.session import Session
from dc_token.errors import Forbidden, UnknownProfile

log = logging.getLogger("dc_broker")


@functools.lru_cache(maxsize=1024)
def _rules(allow: tuple[str, ...]) -> tuple[Rule, ...]:
    return parse_rules(allow)


def _matches(rules: tuple[Rule, ...], caller: Caller) -> bool:
    if not needs_details(rules):
        return allowed(rules, Identity(caller.uid, caller.gid, caller.pid), default_allow=False)
    decided = caller.decisions.get(id(rules))
    if decided is not None and decided[0] is rules:
        return bool(decided[1])
    files = {path: _file_id(path) for path in pinned_paths(rules)}
    verdict = allowed(rules, caller.identity(), default_allow=False, files=files)
    caller.decisions[id(rules)] = (rules, verdict)
    return verdict


def _file_id(path: str) -> FileId | None:
    """(device, inode) of the file at ``path`` in this process's mount namespace (None: none there)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def permits(caller: Caller, profile: Profile, *, system: bool) -> bool:
    rules = _rules(profile.allow)
    if not rules:
        return not system
    return _matches(rules, caller)


def may_see(caller: Caller, profile: Profile, *, system: bool) -> bool:
    """Whether ``status`` and ``metrics`` show this profile to this caller: one it may use, or one
    it administers (the broker's own uid and root: every profile)."""
    if is_owner(caller) or permits(caller, profile, system=system):
        return True
    rules = _rules(profile.admin)
    return bool(rules) and _matches(rules, caller)


def is_owner(caller: Caller) -> bool:
    """The broker's own uid and root: they may change everything."""
    return caller.uid in (0, os.getuid())


def administered(sessions: Sessions, caller: Caller, name: str) -> Session:
    """The profile's session if this caller may change its stored credentials or its login: the
    broker's own uid, root, or a caller matching the profile's ``admin`` rules. Using a profile
    (``allow``) is not enough. Unknown and refused profiles get the same answer."""
    try:
        session = sessions.lookup(name)
    except UnknownProfile:
        if is_owner(caller):
            raise
        caller.identity()  # as for a known profile's refusal: timing tells nothing
        raise _not_admin(name, caller) from None
    if is_owner(caller):
        return session
    rules = _rules(session.profile.admin)
    # read either way: a refusal costs what an unknown profile's does, even with no admin rules or
    # uid-only ones; an allowed change has the names and unit for the audit trail
    caller.identity()
    if not rules or not _matches(rules, caller):
        raise _not_admin(name, caller)
    log.info("profile %s: login or secrets changed by %s (an admin rule)", name, caller.describe())
    return session


def _not_admin(name: str, caller: Caller) -> Forbidden:
    return Forbidden(
        f"uid {caller.uid} may not change the login or secrets of profile {name!r}: that is for the broker's "
        "own user, root, or a caller the profile's `admin` rules name"
    )


def authorized(sessions: Sessions, caller: Caller, name: str, *, system: bool) -> Session:
    """The profile's session if this caller may use it. In system mode an unknown profile and a
    forbidden one get the same answer, so a caller learns nothing about profiles not meant for it."""
    try:
        session = sessions.lookup(name)
    except UnknownProfile:
        if system:
            caller.identity()  # the work a refused known profile costs, so timing tells nothing either
            raise _denied(name, caller) from None
        raise
    if system:  # read either way (once per connection): a refusal costs what an unknown profile's
        caller.identity()  # does, even where uid rules (or none) decide; an allowed caller is audited by name
    if not permits(caller, session.profile, system=system):
        raise _denied(name, caller)
    return session


def _denied(name: str, caller: Caller) -> Forbidden:
    return Forbidden(f"profile {name!r} is not available to uid {caller.uid}")
