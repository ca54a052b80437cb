"""`dc-token exec` beside a long-lived command (``dc_token.supervise``), against `dc-broker dev` with
5-second tokens: a token file kept current and signalled, restarts, exit status, signals and stdin.

(5 s, not less: the dev IdP, like Keycloak, writes ``exp`` in whole seconds while announcing the full
lifespan in ``expires_in``, so a token may die up to 1 s before the announced expiry; refreshing at
75 % of 5 s stays clear of that.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dc_token.cli import parse
from dc_token.supervise import signal_number
from tests.e2e import DC_TOKEN, dev_broker, wait_for

API = "/dp/api/v1/aiconnections/types"


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory):
    # 8-second tokens, refreshed at 5.6-6.4 s: the dev IdP (like Keycloak) puts exp in whole seconds,
    # up to 1 s before the expiry it announces, so a child checking exp keeps 0.6 s or more in hand
    with dev_broker(tmp_path_factory.mktemp("exec"), "--access-lifespan", "8") as env:
        yield env


def exec_env(sock: str) -> dict[str, str]:
    return {**os.environ, "DC_BROKER_SOCKET": sock}


# a command that holds the token from its file, re-reads it on SIGHUP, and checks against the demo API
# (and the token's own exp) every 50 ms that what it holds is valid; exits 0 after N updates
HUP_CHILD = r"""
import base64, json, os, signal, sys, time, urllib.request, urllib.error
api, want = sys.argv[1], int(sys.argv[2])
path = os.environ["DC_TOKEN_FILE"]
assert "DC_TOKEN" not in os.environ, "a token in the environment would go stale"
held = open(path).read().strip()
updates = []
def hup(*_):
    global held
    held = open(path).read().strip()
    updates.append(held)
signal.signal(signal.SIGHUP, hup)
def exp(token):
    p = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))["exp"]
checks = calls = 0
deadline = time.time() + 60
while len(set(updates)) < want:
    if time.time() > deadline:
        sys.exit(f"only {len(updates)} updates")
    if not (held.count(".") == 2 and exp(held) > time.time()):
        sys.exit(f"holding an expired or broken token after {len(updates)} updates")
    checks += 1
    if checks % 10 == 0:
        req = urllib.request.Request(api, headers={"Authorization": "Bearer " + held})
        try:
            urllib.request.urlopen(req, timeout=5).read()
            calls += 1
        except urllib.error.HTTPError as exc:
            sys.exit(f"the API said {exc.code} to the held token after {len(updates)} updates")
    time.sleep(0.05)  # the child's check interval: it holds the token and checks it, as a real program would
print(f"{len(set(updates))} updates, {checks} checks, {calls} API calls, path {path}")
"""


@pytest.mark.slow
def test_token_file_and_signal_keep_a_child_valid_across_refreshes(dev) -> None:
    sock, base, _ = dev
    argv = [DC_TOKEN, "exec", "demo", "--token-file", "--signal", "HUP", "--", sys.executable, "-c", HUP_CHILD]
    result = subprocess.run(
        [*argv, base + API, "3"],
        capture_output=True,
        text=True,
        env=exec_env(sock),
        timeout=90,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 updates" in result.stdout
    path = result.stdout.rsplit("path ", 1)[1].strip()
    assert not os.path.exists(path) and not os.path.exists(os.path.dirname(path))  # removed at exit


RESTART_CHILD = r"""
import os, signal, sys, time
with open(sys.argv[1], "a") as log:
    log.write(os.environ["DC_TOKEN"] + "\n")
