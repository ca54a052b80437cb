"""The pure schedule (``sessions.schedule.Schedule``) and the one flow driver (``sessions.driver``),
each on its own: plain values and an injected clock for the schedule, hand-made flows for the driver.

The schedule's promises are its docstring's invariants and transition table: ``due_at`` never within
``refresh_floor`` of the last attempt; during backoff nothing starts before it ends except a caller's
probe, and never before the IdP's Retry-After; ``retry`` alone forgets failures without a new token;
a stopped schedule plans nothing. The driver's: it performs every step but a person's, hands those
out (``steps``) or refuses them (``drive``: ``TypeError``), and closes the flow whatever happens."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from dc_broker.errors import UpstreamTransient
from dc_broker.idp.oidc import DeviceAuthorization
from dc_broker.secret import Secret
from dc_broker.sessions import driver, policy
from dc_broker.sessions.driver import Done
from dc_broker.sessions.flows import Flow, LoginLost, OpenBrowser, ShowCode, Sleep, Step
from dc_broker.sessions.policy import DEFAULT_POLICY as P
from dc_broker.sessions.policy import RefreshPolicy
from dc_broker.sessions.schedule import Schedule

INF = math.inf

# ---------------------------------------------------------------- the schedule: each transition


def test_a_new_schedule_is_due_at_once_for_anyone() -> None:
    s = Schedule()
    assert s.due_at(P, demanded=False) == -INF and s.due_at(P, demanded=True) == -INF
    assert (s.failures, s.planned_at) == (0, -INF)


def test_granted_plans_the_refresh_and_forgets_every_failure() -> None:
    failing = Schedule().started(100.0).failed(P, now=101.0, rand=0.5, retry_after=30.0)
    s = failing.started(140.0).granted(1000.0)
    assert s == Schedule(planned_at=1000.0, last_attempt_at=140.0)
    assert s.due_at(P, demanded=False) == 1000.0
    # a caller that needs a token (min_ttl) may go before the plan, but not inside the floor
    assert s.due_at(P, demanded=True) == 140.0 + P.refresh_floor


def test_a_failure_backs_off_with_full_jitter_and_counts() -> None:
    s = Schedule().started(100.0).failed(P, now=100.5, rand=0.5, retry_after=None)
    assert (s.failures, s.failed_at, s.told_until) == (1, 100.5, -INF)
    assert s.backoff_until == s.planned_at == pytest.approx(100.5 + 0.5 * P.backoff_base)
    # the n-th failure in a row: uniform(0, base * 2**(n-1)), with the floor
    s = s.started(101.0).failed(P, now=101.2, rand=0.5, retry_after=None)
    assert s.failures == 2 and s.backoff_until == pytest.approx(101.2 + 0.5 * 2 * P.backoff_base)
    s = s.started(102.5).failed(P, now=102.6, rand=0.0, retry_after=None)
    assert s.failures == 3 and s.backoff_until == pytest.approx(102.6 + P.backoff_floor)
    # the last attempt stays what ``started`` said: the floor counts from it, not from the failure
    assert s.last_attempt_at == 102.5


def test_the_idps_retry_after_holds_for_the_backoff_and_for_probes_capped() -> None:
    s = Schedule().started(100.0).failed(P, now=100.0, rand=0.1, retry_after=30.0)
    assert (s.backoff_until, s.told_until) == (130.0, 130.0)
    huge = Schedule().started(100.0).failed(P, now=100.0, rand=0.1, retry_after=10_000.0)
    assert (huge.backoff_until, huge.told_until) == (100.0 + P.backoff_cap, 100.0 + P.backoff_cap)


def test_a_lockouts_wait_is_not_capped_and_holds_probes_off_too() -> None:
    s = Schedule().started(100.0).failed(P, now=100.0, rand=0.9, retry_after=None, wait=900.0)
    assert (s.backoff_until, s.told_until) == (1000.0, 1000.0)  # beyond backoff_cap (300 s)
    assert s.probe_at(P) == 1000.0 and s.due_at(P, demanded=True) == 1000.0
    # a Retry-After shorter than the wait does not shorten it
    both = Schedule().started(100.0).failed(P, now=100.0, rand=0.9, retry_after=20.0, wait=60.0)
    assert (both.backoff_until, both.told_until) == (160.0, 160.0)


def test_during_backoff_only_a_waiting_caller_probes_and_only_after_the_probe_interval() -> None:
    # the 9th failure in a row: a backoff of 0.99 * 256 s
    s = Schedule(failures=8).started(99.0).failed(P, now=100.0, rand=0.99, retry_after=None)
    assert s.backoff_until == pytest.approx(100.0 + 0.99 * 256)
    assert s.due_at(P, demanded=False) == s.backoff_until
    assert s.probe_at(P) == s.due_at(P, demanded=True) == 100.0 + P.demand_probe_interval


def test_probes_honour_the_idps_retry_after() -> None:
    s = Schedule(failures=8).started(99.0).failed(P, now=100.0, rand=0.99, retry_after=30.0)
    assert s.told_until == 130.0 and s.backoff_until > 130.0
    assert s.probe_at(P) == s.due_at(P, demanded=True) == 130.0  # not 105: the IdP said 30 s
    # a told_until later than the backoff's end: the backoff's end is when it is over
    short = dataclasses.replace(s, backoff_until=120.0)
    assert short.probe_at(P) == 120.0


def test_a_backoff_shorter_than_the_probe_interval_ends_first() -> None:
    s = Schedule().started(99.0).failed(P, now=100.0, rand=0.5, retry_after=None)  # 0.5 s
    assert s.probe_at(P) == s.backoff_until == 100.5
    assert s.due_at(P, demanded=True) == max(100.5, 99.0 + P.refresh_floor)


def test_retry_forgets_failures_and_is_due_now_but_keeps_the_floor() -> None:
    failing = Schedule(failures=5).started(100.0).failed(P, now=100.2, rand=0.9, retry_after=60.0)
    s = failing.retry(100.4)
    assert s == Schedule(planned_at=100.4, last_attempt_at=100.0)
    assert s.due_at(P, demanded=False) == s.due_at(P, demanded=True) == 100.0 + P.refresh_floor
    assert failing.retry(150.0).due_at(P, demanded=False) == 150.0


def test_forced_is_due_now_but_keeps_the_backoff_and_the_floor() -> None:
    fresh = Schedule().started(100.0).granted(1000.0)
    assert fresh.forced(100.3).due_at(P, demanded=False) == 100.0 + P.refresh_floor
    assert fresh.forced(200.0).due_at(P, demanded=False) == 200.0
    failing = Schedule().started(100.0).failed(P, now=100.0, rand=0.9, retry_after=120.0)
    forced = failing.forced(105.0)
    assert forced.failures == 1 and forced.due_at(P, demanded=False) == 220.0


def test_a_stopped_schedule_is_never_due_on_its_own() -> None:
    for s in (
        Schedule(),
        Schedule().started(100.0).granted(1000.0),
        Schedule().started(100.0).failed(P, now=100.0, rand=0.5, retry_after=5.0),
    ):
        stopped = s.stopped()
        assert stopped.planned_at == INF and stopped.due_at(P, demanded=False) == INF
        # it forgets nothing else: what failed still holds when a person's act plans it again
        assert dataclasses.replace(stopped, planned_at=s.planned_at) == s
    # only a plan (a restart, an unlock), a new token or new credentials start it again
    assert Schedule().stopped().planned(300.0).due_at(P, demanded=False) == 300.0
    assert Schedule().stopped().granted(400.0).due_at(P, demanded=False) == 400.0
    assert Schedule().stopped().retry(500.0).due_at(P, demanded=False) == 500.0


def test_planned_and_started_keep_the_failures() -> None:
    failing = Schedule().started(100.0).failed(P, now=100.0, rand=0.5, retry_after=None)
    for s in (failing.planned(2000.0), failing.started(101.0), failing.forced(101.0), failing.stopped()):
        assert (s.failures, s.failed_at, s.backoff_until, s.told_until) == (
            failing.failures,
            failing.failed_at,
            failing.backoff_until,
            failing.told_until,
        )


def test_transitions_return_new_values_and_leave_the_old_one_alone() -> None:
    s = Schedule().started(100.0)
    before = dataclasses.astuple(s)
    s.failed(P, now=101.0, rand=0.5, retry_after=10.0)
    s.granted(900.0)
    s.retry(102.0)
    s.stopped()
    assert dataclasses.astuple(s) == before
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.failures = 3  # type: ignore[misc]


# ---------------------------------------------------------------- the schedule: its invariants, any order

#: (transition, seconds after the previous one, rand, Retry-After)
Move = tuple[str, float, float, float | None]
moves = st.lists(
    st.tuples(
        st.sampled_from(["started", "failed", "granted", "retry", "forced", "stopped", "planned"]),
        st.floats(0, 400),
        st.floats(0, 1, exclude_max=True),
        st.one_of(st.none(), st.floats(0.1, 10_000)),
    ),
    max_size=30,
)


def replay(steps: list[Move], p: RefreshPolicy, check: Callable[[Schedule, float, Move], None]) -> None:
    s, now = Schedule(), 0.0
    for move in steps:
        name, after, rand, retry_after = move
        now += after
        if name == "started":
            s = s.started(now)
        elif name == "failed":
            s = s.failed(p, now=now, rand=rand, retry_after=retry_after)
        elif name == "granted":
            s = s.granted(now + rand * 1800)
        elif name == "planned":
            s = s.planned(now + rand * 1800)
        elif name in ("retry", "forced"):
            s = getattr(s, name)(now)
        else:
            s = s.stopped()
        check(s, now, move)


@given(moves, st.sampled_from([P, RefreshPolicy(refresh_floor=30.0, demand_probe_interval=2.0)]))
def test_due_at_never_lies_within_the_floor_of_the_last_attempt(steps: list[Move], p: RefreshPolicy) -> None:
    def check(s: Schedule, now: float, move: Move) -> None:
        for demanded in (False, True):
            assert s.due_at(p, demanded=demanded) >= s.last_attempt_at + p.refresh_floor

    replay(steps, p, check)


@given(moves)
def test_during_backoff_nothing_starts_before_it_ends_but_a_probe_after_the_told_time(steps: list[Move]) -> None:
    def check(s: Schedule, now: float, move: Move) -> None:
        assert s.due_at(P, demanded=False) >= s.backoff_until
        probe = s.due_at(P, demanded=True)
        assert probe >= s.told_until or probe >= s.backoff_until
        assert probe >= min(s.backoff_until, s.failed_at + P.demand_probe_interval)
        assert probe <= s.due_at(P, demanded=False)  # a waiting caller never waits longer than the task

    replay(steps, P, check)


@given(moves)
def test_only_retry_and_a_new_token_forget_failures(steps: list[Move]) -> None:
    seen = [0]

    def check(s: Schedule, now: float, move: Move) -> None:
        if move[0] == "failed":
            assert s.failures == seen[0] + 1
        elif move[0] in ("retry", "granted"):
            assert s.failures == 0 and s.backoff_until == s.told_until == s.failed_at == -INF
        else:
            assert s.failures == seen[0]
        seen[0] = s.failures

    replay(steps, P, check)


# ---------------------------------------------------------------- the start-up spread


def test_a_due_refresh_at_a_restart_waits_at_most_a_tenth_of_the_tokens_life_left() -> None:
    # planned 10 s ago, 5 s of token left, a spread draw of 4.9 s: 0.5 s, not 4.9
    at = policy.first_attempt_at(P, now=1000.0, planned_at=990.0, expires_at=1005.0, delay=4.9)
    assert at == pytest.approx(1000.0 + 0.1 * 5.0)
    assert Schedule().planned(at).due_at(P, demanded=False) == at
    # a token with a long life left: the whole draw, which still leaves it far from its expiry
    assert policy.first_attempt_at(P, now=1000.0, planned_at=990.0, expires_at=2000.0, delay=4.9) == 1004.9
    # a plan in the future holds; the spread only delays what is due
    assert policy.first_attempt_at(P, now=1000.0, planned_at=1500.0, expires_at=2000.0, delay=4.9) == 1500.0
    # a token already expired: nothing to protect, the spread holds (N restarted profiles do not stampede)
    assert policy.first_attempt_at(P, now=1000.0, planned_at=990.0, expires_at=999.0, delay=4.9) == 1004.9


@given(
    st.floats(0, 1e6),
    st.floats(-3600, 3600),
    st.floats(0.001, 3600),
    st.floats(0, 1, exclude_max=True),
)
def test_the_start_up_spread_never_pushes_a_refresh_past_its_tokens_expiry(
    now: float, planned_in: float, left: float, rand: float
) -> None:
    delay = policy.startup_delay(P, rand)
    at = policy.first_attempt_at(P, now=now, planned_at=now + planned_in, expires_at=now + left, delay=delay)
    assert at >= now + planned_in and at >= now
    if planned_in <= 0:  # already due: no later than a tenth of the life left
        assert at <= now + P.startup_cap_fraction * left + 1e-6
        assert at < now + left
    else:
        assert at <= max(now + planned_in, now + min(delay, P.startup_cap_fraction * left)) + 1e-6


# ---------------------------------------------------------------- the flow driver


def authorization() -> DeviceAuthorization:
    return DeviceAuthorization(Secret("dc-dev-code"), "ABCD-EFGH", "https://idp.example/device", None, 600.0, 5.0)


class Recorder:
    """A ``perform`` that records each step and answers from ``answers`` (by step type)."""

    def __init__(self, answers: dict[type, object] | None = None, fail: BaseException | None = None) -> None:
        self.steps: list[Step] = []
        self.answers = answers or {}
        self.fail = fail

    async def __call__(self, step: Step) -> object:
        self.steps.append(step)
        await trio.lowlevel.checkpoint()
        if self.fail is not None:
            raise self.fail
        return self.answers.get(type(step))


def flow_of(script: list[Step], result: str, ended: list[str]) -> Flow[tuple[str, list[object]]]:
    """A flow that yields ``script`` in order, keeps every answer it is sent, and returns them with
    ``result``; ``ended`` says how it ended: ``returned``, ``closed`` (GeneratorExit) or the error
    thrown into it."""
    got: list[object] = []
    try:
        for step in script:
            got.append((yield step))
    except GeneratorExit:
        ended.append("closed")
        raise
    except BaseException as exc:
        ended.append(f"thrown {type(exc).__name__}")
        raise
    ended.append("returned")
    return result, got


async def test_drive_performs_each_step_and_sends_its_answer_back() -> None:
    ended: list[str] = []
    perform = Recorder({Sleep: 42.0})
    script: list[Step] = [Sleep(2.0), LoginLost("gone"), Sleep(1.0)]
    assert await driver.drive(flow_of(script, "tokens", ended), perform) == ("tokens", [42.0, None, 42.0])
    assert perform.steps == script and ended == ["returned"]


async def test_a_flow_with_no_step_returns_at_once() -> None:
    ended: list[str] = []
    perform = Recorder()
    assert await driver.drive(flow_of([], "done", ended), perform) == ("done", [])
    assert perform.steps == [] and ended == ["returned"]


@pytest.mark.parametrize(
    ("step", "name"), [(ShowCode(authorization()), "ShowCode"), (OpenBrowser("https://idp.example/a"), "OpenBrowser")]
)
async def test_drive_refuses_a_step_meant_for_a_person_and_closes_the_flow(step: Step, name: str) -> None:
    ended: list[str] = []
    perform = Recorder()
    with pytest.raises(TypeError) as refused:
        await driver.drive(flow_of([Sleep(1.0), step, Sleep(5.0)], "never", ended), perform)
    assert str(refused.value) == f"this flow needs a person ({name}); drive it with steps()"
    assert perform.steps == [Sleep(1.0)]  # the person's step is never performed, nor anything after it
    assert ended == ["closed"]


async def test_an_error_while_performing_a_step_closes_the_flow_and_is_raised_as_is() -> None:
    ended: list[str] = []
    lost = UpstreamTransient("identity provider unreachable at https://idp.example: ConnectError")
    perform = Recorder(fail=lost)
    with pytest.raises(UpstreamTransient) as raised:
        await driver.drive(flow_of([Sleep(1.0), Sleep(2.0)], "never", ended), perform)
    assert raised.value is lost
    assert perform.steps == [Sleep(1.0)] and ended == ["closed"]


async def test_an_error_of_the_flow_itself_comes_out_of_drive() -> None:
    def refusing() -> Flow[str]:
        yield Sleep(1.0)
        raise UpstreamTransient("HTTP 503 from the token endpoint")

    with pytest.raises(UpstreamTransient, match="HTTP 503"):
        await driver.drive(refusing(), Recorder())


async def test_a_cancelled_step_closes_the_flow(autojump_clock: trio.abc.Clock) -> None:
    ended: list[str] = []

    async def hangs(step: Step) -> object:
        await trio.sleep_forever()

    with trio.move_on_after(30) as scope:
        await driver.drive(flow_of([Sleep(1.0)], "never", ended), hangs)
    assert scope.cancelled_caught and ended == ["closed"]


async def test_steps_hands_out_a_persons_steps_then_done() -> None:
    ended: list[str] = []
    show, browse = ShowCode(authorization()), OpenBrowser("https://idp.example/auth")
    perform = Recorder({Sleep: 7.0})
    items: list[object] = []
    async with driver.steps(flow_of([show, Sleep(5.0), browse], "tokens", ended), perform) as each:
        async for item in each:
            items.append(item)
    # a person's step is answered None (shown, not performed); the others by ``perform``
    assert items == [show, browse, Done(("tokens", [None, 7.0, None]))]
    assert perform.steps == [Sleep(5.0)] and ended == ["returned"]


async def test_leaving_steps_before_done_closes_the_flow() -> None:
    """A person who cancels (Ctrl-C ends the login's stream) leaves the ``async with`` early: the flow
    is closed there, not left open to poll the IdP."""
    ended: list[str] = []
    show = ShowCode(authorization())
    perform = Recorder()
    async with driver.steps(flow_of([show, Sleep(5.0)], "never", ended), perform) as each:
        async for item in each:
            assert item == show
            break
    assert perform.steps == [] and ended == ["closed"]
