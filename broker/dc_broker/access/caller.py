"""The ``Caller``: who is on the other end of one connection, as the kernel says (SO_PEERCRED, then
/proc when a rule needs more), never as the client claims. The server builds one per connection; the
ops, the authorization and the audit trail read it.

Must never: take anything the client sent as part of its identity; read /proc before a rule (or
system mode's audit trail) needs it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from dc_broker.access.identity import identify
from dc_broker.access.rules import Identity


class Caller:
    """Who is on the other end, as the kernel says (SO_PEERCRED, /proc), never as the client claims.
    The full identity (names, supplementary groups, systemd unit, program) is read once, when a rule
    needs it; the program's content hash once it is known (``attest``, by
    ``dc_broker.access.programs``, off the event loop)."""

    __slots__ = ("_described", "_identity", "accepted_at", "attested", "decisions", "gid", "pid", "uid")

    def __init__(self, uid: int, gid: int, pid: int, accepted_at: float = 0.0) -> None:
        self.uid = uid
        self.gid = gid
        self.pid = pid
        self.accepted_at = accepted_at
        self._identity: Identity | None = None
        self._described: str | None = None
        #: the program's hash is settled (known, or known not to be had)
        self.attested = False
        #: id(rules) -> (rules, decision): what this connection's rules came to (``authorize``)
        self.decisions: dict[int, tuple[Any, bool]] = {}

    def __repr__(self) -> str:
        return f"Caller(uid={self.uid}, gid={self.gid}, pid={self.pid})"

    def identity(self) -> Identity:
        """Read once per connection."""
        who = self._identity
        if who is None:
            who = self._identity = identify(self.pid, self.uid, self.gid, accepted_at=self.accepted_at)
        return who

    def known_identity(self) -> Identity | None:
        """The identity if it was read already (a rule or the audit trail needed it); never reads /proc."""
        return self._identity

    def attest(self, digest: str | None) -> None:
        """The program's content hash is ``digest`` (None: it cannot be had; exe-sha256 rules deny)."""
        self._identity = replace(self.identity(), exe_sha256=digest)
        self.attested = True
        self.decisions.clear()

    def describe(self) -> str:
        """For the audit trail; built once per connection (it is on every token request's path).
        In system mode the identity is read before the first request is served, so it is included."""
        if self._described is None:
            who = self._identity
            if who is None:
                self._described = f"uid {self.uid}"
            else:
                name = f" ({who.user})" if who.user else ""
                unit = f" unit {who.unit}" if who.unit else ""
                self._described = f"uid {self.uid}{name}{unit}"
        return self._described
