"""What lets one broker hold 10,000 profiles in 120 MiB and serve them all within a second of unlock
(issue 23; `bench/scale.py` measures the daemon): no task per profile once its token is fresh, and a
session small enough to hold ten thousand of. These guard the shape, not a timing: a change that gives
every session a task again, or a dict of its own, fails here before the benchmark shows it."""

from __future__ import annotations

import dataclasses
import gc
import tracemalloc

import trio

from dc_broker.secret import Secret
from dc_broker.sessions.registry import Sessions
from dc_broker.sessions.states import State
from dc_broker.store import MemoryStore
from dc_broker.tokens import Credentials
from tests.conftest import idp_transport, profile, running

#: traced bytes one session may cost as the registry makes it (about 774 on CPython 3.11; a dict of
#: its own or a task each would be several hundred more)
SESSION_BYTES = 1200


def _services(n: int) -> tuple[dict[str, object], MemoryStore]:
    base = profile("service")
    names = [f"s{i:05d}" for i in range(n)]
    store = MemoryStore({name: Credentials(client_secret=Secret("dc-service-secret")) for name in names})
    return {name: dataclasses.replace(base, name=name) for name in names}, store


def _live_tasks() -> int:
    stack, count = [trio.lowlevel.current_root_task()], 0
    while stack:
        task = stack.pop()
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


async def _tasks_once_fresh(make_idp: object, n: int) -> int:
    profiles, store = _services(n)
    sessions = Sessions(profiles, store, idp_transport(make_idp()))  # type: ignore[operator, arg-type]
    async with running(sessions.run):
        await trio.sleep(600)  # the start-up spread is over, every first grant done; tokens live 30 min
        assert {s.state for s in (sessions.lookup(name) for name in profiles)} == {State.FRESH}
        return _live_tasks()


async def test_fresh_sessions_hold_no_task_of_their_own(make_idp: object, autojump_clock: object) -> None:
    """Twenty profiles or two hundred, fresh and waiting for their next refresh: the same tasks."""
    few = await _tasks_once_fresh(make_idp, 20)
    many = await _tasks_once_fresh(make_idp, 200)
    assert many == few, f"{many} tasks for 200 fresh profiles, {few} for 20: a task per profile is back"


def test_a_session_costs_what_ten_thousand_can_afford() -> None:
    n = 2000
    profiles, store = _services(n)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        sessions = Sessions(profiles, store, None)  # type: ignore[arg-type]
        gc.collect()
        per_session = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
    assert len(sessions.names()) == n
    assert per_session <= SESSION_BYTES, f"{per_session:.0f} B per session (at most {SESSION_BYTES})"
