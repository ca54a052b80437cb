"""Whether a profile can serve: ``dc-broker check``'s one rule, applied to a ``status`` entry.

A profile passes ``check --min-ttl S`` when it can serve a token with at least S seconds left now
and for the next S seconds, as far as the broker knows:

- its state is ``fresh`` (a refresh is not failing), or ``stale`` with its token good for S more;
- and its login does not end within S seconds: a login whose end is known (``login_end_final``: the
  IdP's SSO Session Max holds its refresh token's deadline) needs a person before then;
- and, when ``fresh``, its tokens last at least S: the current one has S left, or a refresh gives
  one that does. What a refresh gives is the lifetime of the token it last received: its time left
  (``expires_in``) plus its age, the time since ``last_refresh`` (wall clock) at ``now``.

Anything else fails with one line saying why and what to do. Pure: a status entry and the time in,
a line out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: what a person does about each state (``{p}`` is the profile)
_ACTIONS = {
    "locked": "the vault is locked: run `dc-broker unlock`",
    "login_required": "run `dc-broker login {p}`",
    "rejected": "the identity provider refuses its credentials: fix them (`dc-broker rotate {p}`), or its client",
    "error": "its session failed inside the broker (restarting); see the broker's log",
    "unavailable": "the identity provider is failing; the broker retries by itself",
    "empty": "it has no token yet",
}


def seconds(value: float) -> str:
    """A duration as ``check`` prints it: ``4m05s``, ``12s``, ``1h02m``."""
    value = max(0, int(value))
    hours, rest = divmod(value, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


#: how to get tokens that last --min-ttl, after "lengthen them ..."
_LONGER = "(Keycloak: Access Token Lifespan) or ask for less (--min-ttl)"


def problem(entry: Mapping[str, Any], min_ttl: float, *, now: float | None = None) -> str | None:
    """Why this profile fails the check (one line, without its name), or None. ``now``: the wall
    clock, to tell a fresh token's lifetime from ``last_refresh`` (without it: its time left only)."""
    name = entry["profile"]
    state = entry["state"]
    error = entry.get("last_error")
    code = entry.get("error_code")
    expires = entry.get("expires_in")
    said = f" ({error})" if error else ""
    if state == "stale":
        if expires is None or expires < min_ttl:
            left = seconds(expires or 0)
            return f"stale: its token has {left} left, less than {seconds(min_ttl)}, and refreshing fails{said}"
    elif state != "fresh":
        if error:  # the broker's own words say what to do; its code, unless the state says it already
            return f"{state}: {error}" if code in (None, state) else f"{state} ({code}): {error}"
        return f"{state}: " + _ACTIONS.get(state, "see `dc-broker status`").format(p=name)
    ends = entry.get("login_ends_in")
    if entry.get("login_end_final") and ends is not None and ends < min_ttl:
        return (
            f"its login ends in {seconds(ends)} (the identity provider's session maximum), within "
            f"{seconds(min_ttl)}: run `dc-broker login {name}` before then"
        )
    if state == "fresh" and expires is not None and expires < min_ttl:
        return _short_lived(expires, entry.get("last_refresh"), min_ttl, now)
    return None


def _short_lived(expires: float, last_refresh: float | None, min_ttl: float, now: float | None) -> str | None:
    """Why a fresh token with ``expires`` left, less than ``min_ttl``, means the profile cannot serve
    min_ttl: a refresh gives what the last one gave (None: that is enough)."""
    if last_refresh is None or now is None:
        return (
            f"its token has {seconds(expires)} left, less than {seconds(min_ttl)}: lengthen the tokens at the "
            f"identity provider {_LONGER}"
        )
    # counted from when the broker sent for it, and a JWT's exp is whole seconds: a second or so
    # under what the identity provider is set to grant
    lifetime = expires + max(0.0, now - last_refresh)
    if lifetime >= min_ttl:
        return None
    return (
        f"its tokens last {seconds(round(lifetime))}, less than {seconds(min_ttl)}: the identity provider grants none "
        f"longer; lengthen them there {_LONGER}"
    )
