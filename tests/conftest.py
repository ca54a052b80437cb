"""Shared fixtures: the dev IdP in-process (ASGI transport, trio clock), session factories, and
``running``: a session's (or a server's) background task for the length of an ``async with``.

Under ``CI=true`` a skipped test is a failed one (``pytest_runtest_makereport``), and a module that
skips as a whole a collection error (``pytest_make_collect_report``): a test that cannot run here
(not root, a program missing) says why when skipped on a developer's machine, and CI, which has root
and installs every program first (.ci/packages), never passes by skipping it."""

from __future__ import annotations

import inspect
import os
import random
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import httpx
import pytest
import trio

from dc_broker.config import Profile
from dc_broker.devserver import DevIdP, demo_realm
from dc_broker.idp.transport import IdpTransport
from dc_broker.secret import Secret
from dc_broker.serve.listen import bind_unix_socket
from dc_broker.serve.server import Server
from dc_broker.sessions.policy import DEFAULT_POLICY, RefreshPolicy
from dc_broker.sessions.registry import Sessions
from dc_broker.sessions.session import Session
from dc_broker.store import MemoryStore
from dc_broker.tokens import Credentials, TokenSet
from dc_token.errors import BrokerError, Locked
from tests.e2e import dev_idp

WALL0 = 1_750_000_000.0

# A suite started in the background of a non-interactive shell (`make test &`, a CI runner's job
# control) inherits SIGINT ignored, and so would every process the tests start: a Ctrl-C test's
# SIGINT would then be lost (an ignored signal stays ignored across exec, and Python installs its
# handler only where SIGINT is not ignored). The tests' processes get SIGINT as a terminal gives it.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _skip_fails_under_ci(report: pytest.TestReport | pytest.CollectReport, what: str) -> None:
    if os.environ.get("CI") == "true" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"CI=true: {what} must run in CI, but it skipped: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    outcome = yield
    _skip_fails_under_ci(outcome.get_result(), "this test")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Any:
    """A whole module that skips (``pytest.skip(allow_module_level=True)``, ``importorskip``) is a
    collection report, not a test's: under CI=true it is a collection error, saying why."""
    outcome = yield
    _skip_fails_under_ci(outcome.get_result(), collector.nodeid or "this module")


#: markers of tests that take long: their files are started first when the suite runs in parallel
#: (``make test``: pytest-xdist, ``--dist loadfile --no-loadscope-reorder``, one file per worker at a
#: time), so that the run does not end waiting on one of them
LONG = ("slow", "systemd", "install")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files with a long test first, each file's tests in their own order."""
    long_files = {item.path for item in items if any(item.get_closest_marker(m) for m in LONG)}
    items.sort(key=lambda item: item.path not in long_files)


#: what the real-systemd tests' reports carried (tests/systemd/conftest.py puts it in their
#: ``user_properties``, so that it reaches pytest-xdist's controller, which writes the summary)
_systemd_outcomes: dict[str, int] = {}
_systemd_versions: set[str] = set()
_systemd_lines: dict[str, None] = {}  # in the order seen


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    seen = [value for key, value in report.user_properties if key == "systemd"]
    if not seen:
        return
    versions, lines = seen[-1]
    _systemd_versions.update(versions)
    _systemd_lines.update(dict.fromkeys(lines))
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        key = "xfailed" if hasattr(report, "wasxfail") and report.outcome == "skipped" else report.outcome
        _systemd_outcomes[key] = _systemd_outcomes.get(key, 0) + 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _systemd_outcomes:
        return
    ran = sum(n for k, n in _systemd_outcomes.items() if k != "skipped")
    versions = ", ".join(sorted(_systemd_versions)) or "none booted"
    detail = ", ".join(f"{n} {k}" for k, n in sorted(_systemd_outcomes.items()))
    for line in _systemd_lines:
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"systemd tests: {ran} ran against a booted {versions} ({detail})")


IDP_URL = "http://127.0.0.1:1"  # never dialled: requests go straight into the ASGI app


def trio_wall_clock() -> float:
    """The IdP's notion of 'now', driven by trio's (mock) clock."""
    return WALL0 + trio.current_time()


@pytest.fixture
def make_idp() -> Callable[..., DevIdP]:
    def make(**realm: Any) -> DevIdP:
        return DevIdP([demo_realm(**realm)], clock=trio_wall_clock)

    return make


def idp_transport(idp: DevIdP) -> IdpTransport:
    return IdpTransport(transport=httpx.ASGITransport(app=idp.app))


PROFILES = {
    "demo": dict(client_id="dc-cli", grant="password", username="demo"),
    "service": dict(client_id="dc-service", grant="client_credentials"),
    "device": dict(client_id="dc-public", grant="device", auth_method="none"),
}
CREDENTIALS = {
    "demo": Credentials(password=Secret("demo"), client_secret=Secret("dc-cli-secret")),
    "service": Credentials(client_secret=Secret("dc-service-secret")),
    "device": Credentials(),
}


def profile(name: str, **overrides: Any) -> Profile:
    kwargs: dict[str, Any] = {"server": IDP_URL, "tenant": "demo", **PROFILES[name], **overrides}
    return Profile(name=name, **kwargs)