signal.signal(signal.SIGTERM, lambda *_: sys.exit(int(sys.argv[2])))
time.sleep(60)  # a long-running command: it only ends when dc-token restarts or stops it
"""


@pytest.mark.slow
def test_restart_starts_the_command_again_with_each_new_token(dev, tmp_path: Path) -> None:
    sock, _, _ = dev
    log = tmp_path / "starts"
    proc = subprocess.Popen(
        [DC_TOKEN, "exec", "demo", "--restart", "--", sys.executable, "-c", RESTART_CHILD, str(log), "42"],
        env=exec_env(sock),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: log.exists() and len(log.read_text().split()) >= 3, 40, "the third start", process=proc)
    finally:
        proc.send_signal(signal.SIGTERM)  # forwarded: the command exits 42, and so does dc-token
        assert proc.wait(15) == 42
    tokens = log.read_text().split()
    assert len(set(tokens)) == len(tokens) >= 3  # each start had a new token


@pytest.mark.parametrize(
    ("command", "status"),
    [
        (["sh", "-c", "exit 7"], 7),
        (["sh", "-c", "kill -USR1 $$"], -signal.SIGUSR1),  # death by a signal is passed on as such
        (["no-such-command-here"], 127),
        ([os.devnull], 126),
    ],
)
def test_exit_status_passes_through(dev, command: list[str], status: int) -> None:
    sock, _, _ = dev
    for flags in (["--token-file"], ["--restart"]):
        result = subprocess.run(
            [DC_TOKEN, "exec", "demo", *flags, "--", *command],
            capture_output=True,
            text=True,
            env=exec_env(sock),
            timeout=30,
        )
        assert result.returncode == status, (flags, result.stderr)


def test_stdin_and_stdout_are_the_commands(dev) -> None:
    sock, _, _ = dev
    script = 'cat; test -s "$DC_TOKEN_FILE" && stat -c %a "$DC_TOKEN_FILE" "$(dirname "$DC_TOKEN_FILE")"'
    result = subprocess.run(
        [DC_TOKEN, "exec", "demo", "--token-file", "--", "sh", "-c", script],
        input="line one\nline two\n",
        capture_output=True,
        text=True,
        env=exec_env(sock),
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "line one\nline two\n600\n700\n"


def test_sigint_from_a_process_is_forwarded_once(dev, tmp_path: Path) -> None:
    sock, _, _ = dev
    log = tmp_path / "ints"
    child = (
        "import signal, sys, time\n"
        f"signal.signal(signal.SIGINT, lambda *_: (open({str(log)!r}, 'a').write('int\\n'), sys.exit(130)))\n"
        f"open({str(log)!r}, 'a').write('ready\\n')\n"
        "time.sleep(60)\n"  # a long-running command: only the forwarded SIGINT ends it
    )
    proc = subprocess.Popen(
        [DC_TOKEN, "exec", "demo", "--token-file", "--", sys.executable, "-c", child], env=exec_env(sock)
    )
    wait_for(log.exists, 20, "the command to be ready for the SIGINT", process=proc, every=0.02)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(15) == 130
    assert log.read_text() == "ready\nint\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["exec", "demo", "--signal", "HUP", "--", "x"], "--signal needs --token-file"),
        (["exec", "demo", "--token-file", "--signal", "HUP", "--restart", "--", "x"], "alternatives"),
        (["exec", "demo", "--token-file", "--signal", "NOPE", "--", "x"], "not a signal name"),
        (["demo", "--scope", "  "], "--scope needs"),
    ],
)
def test_usage_mistakes(argv: list[str], message: str) -> None:
    from dc_token.cli import _Usage

    with pytest.raises(_Usage, match=message):
        parse(argv)


def test_parse_exec_flags_and_signal_names() -> None:
    args = parse(["exec", "demo", "--token-file", "--signal", "usr1", "--scope", "openid  email", "--", "cmd", "-x"])
    assert (args.token_file, args.notify, args.restart, args.scope) == (True, signal.SIGUSR1, False, "openid email")
    assert args.command == ["cmd", "-x"]
    assert signal_number("SIGHUP") == signal_number("HUP") == signal_number("1") == signal.SIGHUP


def test_a_later_token_without_the_asked_scopes_is_not_handed_to_the_command(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`dc-token exec --scope ... --token-file` checks every new token from its watch as it checked the
    first: one lacking a scope asked for (the login changed meanwhile) is said once and not handed
    over; the command keeps its last good token, and gets the next good one."""
    import time

    from dc_token.cache import Token
    from dc_token.supervise import Supervisor

    sup = Supervisor(None, "acme", ["true"], scope="openid email")  # type: ignore[arg-type] - no broker asked
    later = time.time() + 300
    sup._offer(Token("GOOD1", "Bearer", later, "openid email profile", "acme"))
    assert sup._current == "GOOD1"
    for narrower in ("NARROW1", "NARROW2"):
        sup._offer(Token(narrower, "Bearer", later, "openid profile", "acme"))
        assert sup._current == "GOOD1"
    err = capsys.readouterr().err
    assert err.count("without email") == 1, err  # said once, not at every token
    assert err.startswith("dc-token: profile 'acme': the identity provider granted 'openid profile' for --scope")
    assert err.endswith("; the command keeps its last token\n")
    sup._offer(Token("GOOD2", "Bearer", later, "openid email", "acme"))
    assert sup._current == "GOOD2"
