"""A session's states and the one table that moves between them: ``(state, event) -> next state``.

Written the way h11's ``_state.py`` is: states and events are small values, the table is plain data,
and ``next_state`` is the only way to move. A pair that is not in the table is a bug in the caller
and raises ``LifecycleError`` naming both.

A state says what the session's login and token *are*, never whether a request is at the IdP: an
attempt in flight is tracked apart from the state (``Session.attempt``, with the generation it
started in), so anything a person does while a refresh is at a slow IdP (lock, unlock, logout, a
finished login, a new secret, a reload) moves the state at once, and the attempt's outcome, if its
generation has moved on, is dropped instead of landing on a state it was not meant for.

    empty ─────────► fresh ◄──────────────┐   an attempt's outcome moves the state
      │                │                  │   (granted / failed_stale / failed / need_login / refused)
      │                ▼                  │
      │              stale ──► unavailable┘   refresh failed; with / without a still-valid token
      ▼
    login_required / rejected / locked        a person must act; no retries until they do
    error                                     the session's task crashed (a bug); it restarts itself

Invariants:

* Background attempts run only in the ``ACTIVE`` states, so an attempt's outcome event (``OUTCOMES``)
  happens only there: every other state is entered by something that bumps the generation (or is
  the outcome itself), which drops the outcome. An outcome event in another state is a bug.
* From any state: an interactive login (``ADOPTED``) makes a session fresh, `dc-broker lock`
  (``LOCK``) locked, `dc-broker logout` (``LOGOUT``) login_required, a still-valid stored token
  (``RESTORED``) fresh, a change of credentials or settings (``RETRY``) takes a session that waits
  for a person back to empty (only ``UNLOCKED`` leaves locked), and a crash of its task
  (``CRASHED``) shows ``error`` (a locked session stays locked).

This module is pure data.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final


class State(StrEnum):
    EMPTY = "empty"
    FRESH = "fresh"
    STALE = "stale"
    UNAVAILABLE = "unavailable"
    LOGIN_REQUIRED = "login_required"
    REJECTED = "rejected"
    LOCKED = "locked"
    ERROR = "error"


class Event(StrEnum):
    GRANTED = "granted"  # an attempt brought a new token
    FAILED_STALE = "failed_stale"  # it failed for now; the current token is still valid
    FAILED = "failed"  # it failed for now; no valid token
    NEED_LOGIN = "need_login"  # no usable credential: a person must log in
    REFUSED = "refused"  # the IdP refuses the credential or the configuration
    RESTORED = "restored"  # a still-valid token came back from the store (start, unlock)
    RETRY = "retry"  # config or secrets changed: try again
    UNLOCKED = "unlocked"  # the vault opened: try again (a stored, still-valid token is RESTORED)
    ADOPTED = "adopted"  # an interactive login (device flow, password login) succeeded
    LOCK = "lock"  # the vault was locked
    LOGOUT = "logout"  # `dc-broker logout`
    CRASHED = "crashed"  # the session's task failed with a bug; its supervisor restarts it


class LifecycleError(AssertionError):
    """An event that cannot happen in this state: a bug in the session, never the IdP's fault."""


S, E = State, Event
#: states in which no background retry happens until a person changes something
WAITING_FOR_PERSON: Final = frozenset({S.LOGIN_REQUIRED, S.REJECTED, S.LOCKED})
#: states in which the background task makes attempts (and so the only ones an outcome lands in)
ACTIVE: Final = frozenset(State) - WAITING_FOR_PERSON
#: what an attempt's outcome makes of an active session
OUTCOMES: Final = {
    E.GRANTED: S.FRESH,
    E.FAILED_STALE: S.STALE,
    E.FAILED: S.UNAVAILABLE,
    E.NEED_LOGIN: S.LOGIN_REQUIRED,
    E.REFUSED: S.REJECTED,
}

TABLE: Final[dict[tuple[State, Event], State]] = {
    # an attempt's outcome, in the states attempts run in
    **{(s, e): to for s in ACTIVE for e, to in OUTCOMES.items()},
    # a person (or the store) changed something: these apply in every state
    **{(s, E.ADOPTED): S.FRESH for s in State},
    **{(s, E.RESTORED): S.FRESH for s in State},
    **{(s, E.LOCK): S.LOCKED for s in State},
    **{(s, E.LOGOUT): S.LOGIN_REQUIRED for s in State},
    # waiting states try again, except that only an unlock leaves locked; the others carry on
    **{(s, E.RETRY): S.EMPTY if s in (S.LOGIN_REQUIRED, S.REJECTED) else s for s in State},
    **{(s, E.UNLOCKED): S.EMPTY if s is S.LOCKED else s for s in State},
    # a crash shows as error, except that a locked session stays locked (nothing is served either way)
    **{(s, E.CRASHED): S.LOCKED if s is S.LOCKED else S.ERROR for s in State},
}


def next_state(state: State, event: Event) -> State:
    """Where ``event`` takes a session in ``state``."""
    try:
        return TABLE[(state, event)]
    except KeyError:
        raise LifecycleError(f"event {event.value!r} cannot happen in state {state.value!r}") from None
