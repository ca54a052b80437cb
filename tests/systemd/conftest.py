"""Fixtures of the real-systemd tests (marker ``systemd``; ``make systemd-test`` runs them alone).

One wheelhouse per session, one booted container per test module (``machine``). Each report carries
what the harness saw; tests/conftest.py's terminal summary says which systemd the tests ran against
and how many of them ran.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.systemd import harness


def require_nspawn() -> None:
    """Skip (or, under CI, fail) where a container cannot be booted at all."""
    reason = harness.skip_reason()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"the systemd tests must run in CI, but: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_nspawn()
    return harness.build_wheelhouse(tmp_path_factory.mktemp("wheelhouse"))


@pytest.fixture(scope="module")
def machine(
    request: pytest.FixtureRequest, wheelhouse: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[harness.Machine]:
    """A booted container with the wheel installed in /opt/dc-broker, for one test module. In every
    one a unit that is not dc-broker's has failed at boot (``harness.UNRELATED``, inside the
    container): the tests must pass on a host whose own units are broken."""
    name = f"dcb-{os.getpid()}-{request.module.__name__.rsplit('.', 1)[-1].removeprefix('test_')}"[:60]
    workdir = tmp_path_factory.mktemp("console")
    with harness.Machine.boot(name.replace("_", "-"), wheelhouse, workdir, unrelated_failure=True) as m:
        assert harness.UNRELATED in m.failed_units(), "the unrelated unit was meant to fail at boot"
        assert m.run("systemctl", "is-system-running", check=False).stdout.strip() == "degraded"
        m.install()
        yield m


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test in a container says which of the container's units failed, and how. Every
    report carries what the harness saw (booted systemd, figures) in ``user_properties``: under
    pytest-xdist the summary is written by the controller, which sees only the reports."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    machine = getattr(item, "funcargs", {}).get("machine")
    if report.failed and isinstance(machine, harness.Machine) and machine.proc.poll() is None:
        try:
            report.sections.append(("failed units in the container", machine.describe_failures()))
        except Exception as exc:
            report.sections.append(("failed units in the container", f"could not ask: {exc}"))
    if item.get_closest_marker("systemd"):
        report.user_properties.append(("systemd", (list(harness.booted_versions), list(harness.report))))
