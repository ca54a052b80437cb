"""The suite's own rules: under ``CI=true`` a test (or a whole module) that skips fails, saying why
it skipped (tests/conftest.py), so CI never passes by not running a test; on a developer's machine
it skips with its reason. And no test runs a package manager: what the tests need is installed
before pytest starts (.ci/packages, from `make test`), never by a test, which would meet the dpkg
lock of whatever else the machine is doing."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent


def run_with_the_suites_conftest(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str, **files: str
) -> pytest.RunResult:
    """pytest in a subprocess over ``files`` (module name: source), with CI=``ci`` and this suite's
    tests/conftest.py as a plugin; its skip reasons and failures reported (``-rsf``)."""
    monkeypatch.setenv("CI", ci)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makepyfile(**files)
    return pytester.runpytest_subprocess("-p", "tests.conftest", "-p", "no:cacheprovider", "-rsf")


@pytest.mark.parametrize(("ci", "outcome"), [("true", "failed"), ("", "skipped")])
def test_a_skip_fails_under_ci_and_says_why(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str, outcome: str
) -> None:
    result = run_with_the_suites_conftest(
        pytester,
        monkeypatch,
        ci,
        test_needs="""
import pytest

def test_needs_a_widget():
    pytest.skip("no widget here (apt-get install widget)")

@pytest.mark.xfail(reason="a known bug", strict=True)
def test_known_bug():
    assert False
""",
    )
    result.assert_outcomes(**{outcome: 1, "xfailed": 1})
    if ci:
        result.stdout.fnmatch_lines(["*CI=true: this test must run in CI, but it skipped: *no widget here*"])
    else:
        result.stdout.fnmatch_lines(["*SKIPPED*no widget here*"])


@pytest.mark.parametrize(("ci", "outcome"), [("true", "errors"), ("", "skipped")])
def test_a_module_that_skips_as_a_whole_fails_under_ci_and_says_why(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str, outcome: str
) -> None:
    result = run_with_the_suites_conftest(
        pytester,
        monkeypatch,
        ci,
        test_skipped_module="""
import pytest

pytest.skip("no gizmo here (apt-get install gizmo)", allow_module_level=True)

def test_never_collected():
    pass
""",
        test_importorskip="""
import pytest

pytest.importorskip("no_such_module_for_this_suite")

def test_never_collected_either():
    pass
""",
    )
    result.assert_outcomes(**{outcome: 2})
    if ci:
        assert result.ret == pytest.ExitCode.INTERRUPTED  # "errors during collection": the run fails
        result.stdout.fnmatch_lines(["CI=true: test_skipped_module.py must run in CI, but it skipped: *no gizmo here*"])
        result.stdout.fnmatch_lines(
            ["CI=true: test_importorskip.py must run in CI, but it skipped: *could not import 'no_such_module_*"]
        )
    else:
        assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED
        result.stdout.fnmatch_lines(["*SKIPPED*no gizmo here*"])


#: package managers: a test that runs one waits on (or fails at) the machine's dpkg lock
PACKAGE_MANAGERS = frozenset({"apt", "apt-get", "aptitude", "dpkg"})
#: what runs a program, by the name it is called with (``subprocess.run``, ``os.system``, trio's
#: ``run_process``, the suite's own ``run`` helpers...)
RUNNERS = frozenset(
    {"run", "Popen", "call", "check_call", "check_output", "getoutput", "getstatusoutput", "system", "popen",
     "run_process", "open_process", "create_subprocess_exec", "create_subprocess_shell", "spawn", "execv",
     "execve", "execvp", "execvpe", "execl", "execlp", "spawnv", "spawnvp"}
)  # fmt: skip


def package_manager_calls(source: str) -> list[int]:
    """The lines of ``source`` where a runner is handed a command that starts a package manager: a
    word of any string in its arguments (an argv list, a shell line, ``sudo apt-get ...``) that is
    one, by name or by path."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name not in RUNNERS:
            continue
        for arg in [*node.args, *(k.value for k in node.keywords)]:
            for const in ast.walk(arg):
                if isinstance(const, ast.Constant) and isinstance(const.value, str):
                    words = const.value.replace(";", " ").replace("&&", " ").split()
                    if any(Path(word).name in PACKAGE_MANAGERS for word in words):
                        lines.append(node.lineno)
    return sorted(set(lines))


def test_the_package_manager_rule_finds_each_way_of_running_one() -> None:
    source = """
import os, subprocess
subprocess.run(["apt-get", "install", "-y", "gnome-keyring"])
subprocess.check_call(["sudo", "/usr/bin/dpkg", "-i", "x.deb"])
os.system("apt update && apt install -y dbus")
run(["bash", "-c", "dpkg-query -W x; apt-get -qq install x"])
print("apt-get install gnome-keyring")  # a message that names the command runs nothing
subprocess.run(["dc-broker", "status"])
"""
    assert package_manager_calls(source) == [3, 4, 5, 6]


def test_no_test_runs_a_package_manager() -> None:
    found = {}
    for path in sorted((ROOT / "tests").rglob("*.py")):
        if path.name == Path(__file__).name:
            continue  # its examples above
        try:
            source = path.read_text()
        except FileNotFoundError:  # a file another run made and took away meanwhile
            continue
        if lines := package_manager_calls(source):
            found[str(path.relative_to(ROOT))] = lines
    assert found == {}, "install what the tests need in .ci/packages (run before pytest), not in a test"
