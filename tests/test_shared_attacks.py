"""The shared broker hardened again (issue 22): its red team's findings 1, 2, 3 and 5 replayed with
real users against a real `dc-broker run --system`, as tests/test_shared.py does (setpriv, stdlib-only
clients, frames built here).

1. A member who runs fresh 128 MiB programs (a chmod defeats the hash cache) made everyone's cached
   token wait for the hash: now another consumer's cached-token p99 stays under 5 ms meanwhile. The
   time the first request of a fresh program takes told an unknown profile from an ``exe-sha256:``
   one: now both wait for the hash.
2. ``unshare -Urm`` and a bind mount over the pinned path met an ``exe:`` rule: now it does not; the
   real program run from such a namespace does not either, and meets ``exe-any-ns:``.
3. Cycling per-request scopes made an IdP request (and a WARNING line) per request: now one consumer
   cycling 21 scopes for 5 s causes at most its budget's IdP requests and a few log lines, and
   another consumer is served meanwhile.
5. A consumer widened a client-credentials profile's scope: now it gets ``bad_request`` naming the
   extra scopes.
"""

from __future__ import annotations

import grp
import hashlib
import itertools
import json
import os
import pwd
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from dc_broker.access.identity import MAX_EXE_BYTES
from dc_broker.access.programs import HASH_BURST_BYTES, HASH_BYTES_PER_MINUTE
from dc_broker.observe.events import REFUSAL_LOG_EVERY
from dc_broker.sessions.registry import SCOPE_LOG_LINES_PER_MINUTE, SCOPED_GRANTS_BURST, SCOPED_GRANTS_PER_MINUTE
from dc_token.protocol import Request, encode
from tests.e2e import dev_idp, idp_stats, start_run, stop, wait_for, wait_for_socket
from tests.test_shared import CLIENT, _frame, ensure_group, ensure_user

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("useradd"),
        reason="needs root, setpriv, useradd",
    ),
]

ETL, OTHER = "dcb-etl", "dcb-other"
OPS = "dcb-ops"  # times fresh programs beside dcb-other: dcb-etl's hashing budget is the p99 attack's
PINNED_GROUP = "dcb-pinned"  # may run the pinned program; dcb-other is not in it
WIDE = "openid profile email phone address roles"
#: 21 distinct scopes inside WIDE
CYCLE = [" ".join(c) for n in (1, 2) for c in itertools.combinations(WIDE.split(), n)][:21]
#: the size of a program whose first requests are timed: its hash takes tens of ms (the gap that told
#: profiles apart), and each user's hashing budget covers 2 * SAMPLES of them at once
TIMED_BYTES = 24 * 1024 * 1024
#: fresh programs timed per user and per profile (two users: twice as many)
SAMPLES = 4
#: p_refusing's scope: what it may narrow to, though the dev IdP knows no client scope named x-...
REFUSING = "openid phone email x-one x-two x-three x-four"
#: 21 distinct scopes inside REFUSING, each with a word the IdP refuses (invalid_scope)
REFUSED_CYCLE = [
    " ".join(c) for n in (1, 2) for c in itertools.combinations(REFUSING.split(), n) if "x-" in " ".join(c)
][:21]


