"""The broker's metrics in the Prometheus exposition format, made with ``prometheus_client`` at
scrape time from the counters (``observe.counters``) and the sessions' state.

Families (labels in brackets; a profile label is the profile's name, never a token, user or secret):

    dc_broker_token_expires_in_seconds [profile]        gauge: seconds until the current token
                                                        expires (absent: no token)
    dc_broker_login_ends_in_seconds [profile]           gauge: seconds until the login's refresh
                                                        token dies (absent: no deadline)
    dc_broker_profile_state [profile, state]            gauge: 1 for the profile's state, 0 others
    dc_broker_refresh_attempts_total [profile]          counter: attempts at the IdP for a token
    dc_broker_refresh_failures_total [profile, reason]  counter: failed attempts, by reason
                                                        (observe.counters.FAILURE_REASONS)
    dc_broker_relogins_total [profile, grant]           counter: logins with a stored password or
                                                        client secret made by the broker itself
    dc_broker_refresh_token_rotations_total [profile]   counter: refresh tokens the IdP replaced
    dc_broker_idp_request_duration_seconds [profile]    histogram: IdP request latency
    dc_broker_requests_total [op, result]               counter: requests by op; result is ok or
                                                        the error code
    dc_broker_refused_callers_total [reason]            counter: callers refused, by reason
    dc_broker_connections_open                          gauge
    dc_broker_vault_locked                              gauge: 1 locked, 0 open (or no vault)
    dc_broker_profiles                                  gauge
    dc_broker_start_time_seconds                        gauge: unix time the broker started
    dc_broker_build_info [version, mode]                gauge: always 1

Imported only where metrics are served (the ``metrics`` op, the HTTP endpoint): prometheus_client
costs the daemon about 70 ms of start-up otherwise.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from dc_broker.sessions.states import State
from dc_token.version import version

if TYPE_CHECKING:
    from dc_broker.sessions.registry import Sessions

#: the content type of the text format the exposition is in
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATES = tuple(s.value for s in State)


class BrokerCollector(Collector):
    """One scrape's families, read from the sessions and counters as they stand."""

    def __init__(
        self, sessions: Sessions, names: Iterable[str], *, connections: int, system: bool, started_at: float
    ) -> None:
        self.sessions = sessions
        self.names = list(names)
        self.connections = connections
        self.system = system
        self.started_at = started_at

    def collect(self) -> Iterator[Metric]:
        sessions = self.sessions
        counts = sessions.counts
        now = sessions.clock()
        shown = set(self.names)

        expires = GaugeMetricFamily(
            "dc_broker_token_expires_in_seconds",
            "Seconds until the profile's current token expires.",
            labels=["profile"],
        )
        ends = GaugeMetricFamily(
            "dc_broker_login_ends_in_seconds",
            "Seconds until the profile's login (its refresh token) ends.",
            labels=["profile"],
        )
        state = GaugeMetricFamily(
            "dc_broker_profile_state", "1 for the profile's current state.", labels=["profile", "state"]
        )
        for name in self.names:
            session = sessions.lookup(name)
            tok = session.token
            if tok is not None:
                expires.add_metric([name], tok.expires_at - now)
                if tok.refresh_token is not None and tok.refresh_expires_at is not None:
                    ends.add_metric([name], tok.refresh_expires_at - now)
            current = session.effective_state(now).value
            for value in STATES:
                state.add_metric([name, value], 1.0 if value == current else 0.0)
        yield expires
        yield ends
        yield state

        per_profile: tuple[tuple[str, str, list[str], Mapping[Any, int]], ...] = (
            ("dc_broker_refresh_attempts", "Attempts at the identity provider for a token.", [], counts.attempts),
            ("dc_broker_refresh_failures", "Failed attempts for a token, by reason.", ["reason"], counts.failures),
            (
                "dc_broker_relogins",
                "Logins the broker made itself with a stored password or client secret.",
                ["grant"],
                counts.relogins,
            ),
            (
                "dc_broker_refresh_token_rotations",
                "Refresh tokens the identity provider replaced.",
                [],
                counts.rotations,
            ),
        )
        for family, help_text, labels, values in per_profile:
            yield _shown_counter(family, help_text, labels, values, shown)
        latency = HistogramMetricFamily(
            "dc_broker_idp_request_duration_seconds",
            "Identity provider request latency.",
            labels=["profile"],
        )
        for name, hist in sorted(counts.latency.items()):
            if name in shown:
                latency.add_metric([name], hist.cumulative(), sum_value=hist.total)
        yield latency

        requests = CounterMetricFamily(
            "dc_broker_requests", "Requests on the broker's socket, by op and result.", labels=["op", "result"]
        )
        for op, n in sorted(counts.ok.items()):
            requests.add_metric([op, "ok"], n)
        for (op, code), n in sorted(counts.errors.items()):
            requests.add_metric([op, code], n)
        yield requests
        refused = CounterMetricFamily("dc_broker_refused_callers", "Callers refused, by reason.", labels=["reason"])
        for reason, n in sorted(counts.refused.items()):
            refused.add_metric([reason], n)
        yield refused

        yield GaugeMetricFamily("dc_broker_connections_open", "Open connections to the socket.", value=self.connections)
        store = sessions.store
        yield GaugeMetricFamily(
            "dc_broker_vault_locked",
            "1 while the vault is locked.",
            value=1.0 if store.lockable and store.locked else 0.0,
        )
        # the profiles this scrape shows, as `status` counts them: a consumer of a shared broker learns
        # nothing of the profiles not meant for it, their number included
        yield GaugeMetricFamily(
            "dc_broker_profiles", "Profiles configured that this caller may use or administer.", value=len(shown)
        )
        yield GaugeMetricFamily(
            "dc_broker_start_time_seconds", "When the broker started (unix time).", value=self.started_at
        )
        info = GaugeMetricFamily("dc_broker_build_info", "The broker's version and mode.", labels=["version", "mode"])
        info.add_metric([version(), "system" if self.system else "user"], 1.0)
        yield info


def exposition(sessions: Sessions, names: Iterable[str], *, connections: int, system: bool, started_at: float) -> bytes:
    """The text exposition of one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BrokerCollector(sessions, names, connections=connections, system=system, started_at=started_at))
    return generate_latest(registry)


def _shown_counter(
    name: str, help_text: str, labels: list[str], values: Mapping[Any, int], shown: Collection[str]
) -> CounterMetricFamily:
    """A counter family labelled ``profile`` (then ``labels``) from ``values`` (keyed by profile name,
    or by a tuple that starts with it), with only the profiles in ``shown``."""
    family = CounterMetricFamily(name, help_text, labels=["profile", *labels])
    for key, n in sorted(values.items()):
        row = key if isinstance(key, tuple) else (key,)
        if row[0] in shown:
            family.add_metric(list(row), n)
    return family