def make_session(
    idp: DevIdP,
    name: str = "demo",
    *,
    credentials: Credentials | None = None,
    refresh_policy: RefreshPolicy = DEFAULT_POLICY,
    seed: int = 1,
    **overrides: Any,
) -> Session:
    store = MemoryStore({name: credentials if credentials is not None else CREDENTIALS[name]})
    return Session(
        profile(name, **overrides),
        store,
        idp_transport(idp),
        refresh_policy=refresh_policy,
        rng=random.Random(seed),
        wall_clock=trio_wall_clock,
    )


@asynccontextmanager
async def running(*tasks: Callable[..., Awaitable[object]]) -> AsyncIterator[trio.Nursery]:
    """Run ``tasks`` in the background while the body of the ``async with`` runs; cancel them at its end.

    ``async with running(session.run): ...`` is "open a nursery, start the session's refresh task, do
    the test, cancel". A task that takes ``task_status`` (``Sessions.run``, ``sinks.run``) is started
    with ``nursery.start``, so the body begins once it is ready; any other (``Session.run``) with
    ``start_soon``, so it first runs at the body's first checkpoint. Tasks start in the order given;
    give arguments with ``functools.partial``. Yields the nursery, for the callers a test adds.
    """
    async with trio.open_nursery() as nursery:
        for task in tasks:
            if "task_status" in inspect.signature(task).parameters:
                await nursery.start(task)
            else:
                nursery.start_soon(task)
        try:
            yield nursery
        finally:
            nursery.cancel_scope.cancel()


def registry(idp: DevIdP, *names: str, store: MemoryStore | None = None, **overrides: Any) -> Sessions:
    """A registry of the profiles ``names`` (``profile(name, **overrides)``) at the in-process dev
    IdP, with their stored credentials (``CREDENTIALS``, unless ``store`` is given), a fixed jitter
    and the test's wall clock."""
    store = store if store is not None else MemoryStore({n: CREDENTIALS[n] for n in names})
    profiles = {n: profile(n, **overrides) for n in names}
    return Sessions(profiles, store, idp_transport(idp), rng=random.Random(3), wall_clock=trio_wall_clock)


def outcome_of(nursery: trio.Nursery, work: Callable[[], Awaitable[Any]]) -> list[Any]:
    """Start ``work`` in ``nursery`` (a login, a request that waits): the list returned gets what it
    returned, or the exception it raised, so a test can land an event while it waits and then look."""
    outcome: list[Any] = []

    async def run() -> None:
        try:
            outcome.append(await work())
        except Exception as exc:
            outcome.append(exc)

    nursery.start_soon(run)
    return outcome


async def password_login_at_a_slow_idp(idp: DevIdP, session: Session, nursery: trio.Nursery) -> list[Any]:
    """A person's `dc-broker login` of ``session`` (user demo's password) at an IdP that now takes 3 s
    to answer, started in ``nursery``; returns once the login is at the IdP (``session.busy``), with
    the list that gets its outcome (``outcome_of``)."""
    idp.faults.latency = 3.0
    outcome = outcome_of(nursery, lambda: session.password_login(Secret("demo")))
    while not session.busy:
        await trio.sleep(0.01)
    return outcome


@asynccontextmanager
async def listening(server: Server, path: str, *tasks: Callable[..., Awaitable[object]]) -> AsyncIterator[None]:
    """``server`` answering on a Unix socket bound at ``path`` for the length of the ``async with``,
    ``tasks`` (``sessions.run``) started before it as ``running`` starts them; the socket and its
    lock file are closed at the end."""
    sock, lock = bind_unix_socket(path)
    try:
        async with running(*tasks, partial(server.serve, sock)):
            yield
    finally:
        sock.close()
        lock.close()


@pytest.fixture(scope="module")
def idp() -> Iterator[str]:
    """The dev IdP as a real process (``python -m dc_broker.devserver`` from this venv): its base URL."""
    with dev_idp() as base:
        yield base


class LockableStore(MemoryStore):
    """A memory store that locks as the vault does: while locked, nothing can be read or stored."""

    def __init__(self, credentials: dict[str, Credentials]) -> None:
        super().__init__(credentials)
        self._locked = False

    @property
    def lockable(self) -> bool:
        return True

    @property
    def locked(self) -> bool:
        return self._locked

    def lock(self) -> None:
        self._locked = True

    def unlock(self, passphrase: Secret | None = None) -> None:
        self._locked = False

    def _check(self) -> None:
        if self._locked:
            raise Locked("the vault is locked; run `dc-broker unlock`")

    def credentials(self, profile: str) -> Credentials:
        self._check()
        return super().credentials(profile)

    def saved_tokens(self, profile: str) -> TokenSet | None:
        self._check()
        return super().saved_tokens(profile)

    def saved_tokens_all(self) -> dict[str, TokenSet | BrokerError]:
        self._check()
        return super().saved_tokens_all()

    async def save_tokens(self, profile: str, tokens: TokenSet) -> None:
        self._check()
        await super().save_tokens(profile, tokens)