@pytest.fixture(scope="module")
def programs() -> Iterator[dict[str, str]]:
    """The pinned program (a python3 copy, 0750 root:dcb-pinned); owned by dcb-etl, a 128 MiB
    python3 copy (trailing zeros: ELF ignores them) it can chmod to defeat the hash cache; and a
    ``TIMED_BYTES`` one anyone may run. In a 0755 directory of /tmp: the users must reach them
    (pytest's own tmp is root's 0700)."""
    ensure_group(PINNED_GROUP)
    ensure_user(ETL, ["dcb-clients", PINNED_GROUP])
    ensure_user(OTHER, ["dcb-clients"])
    ensure_user(OPS, ["dcb-clients"])
    tmp = Path(tempfile.mkdtemp(prefix="dcb-programs-", dir="/tmp"))
    os.chmod(tmp, 0o755)
    python = Path(os.path.realpath("/usr/bin/python3")).read_bytes()
    pinned = tmp / "report-runner"
    pinned.write_bytes(python + b"\0pinned")
    os.chown(pinned, 0, grp.getgrnam(PINNED_GROUP).gr_gid)
    os.chmod(pinned, 0o750)
    big = tmp / "etl" / "big-python"
    big.parent.mkdir()
    with big.open("wb") as out:
        out.write(python)
        out.truncate(MAX_EXE_BYTES)  # the largest program the broker hashes
    uid = int(subprocess.run(["id", "-u", ETL], capture_output=True, text=True, check=True).stdout)
    for path in (big.parent, big):
        os.chown(path, uid, -1)
    os.chmod(big.parent, 0o755)
    os.chmod(big, 0o755)
    timed = tmp / "timed-python"  # root's: the test chmods it for both users
    with timed.open("wb") as out:
        out.write(python)
        out.truncate(TIMED_BYTES)
    os.chmod(timed, 0o755)
    try:
        yield {"pinned": str(pinned), "big": str(big), "timed": str(timed)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class Broker(NamedTuple):
    sock: str
    base: str  # the dev IdP's
    log: Path  # the broker's stderr


@pytest.fixture(scope="module")
def broker(programs: dict[str, str]) -> Iterator[Broker]:
    """A system-mode broker for group dcb-clients in front of the dev IdP, whose service client has
    no default client scopes (a narrowing gets exactly what it asks: the never-wider rule has its own
    tests)."""
    with dev_idp("--client-set", "dc-service.default_scopes=") as base:
        yield from _broker(base, programs)


def _broker(base: str, programs: dict[str, str]) -> Iterator[Broker]:
    tmp = tempfile.mkdtemp(prefix="dcb-attacks-", dir="/tmp")
    os.chmod(tmp, 0o755)
    sock = os.path.join(tmp, "broker.sock")
    digest = hashlib.sha256(Path(programs["pinned"]).read_bytes()).hexdigest()
    profiles = {
        "p_scopes": (WIDE, '["group:dcb-clients"]'),
        "p_narrow": ("openid", f'["user:{ETL}"]'),
        "p_refusing": (REFUSING, '["group:dcb-clients"]'),  # the IdP refuses its login and any scope with x-
        "p_pinned": (None, f'["exe:{programs["pinned"]}"]'),
        "p_pinned_any_ns": (None, f'["exe-any-ns:{programs["pinned"]}"]'),
        "p_hash": (None, f'["exe-sha256:{digest}"]'),  # some profile pins a program by hash
        "p_cached": (None, f'["user:{OTHER}"]'),
    }
    text = '[daemon]\ngroup = "dcb-clients"\n'
    for name, (scope, allow) in profiles.items():
        text += f'[profiles.{name}]\nserver = "{base}"\ntenant = "demo"\nclient_id = "dc-service"\n'
        text += 'grant = "client_credentials"\n' + (f'scope = "{scope}"\n' if scope else "") + f"allow = {allow}\n"
    cfg = Path(tmp) / "config.toml"
    cfg.write_text(text)
    secrets = "".join(f'[{n}]\nclient_secret = "dc-service-secret"\n' for n in profiles)
    log = Path(tmp) / "broker.log"
    with log.open("w") as stderr:  # a file, not a pipe nobody reads: a full pipe stops the broker
        proc = start_run(cfg, sock, secrets, "--system", stderr=stderr.fileno(), wait=False)
    try:
        wait_for_socket(sock, proc)

        def logged_in() -> bool:  # the start-up logins are done: the IdP counts only what tests cause
            return idp_stats(base)["token_requests"].get("client_credentials", 0) >= len(profiles)

        wait_for(logged_in, 30, "every profile's first token", process=proc)
        yield Broker(sock, base, log)
    finally:
        stop(proc, signal.SIGTERM)
        shutil.rmtree(tmp, ignore_errors=True)


def as_user(user: str, *argv: str) -> list[str]:
    return ["setpriv", "--reuid", user, "--regid", user, "--init-groups", *argv]


def frames(out: str) -> list[dict]:
    """The replies, in the order of their requests' ids (pipelined replies come as they are ready)."""
    raw, found = bytes.fromhex(out.strip()), []
    while raw:
        size = int.from_bytes(raw[:4], "big")
        found.append(_frame(raw[: 4 + size].hex()))
        raw = raw[4 + size :]
    return sorted(found, key=lambda reply: reply["id"] or 0)


def ask(sock: str, user: str, *requests: Request, program: str = "/usr/bin/python3") -> list[dict]:
    """``requests`` sent by ``user`` from ``program`` (a python); the replies."""
    return client(as_user(user, program), sock, *requests)


def client(argv: list[str], sock: str, *requests: Request) -> list[dict]:
    """``requests`` sent by tests/test_shared.py's client run by ``argv`` (a python and what it
    runs under); the replies."""
    data = b"".join(encode(r) for r in requests)
    child = subprocess.run(
        [*argv, "-c", CLIENT, sock, data.hex(), str(len(requests))],
        input="go\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == 0, child.stderr
    return frames(child.stdout)


def token(profile: str, scope: str | None = None, rid: int = 1) -> Request:
    return Request(rid, "token", {"profile": profile} if scope is None else {"profile": profile, "scope": scope})


def outcome(reply: dict) -> str:
    return "ok" if reply["ok"] else reply["error"]["code"]


# ---------------------------------------------------------------- finding 5: scopes only narrow


def test_a_consumers_wider_scope_is_a_bad_request_naming_the_extra_scopes(broker: Broker) -> None:
    sock = broker.sock
    wider, own, part = ask(
        sock,
        ETL,
        token("p_narrow", "openid phone address roles"),
        token("p_narrow", "openid", 2),
        token("p_scopes", "email phone", 3),
    )
    assert outcome(wider) == "bad_request", wider
    assert wider["error"]["message"].startswith(
        "profile 'p_narrow': scope 'openid phone address roles' asks for more than the profile's own scope "
        "'openid': phone address roles; a per-request scope may only narrow the profile's"
    )
    assert outcome(own) == "ok" and "phone" not in own["result"]["scope"].split()
    assert outcome(part) == "ok" and set(part["result"]["scope"].split()) >= {"email", "phone"}


# ---------------------------------------------------------------- finding 3: budgets for scoped grants

CYCLER = r"""
import socket, sys, time
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(30)
frames = [bytes.fromhex(h) for h in sys.argv[3].split(",")]
end, counts, buf, i = time.monotonic() + float(sys.argv[2]), {}, b"", 0
while time.monotonic() < end:
    s.sendall(frames[i % len(frames)]); i += 1
    while len(buf) < 4 or len(buf) < 4 + int.from_bytes(buf[:4], "big"):
        buf += s.recv(65536)
    size = int.from_bytes(buf[:4], "big"); reply, buf = buf[4:4 + size], buf[4 + size:]
    kind = "ok" if b"\xa2ok\xc3" in reply else "overloaded" if b"overloaded" in reply else "other"
    counts[kind] = counts.get(kind, 0) + 1
import json; print(json.dumps(counts))
"""


def warnings(log: Path, since: int) -> list[str]:
    """The WARNING (and worse) lines the broker wrote to ``log`` after its first ``since`` bytes."""
    with log.open("rb") as f:
        f.seek(since)
        lines = f.read().decode().splitlines()
    return [line for line in lines if line.split(" ", 3)[2:3] in (["WARNING"], ["ERROR"], ["CRITICAL"])]


@pytest.mark.parametrize(
    ("profile", "cycle", "others"),
    [("p_scopes", CYCLE, "openid email phone"), ("p_refusing", REFUSED_CYCLE, "openid phone")],
    ids=["granted", "refused-by-the-idp"],
)
def test_one_consumer_cycling_scopes_for_5_s_costs_at_most_its_budget(
    broker: Broker, profile: str, cycle: list[str], others: str
) -> None:
    """dcb-etl rotates through 21 scopes of a profile as fast as it can for 5 s (the red team made
    956-1,602 IdP requests that way, and as many WARNING lines): the IdP sees at most the budget (a
    burst, then one per 60/SCOPED_GRANTS_PER_MINUTE s), the rest are `overloaded`; dcb-other's own
    new scope is served. The broker's log gets at most SCOPE_LOG_LINES_PER_MINUTE lines about the
    scopes' refusals by the IdP and one (counting) line about the refused caller
    (REFUSAL_LOG_EVERY > 5 s), whether the IdP grants the scopes or refuses each one."""
    sock, base = broker.sock, broker.base
    since = broker.log.stat().st_size
    before = idp_stats(base)["token_requests"].get("client_credentials", 0)
    requests = ",".join(encode(token(profile, scope, i)).hex() for i, scope in enumerate(cycle, 1))
    cycler = subprocess.run(
        as_user(ETL, "/usr/bin/python3", "-c", CYCLER, sock, "5", requests), capture_output=True, text=True, timeout=60
    )
    assert cycler.returncode == 0, cycler.stderr
    counts = json.loads(cycler.stdout)
    made = idp_stats(base)["token_requests"].get("client_credentials", 0) - before
    assert made <= SCOPED_GRANTS_BURST + 1 + 5 * SCOPED_GRANTS_PER_MINUTE / 60, (made, counts)
    assert counts.get("overloaded", 0) > 100, counts  # told so, at once, many times over
    [other] = ask(sock, OTHER, token(profile, others))  # not one of the cycled scopes
    assert outcome(other) == "ok", other
    lines = warnings(broker.log, since)
    assert REFUSAL_LOG_EVERY > 5
    refusals = [line for line in lines if " dc_broker.audit: refused uid " in line]
    assert len(refusals) <= 1, lines
    about_scopes = [line for line in lines if line not in refusals]
    assert len(about_scopes) <= SCOPE_LOG_LINES_PER_MINUTE, lines
    if profile == "p_refusing":  # each of the IdP's refusals would be a line: the gate let so many through
        assert made > SCOPE_LOG_LINES_PER_MINUTE, (made, counts)
        said = f"WARNING dc_broker.sessions: profile {profile}: the identity provider refuses scope "  # named once
        assert len(about_scopes) == SCOPE_LOG_LINES_PER_MINUTE and all(said in line for line in about_scopes), lines


# ---------------------------------------------------------------- finding 2: exe rules mean the file


@pytest.mark.skipif(
    subprocess.run(["unshare", "-Urm", "true"], capture_output=True).returncode != 0,
    reason="user namespaces are not available here",
)
def test_a_bind_mount_in_unshare_urm_does_not_meet_an_exe_rule(broker: Broker, programs: dict[str, str]) -> None:
    """dcb-other may not run the pinned program (0750 root:dcb-pinned). In its own user and mount
    namespace it bind-mounts python3 over the pinned path and runs that: the path its namespace shows
    is the pinned one, the file is not. A member of dcb-pinned running the real program passes."""
    sock = broker.sock
    pinned = programs["pinned"]
    [real] = ask(sock, ETL, token("p_pinned"), program=pinned)
    assert outcome(real) == "ok", real
    script = f'mount --bind /usr/bin/python3 {pinned} && exec {pinned} "$@"'
    [faked] = client(as_user(OTHER, "unshare", "-Urm", "sh", "-c", script, "sh"), sock, token("p_pinned"))
    assert outcome(faked) == "forbidden", faked


@pytest.mark.skipif(
    subprocess.run(["unshare", "-Urm", "true"], capture_output=True).returncode != 0,
    reason="user namespaces are not available here",
)
def test_the_real_program_from_another_mount_namespace_meets_exe_any_ns_but_not_exe(
    broker: Broker, programs: dict[str, str]
) -> None:
    """dcb-etl may run the pinned program and does, from its own user and mount namespace, with
    nothing mounted: the broker reads the caller's program (the very file: ``exe-any-ns:`` lets it
    in), and the ``exe:`` rule refuses it for its namespace alone. So the bind mount above is refused
    by the namespace rule, not because the broker could not read a namespaced caller's program; and
    ``exe-any-ns:`` still means the file, not the path: the bind mount does not meet it either."""
    sock, pinned = broker.sock, programs["pinned"]
    both = (token("p_pinned"), token("p_pinned_any_ns", rid=2))
    inside = client(as_user(ETL, "unshare", "-Urm", pinned), sock, *both)
    assert [outcome(reply) for reply in inside] == ["forbidden", "ok"], inside
    assert inside[0]["error"]["message"] == f"profile 'p_pinned' is not available to uid {pwd.getpwnam(ETL).pw_uid}"
    assert [outcome(reply) for reply in ask(sock, ETL, *both, program=pinned)] == ["ok", "ok"]  # the host's
    script = f'mount --bind /usr/bin/python3 {pinned} && exec {pinned} "$@"'
    [faked] = client(as_user(OTHER, "unshare", "-Urm", "sh", "-c", script, "sh"), sock, token("p_pinned_any_ns"))
    assert outcome(faked) == "forbidden", faked


# ---------------------------------------------------------------- build 1: decisions take the same time

TIMER = r"""
import socket, sys, time
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(60)
t0 = time.perf_counter(); s.sendall(bytes.fromhex(sys.argv[2])); buf = b""
while len(buf) < 4 or len(buf) < 4 + int.from_bytes(buf[:4], "big"):
    buf += s.recv(65536)
print(time.perf_counter() - t0, buf.hex())
"""


def test_the_first_request_of_a_fresh_program_takes_as_long_for_an_unknown_profile_as_for_a_refused_one(
    broker: Broker, programs: dict[str, str]
) -> None:
    """A profile pins a program by hash, so the broker hashes a caller's program before it decides
    anything: the first request of a fresh program (a chmod: a new ctime, the cache misses) waits
    for the hash whether its profile is unknown or an ``exe-sha256:`` one that refuses it. The red
    team told them apart by time (4 ms against 224 ms); here the two take the same time within
    noise, and get the same answer. Unknown and refused requests alternate (the machine's load
    drifts); each user's hashing budget is its own, so two users give twice the samples.

    Not "medians within a few ms": on a 2-core machine shared with other test runs, the two medians
    were up to 14 ms apart (of 30-100 ms) from load alone, with the hash done for both."""
    timed, took = programs["timed"], {"no_such": [], "p_hash": []}
    mode = 0o755
    for user in (OTHER, OPS):
        uid = pwd.getpwnam(user).pw_uid
        for i in range(2 * SAMPLES):
            name = ("no_such", "p_hash")[(i + (user == OPS)) % 2]
            mode ^= 0o010
            os.chmod(timed, mode)  # a new ctime: the broker reads the program afresh
            out = subprocess.run(
                as_user(user, timed, "-c", TIMER, broker.sock, encode(token(name)).hex()),
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert out.returncode == 0, out.stderr
            seconds, reply = out.stdout.split()
            answer = _frame(reply)
            assert answer["error"] == {
                "code": "forbidden",
                "message": f"profile '{name}' is not available to uid {uid}",
            }
            took[name].append(float(seconds) * 1000)
    print(f"first request, ms: unknown {sorted(took['no_such'])}, refused {sorted(took['p_hash'])}")
    # The machine's load only ever adds time (on 2 busy cores, tens of ms to some requests), so each
    # kind's fastest is the closest to what it costs: each kind's median is at least half the other's
    # fastest. An unknown profile decided before the hash failed this at once (a median of 0.7 ms
    # against a fastest refusal of 20 ms).
    for one, other in (("no_such", "p_hash"), ("p_hash", "no_such")):
        assert statistics.median(took[one]) >= min(took[other]) / 2, took


# ---------------------------------------------------------------- finding 1: hashing off the loop

VICTIM = r"""
import socket, sys, time
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(30)
req = bytes.fromhex(sys.argv[2])

def once():
    t0 = time.perf_counter(); s.sendall(req); buf = b""
    while len(buf) < 4 or len(buf) < 4 + int.from_bytes(buf[:4], "big"):
        buf += s.recv(65536)
    assert b"\xa2ok\xc3" in buf, buf
    return time.perf_counter() - t0

def measure(seconds, every=0.002):
    # one request every 2 ms, each timed from when it was due (not from when it could be sent): a
    # broker that stalls for 400 ms delays the 200 requests due meanwhile, not one
    start, times = time.perf_counter(), []
    for i in range(int(seconds / every)):
        due = start + i * every
        if due > time.perf_counter():
            time.sleep(due - time.perf_counter())
        once()
        times.append(time.perf_counter() - due)
    times.sort()
    print(len(times), times[len(times) // 2], times[int(len(times) * 0.99)], times[-1], flush=True)

for _ in range(50):
    once()  # warm: the program is hashed and the token cached
measure(float(sys.argv[3]))  # the baseline, in the same run
sys.stdin.readline()
measure(float(sys.argv[3]))
"""

HASHER = r"""
import os, subprocess, sys, time
prog, end, mode, runs, overloaded = sys.argv[1], time.monotonic() + float(sys.argv[4]), 0o755, 0, 0
while time.monotonic() < end:
    time.sleep(0.25)  # four fresh programs a second; faster only measures how fast the machine forks
    mode ^= 0o010
    os.chmod(prog, mode)  # a new ctime: the broker's cache misses
    out = subprocess.run([prog, "-c", sys.argv[2], sys.argv[3], sys.argv[5], "1"], input="go\n",
                         capture_output=True, text=True).stdout
    runs += 1
    overloaded += "6f7665726c6f61646564" in out  # b"overloaded": over its hashing budget
print(runs, overloaded, flush=True)
"""


#: attempts of the attack below: a bound on p99 counts every request a stall delayed, so one pause of
#: the whole machine (a hypervisor's steal, the writeback of the suite before) fails an attempt; the
#: hash on the event loop this guards against fails every one (398 ms median). Each attempt after a
#: failed one waits for dcb-etl's hashing budget to fill again, so each makes the broker hash as
#: much as the first (checked: at least two programs hashed in each).
ATTEMPTS = 3


@pytest.mark.alone  # a latency bound: nothing else may run beside it
def test_another_consumers_cached_token_p99_stays_under_5_ms_while_a_member_hashes_fresh_programs(
    broker: Broker, programs: dict[str, str]
) -> None:
    """dcb-etl runs its 128 MiB program again and again, each time after a chmod (a new ctime: the
    hash cache misses), and asks for a token; some profile pins a program by hash, so the broker
    must hash each one. Meanwhile dcb-other asks for its cached token every 2 ms on one connection:
    its p99 stays under 5 ms (it was 398 ms median when the hash ran on the event loop). Each
    request is timed from when it was due, so a stalled broker counts once per request it delayed;
    the bound must hold in one of ``ATTEMPTS`` attacks (each also held to the hashing budget)."""
    seen = []
    for attempt in range(ATTEMPTS):
        if attempt:
            time.sleep(60 * HASH_BURST_BYTES / HASH_BYTES_PER_MINUTE + 1)  # the budget full again
        attacked, why = _attack(broker, programs)
        seen.append(why)
        if attacked["p99"] < 5.0:
            return
    raise AssertionError(seen)


def _attack(broker: Broker, programs: dict[str, str]) -> tuple[dict[str, float], tuple[str, str]]:
    """One attack: the victim's figures under it, and (them beside the victim alone, the hasher's)."""
    sock = broker.sock
    victim = subprocess.Popen(
        as_user(OTHER, "/usr/bin/python3", "-c", VICTIM, sock, encode(token("p_cached")).hex(), "5"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert victim.stdin is not None and victim.stdout is not None
    hasher: subprocess.Popen[str] | None = None
    try:
        baseline = victim.stdout.readline().split()
        hasher = subprocess.Popen(
            as_user(
                ETL,
                "/usr/bin/python3",
                "-c",
                HASHER,
                programs["big"],
                CLIENT,
                sock,
                "5",
                encode(token("p_narrow")).hex(),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        victim.stdin.write("go\n")
        victim.stdin.flush()
        count, median, p99, worst = victim.stdout.readline().split()
        hashed, trouble = hasher.communicate(timeout=120)
        assert hasher.returncode == 0, trouble
    finally:
        for proc in (victim, hasher):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
    runs, overloaded = (int(n) for n in hashed.split())

    def ms(figures: list[str]) -> dict[str, float]:
        return {
            name: round(float(value) * 1000, 2)
            for name, value in zip(("median", "p99", "max"), figures[1:], strict=True)
        }

    attacked = ms([count, median, p99, worst])
    why = (f"under attack {attacked}, alone {ms(baseline)}", f"{runs} fresh programs, {overloaded} told overloaded")
    print(*why)  # the figures, for -s
    assert int(count) > 500, count
    assert runs >= 3 and overloaded >= 1, hashed  # it kept asking, and was held to its hashing budget
    assert runs - overloaded >= 2, hashed  # and the broker hashed its programs meanwhile
    return attacked, why
