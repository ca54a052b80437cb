"""A session's states and the one table that moves between them: ``(state, event) -> next state``.

Written the way h11's ``_state.py`` is: states and events are small values, the table is plain data,
and ``next_state`` is the only way to move. A pair that is not in the table is a bug in the caller
and raises ``LifecycleError`` naming both.

    empty ──► refreshing ──► fresh ──► refreshing ──► fresh ...
                  │  ▲          ▲          │
                  │  └── stale ◄┼──────────┤  (refresh failed, current token still valid)
                  │  ┌─ unavailable ◄──────┘  (refresh failed, no valid token)
                  ▼  ▼
          login_required / rejected / locked   (a person must act; no retries until they do)

From any state: a person's interactive login (``ADOPTED``) makes a session fresh, `dc-broker lock`
(``LOCK``) locked and `dc-broker logout` (``LOGOUT``) login_required. This module is pure data.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final


class State(StrEnum):
    EMPTY = "empty"
    REFRESHING = "refreshing"
    FRESH = "fresh"
    STALE = "stale"
    UNAVAILABLE = "unavailable"
    LOGIN_REQUIRED = "login_required"
    REJECTED = "rejected"
    LOCKED = "locked"


class Event(StrEnum):
    START = "start"  # the background task begins an attempt at the IdP
    GRANTED = "granted"  # the attempt brought a new token
    FAILED_STALE = "failed_stale"  # it failed for now; the current token is still valid
    FAILED = "failed"  # it failed for now; no valid token
    NEED_LOGIN = "need_login"  # no usable credential: a person must log in
    REFUSED = "refused"  # the IdP refuses the credential or the configuration
    RESTORED = "restored"  # a still-valid token came back from the store (start, unlock)
    RETRY = "retry"  # config or secrets changed, or the vault opened: try again
    ADOPTED = "adopted"  # an interactive login (device flow, password login) succeeded
    LOCK = "lock"  # the vault was locked
    LOGOUT = "logout"  # `dc-broker logout`


class LifecycleError(AssertionError):
    """An event that cannot happen in this state: a bug in the session, never the IdP's fault."""


S, E = State, Event
#: states in which no background retry happens until a person changes something
WAITING_FOR_PERSON: Final = frozenset({S.LOGIN_REQUIRED, S.REJECTED, S.LOCKED})

_OUTCOMES: Final = {
    E.GRANTED: S.FRESH,
    E.FAILED_STALE: S.STALE,
    E.FAILED: S.UNAVAILABLE,
    E.NEED_LOGIN: S.LOGIN_REQUIRED,
    E.REFUSED: S.REJECTED,
    E.LOCK: S.LOCKED,
}

TABLE: Final[dict[tuple[State, Event], State]] = {
    # an attempt starts from any state a background task runs in
    **{(s, E.START): S.REFRESHING for s in (S.EMPTY, S.FRESH, S.STALE, S.UNAVAILABLE)},
    # ... and ends in one of its outcomes
    **{(S.REFRESHING, e): s for e, s in _OUTCOMES.items()},
    # the vault was locked while an attempt was at the IdP: it stays locked, the outcome is dropped
    **{(S.LOCKED, e): S.LOCKED for e in _OUTCOMES},
    # a stale token can expire into unavailability only through another failed attempt
    (S.STALE, E.FAILED): S.UNAVAILABLE,
    # nothing was stored, or the stored token is still valid
    (S.EMPTY, E.NEED_LOGIN): S.LOGIN_REQUIRED,
    **{(s, E.RESTORED): S.FRESH for s in State if s is not S.REFRESHING},
    # a person changed something: waiting states try again, the others carry on as they are
    **{(s, E.RETRY): S.EMPTY for s in WAITING_FOR_PERSON},
    **{(s, E.RETRY): s for s in (S.EMPTY, S.REFRESHING, S.FRESH, S.STALE, S.UNAVAILABLE)},
    # from any state
    **{(s, E.ADOPTED): S.FRESH for s in State},
    **{(s, E.LOCK): S.LOCKED for s in State},
    **{(s, E.LOGOUT): S.LOGIN_REQUIRED for s in State if s is not S.REFRESHING},
    # an attempt waiting for the login lock ends there itself
    (S.REFRESHING, E.LOGOUT): S.REFRESHING,
}


def next_state(state: State, event: Event) -> State:
    """Where ``event`` takes a session in ``state``."""
    try:
        return TABLE[(state, event)]
    except KeyError:
        raise LifecycleError(f"event {event.value!r} cannot happen in state {state.value!r}") from None
