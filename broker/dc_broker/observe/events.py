"""The audit trail: the broker's decisions as named events on their own logger, ``dc_broker.audit``.

A stable interface (docs/operations.md lists every event and its fields): a log shipper or a journal
query may rely on the names below. Each record carries its fields as ``record.fields`` (a dict),
which the journal handler writes as journal fields (upper case: ``EVENT=``, ``PROFILE=``,
``CALLER_UID=``), the JSON formatter as keys, and the plain formatter leaves in the message.

    event                  fields (besides event)                           when
    token_served           profile, caller_*, count, interval               per (profile, caller) per interval
    caller_refused         op, profile?, caller_*, reason, error_code,      each refusal; at most one line
                           suppressed                                       per caller uid per 10 s
    admin_change           op, profile?, caller_*, result, error_code?,     every login, logout, set_secrets,
                           fields?                                          lock, unlock, reload asked
    relogin                profile, grant, generation                       the broker logged in again with
                                                                            a stored password or secret
    refresh_token_rotated  profile, generation                              the IdP replaced a refresh token
    secrets_dropped        profile, dropped, changed, generation            a reload changed the username or
                                                                            client_id: the old one's stored
                                                                            secrets were removed
    vault_locked           by (a caller, or "auto_lock")                    the vault locked
    vault_unlocked         caller_*                                         the vault unlocked
    reload                 source (op, SIGHUP), added, changed, removed     the config was applied again

``caller_*`` is caller_uid, caller_pid and, where the kernel told (system mode, or a rule needed
it), caller_user, caller_unit, caller_exe. Never a token, password, secret or key: only names.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from dc_broker.access.caller import Caller

AUDIT: Final = logging.getLogger("dc_broker.audit")

#: every event name, the stable interface (docs/operations.md)
EVENTS: Final = frozenset(
    {
        "token_served",
        "caller_refused",
        "admin_change",
        "relogin",
        "refresh_token_rotated",
        "secrets_dropped",
        "vault_locked",
        "vault_unlocked",
        "reload",
    }
)

#: one caller_refused line per caller uid per this many seconds; the rest are counted
REFUSAL_LOG_EVERY: Final = 10.0


def caller_fields(caller: Caller) -> dict[str, Any]:
    """The caller as log fields: what the kernel said, never what the client claimed."""
    fields: dict[str, Any] = {"caller_uid": caller.uid, "caller_pid": caller.pid}
    who = caller.known_identity()
    if who is not None:
        if who.user:
            fields["caller_user"] = who.user
        if who.unit or who.user_unit:
            fields["caller_unit"] = who.unit or who.user_unit
        if who.exe:
            fields["caller_exe"] = who.exe
    return fields


def emit(event: str, message: str, *args: object, level: int = logging.INFO, **fields: Any) -> None:
    """One audit record: ``message % args`` for people, ``event`` and ``fields`` for machines."""
    if event not in EVENTS:
        raise ValueError(f"unknown audit event {event!r}")
    if AUDIT.isEnabledFor(level):
        AUDIT.log(level, message, *args, extra={"fields": {"event": event, **fields}})


class RefusalLog:
    """``caller_refused`` lines, at most one per caller uid per ``every`` seconds: a caller that
    retries a refused request in a loop costs a line per period with the count, not a line per try."""

    def __init__(self, clock: Callable[[], float], every: float = REFUSAL_LOG_EVERY) -> None:
        self.clock = clock
        self.every = every
        #: uid -> (when its last line was written, refusals since then not written)
        self._last: dict[int, tuple[float, int]] = {}

    def refused(self, caller: Caller, op: str, profile: str | None, reason: str, code: str, message: str) -> bool:
        """Log this refusal unless its uid had a line within ``every`` s; True if a line was written."""
        now = self.clock()
        last = self._last.get(caller.uid)
        if last is not None and now - last[0] < self.every:
            self._last[caller.uid] = (last[0], last[1] + 1)
            return False
        suppressed = 0 if last is None else last[1]
        self._last[caller.uid] = (now, 0)
        if len(self._last) > 4096:  # uids are the host's; still, never grow without bound
            self._last = {uid: v for uid, v in self._last.items() if now - v[0] < self.every}
        fields = caller_fields(caller)
        more = f" ({suppressed} more refusal(s) of this uid since the last line)" if suppressed else ""
        emit(
            "caller_refused",
            "refused uid %d: %s%s",
            caller.uid,
            message,
            more,
            level=logging.WARNING,
            op=op,
            reason=reason,
            error_code=code,
            suppressed=suppressed,
            **({"profile": profile} if profile else {}),
            **fields,
        )
        return True
