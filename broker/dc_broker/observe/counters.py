"""The broker's counters: plain dicts that the serve path and the sessions increment, read only when
someone asks for metrics (``observe.metrics`` turns them into Prometheus families then).

Why plain dicts and not ``prometheus_client`` objects on the way: a cached token is answered in tens
of microseconds, and a labelled Counter's ``labels(...).inc()`` costs a lock and a lookup of a few
microseconds; a dict increment costs tens of nanoseconds. The exposition is made from these at
scrape time by a custom collector, so the library is imported only by a broker that is scraped.

Labels are closed sets (op names, error codes, reasons named here) or a profile name: never a token,
a user name or a secret.

Pure: no I/O, no clock; the values come from the caller.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Final

from dc_broker.errors import (
    AnswerLost,
    ConfigError,
    IdpMisconfigured,
    MaybeLocked,
    OAuthError,
    UpstreamFault,
    UpstreamGarbage,
    UpstreamTransient,
)
from dc_token.errors import CredentialsRejected, Locked, LoginRequired

#: upper bounds (seconds) of the IdP request latency histogram's buckets; +Inf is implied
LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

#: why a refresh attempt failed (the ``reason`` label of dc_broker_refresh_failures_total)
FAILURE_REASONS: Final = (
    "token_dead",  # the IdP said the refresh token is dead (the attempt falls back to a stored credential)
    "login_required",  # nothing left to log in with: a person must run `dc-broker login`
    "credential_wrong",  # the stored password, secret or key is refused
    "maybe_locked",  # "Invalid user credentials" for a password accepted before (brute-force lock?)
    "misconfigured",  # a client or realm setting at the IdP refuses every request
    "unreachable",  # connect, timeout, 5xx, 429: the IdP is down or slow
    "answer_lost",  # a refresh was sent and its answer never came
    "garbage",  # the IdP answered something that is not a token answer
    "idp_error",  # another OAuth error
    "upstream",  # a scope's parent login could not give a token
)

#: why a caller was refused (the ``reason`` label of dc_broker_refused_callers_total)
REFUSAL_REASONS: Final = (
    "foreign_uid",  # user mode: another uid connected
    "not_allowed",  # the profile's allow rules do not name the caller (or it does not exist for them)
    "not_admin",  # an admin op (login, logout, set_secrets, lock, unlock, reload) by someone else
    "quota",  # a per-uid connection or request quota, or the broker's own limits
)

#: ops that change the broker (their Forbidden is ``not_admin``)
ADMIN_OPS: Final = frozenset({"login", "logout", "set_secrets", "unlock", "lock", "reload"})


#: an attempt's outcome -> its reason label: the first row whose class it is (subclasses before
#: their parents: MaybeLocked is a CredentialsRejected, AnswerLost an UpstreamTransient); a lock is
#: no failure (None)
_REASON_OF: Final[tuple[tuple[type[BaseException], str | None], ...]] = (
    (Locked, None),
    (MaybeLocked, "maybe_locked"),
    (IdpMisconfigured, "misconfigured"),
    (LoginRequired, "login_required"),
    (CredentialsRejected, "credential_wrong"),
    (ConfigError, "credential_wrong"),
    (AnswerLost, "answer_lost"),
    (UpstreamTransient, "unreachable"),
    (UpstreamGarbage, "garbage"),
    (OAuthError, "idp_error"),
    (UpstreamFault, "idp_error"),
)


def failure_reason(outcome: BaseException) -> str | None:
    """The reason label for an attempt that ended with ``outcome``; None for a lock (not a failure)."""
    for kind, reason in _REASON_OF:
        if isinstance(outcome, kind):
            return reason
    return "upstream"


class Latency:
    """One histogram: counts per bucket (not cumulative), the sum and the count."""

    __slots__ = ("buckets", "count", "total")

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1  # the first bound >= seconds; +Inf past all
        self.total += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, count of observations at most le), +Inf last, as the exposition wants them."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, n in zip((*(repr(b) for b in LATENCY_BUCKETS), "+Inf"), self.buckets, strict=True):
            running += n
            out.append((bound, running))
        return out


class Counts:
    """Every counter of one broker. Increments only: a counter never goes down (Prometheus counters),
    and a profile removed at run time keeps its counts until the broker restarts."""

    __slots__ = ("attempts", "errors", "failures", "latency", "ok", "refused", "relogins", "rotations")

    def __init__(self) -> None:
        #: requests answered with a result, by op (a dict keyed by the op's own string: no tuple is
        #: made on the cached-token path)
        self.ok: dict[str, int] = {}
        #: requests answered with an error, by (op, error code)
        self.errors: dict[tuple[str, str], int] = {}
        #: callers refused, by reason (REFUSAL_REASONS)
        self.refused: dict[str, int] = dict.fromkeys(REFUSAL_REASONS, 0)
        #: attempts at the IdP for a token, by profile
        self.attempts: dict[str, int] = {}
        #: failed attempts, by (profile, reason)
        self.failures: dict[tuple[str, str], int] = {}
        #: grants with a stored password or client secret made by the broker itself, by (profile, grant)
        self.relogins: dict[tuple[str, str], int] = {}
        #: refresh tokens the IdP rotated, by profile
        self.rotations: dict[str, int] = {}
        #: IdP request latency, by profile
        self.latency: dict[str, Latency] = {}

    def answered(self, op: str) -> None:
        ok = self.ok
        ok[op] = ok.get(op, 0) + 1

    def failed_request(self, op: str, code: str) -> None:
        key = (op, code)
        self.errors[key] = self.errors.get(key, 0) + 1

    def refusal(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def attempt(self, profile: str) -> None:
        self.attempts[profile] = self.attempts.get(profile, 0) + 1

    def failure(self, profile: str, reason: str) -> None:
        key = (profile, reason)
        self.failures[key] = self.failures.get(key, 0) + 1

    def relogin(self, profile: str, grant: str) -> None:
        key = (profile, grant)
        self.relogins[key] = self.relogins.get(key, 0) + 1

    def rotation(self, profile: str) -> None:
        self.rotations[profile] = self.rotations.get(profile, 0) + 1

    def idp_request(self, profile: str, seconds: float) -> None:
        hist = self.latency.get(profile)
        if hist is None:
            hist = self.latency[profile] = Latency()
        hist.observe(seconds)
