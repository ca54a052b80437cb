"""Callers' program hashes for exe-sha256 rules (``dc_broker.access.programs``): read once per
program (device, inode, size, times), shared by callers of the same program, within a budget per
caller, never for a program over the size limit. Callers are real processes running copies of a
small program; the broker's side runs in-process. (Off the event loop, under attack, with real
users: tests/test_shared_attacks.py.)"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from dc_broker.access import programs
from dc_broker.access.caller import Caller
from dc_broker.access.identity import boottime
from dc_broker.access.programs import ProgramHashes
from dc_token.errors import Overloaded
from tests.e2e import wait_for

SLEEP = shutil.which("sleep") or "/bin/sleep"


@contextmanager
def running(program: Path) -> Iterator[Caller]:
    """A process running ``program`` (a copy of sleep), as a connection's caller."""
    proc = subprocess.Popen([str(program), "60"])

    def runs_it() -> bool:
        try:
            return os.path.samefile(f"/proc/{proc.pid}/exe", program)
        except OSError:
            return False

    try:
        wait_for(runs_it, 10, f"{program.name} to run", process=proc, every=0.005)
        yield Caller(os.getuid(), os.getgid(), proc.pid, accepted_at=boottime())
    finally:
        proc.kill()
        proc.wait()


def copy_of_sleep(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    shutil.copyfile(os.path.realpath(SLEEP), path)
    path.chmod(0o755)
    return path


async def test_a_program_is_read_once_and_callers_of_it_share_the_read(tmp_path: Path) -> None:
    hashes = ProgramHashes()
    program = copy_of_sleep(tmp_path, "tool")
    digest = hashlib.sha256(program.read_bytes()).hexdigest()
    with running(program) as first, running(program) as second:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hashes.attest, first)
            nursery.start_soon(hashes.attest, second)
        assert first.identity().exe_sha256 == second.identity().exe_sha256 == digest
        assert hashes.reads == 1
    program.chmod(0o700)  # a new ctime: a new stamp, read again
    with running(program) as third:
        await hashes.attest(third)
        assert third.identity().exe_sha256 == digest and hashes.reads == 2


async def test_a_caller_gone_before_its_read_does_not_spoil_the_program_for_the_next(tmp_path: Path) -> None:
    """A caller whose process exits before its program is read (it gave up while queued behind
    another hash) gets no digest; that is about its process, not the file, so it is not cached: the
    next caller running the same program has it read and matches."""
    hashes = ProgramHashes()
    program = copy_of_sleep(tmp_path, "pinned")
    digest = hashlib.sha256(program.read_bytes()).hexdigest()
    with running(program) as gone:
        stamp = gone.identity().exe_stamp  # the identity is read while it runs, as on connecting
    assert stamp is not None and not os.path.exists(f"/proc/{gone.pid}")
    await hashes.attest(gone)
    assert gone.attested and gone.identity().exe_sha256 is None and hashes.reads == 1
    with running(program) as live:
        assert live.identity().exe_stamp == stamp  # the very file, unchanged
        await hashes.attest(live)
        assert live.identity().exe_sha256 == digest and hashes.reads == 2
    with running(program) as later:  # a digest is cached, though
        assert hashes.cached(later) and later.identity().exe_sha256 == digest and hashes.reads == 2


async def test_a_caller_over_its_budget_is_overloaded(tmp_path: Path) -> None:
    """Two fresh programs fit this caller's budget; the third this minute is `overloaded` with the
    time its budget needs to hold it, and is not read. (Another caller keeps its own budget:
    tests/test_shared_attacks.py.)"""
    size = copy_of_sleep(tmp_path, "probe").stat().st_size
    hashes = ProgramHashes(burst_bytes=2 * size, bytes_per_minute=2 * size)
    fresh = [copy_of_sleep(tmp_path, f"fresh{i}") for i in range(3)]
    with running(fresh[0]) as a, running(fresh[1]) as b, running(fresh[2]) as c:
        await hashes.attest(a)
        await hashes.attest(b)
        with pytest.raises(Overloaded) as caught:
            await hashes.attest(c)  # the same uid's third program this minute
        assert caught.value.retry_after == pytest.approx(30.0, abs=1.0)
        assert not c.attested and hashes.reads == 2


async def test_a_program_over_the_limit_is_never_read(tmp_path: Path, monkeypatch) -> None:
    program = copy_of_sleep(tmp_path, "big")
    monkeypatch.setattr(programs, "MAX_EXE_BYTES", program.stat().st_size - 1)
    hashes = ProgramHashes()
    with running(program) as caller:
        await hashes.attest(caller)
    assert caller.attested and caller.identity().exe_sha256 is None and hashes.reads == 0


async def test_unknown_and_refused_profiles_cost_the_same_read(tmp_path: Path) -> None:
    """With some profile pinning a program by hash, a new program's first request is answered after
    its hash is read, whatever it asks for: an unknown profile and an exe-sha256 profile that
    refuses it both wait for the one read (the red team timed 4 ms against 224 ms), and both are
    `forbidden` alike; a cached program's are answered at once, both."""
    from dc_broker.config import Profile
    from dc_broker.idp.transport import IdpTransport
    from dc_broker.serve.ops import HANDLERS, BrokerState
    from dc_broker.sessions.registry import Sessions
    from dc_broker.store import MemoryStore
    from dc_token.errors import Forbidden

    pinned = Profile(
        name="p_hash",
        client_id="c",
        grant="client_credentials",
        token_url="https://idp.example/t",
        allow=("exe-sha256:" + "ab" * 32,),
    )
    state = BrokerState(
        sessions=Sessions({"p_hash": pinned}, MemoryStore(), IdpTransport()), socket_path="-", system=True
    )
    assert state.sessions.pins_programs

    async def decide(caller: Caller, profile: str) -> tuple[bool, str]:
        reply = HANDLERS["token"](state, caller, {"profile": profile}, trio.current_time())
        waited = not isinstance(reply, dict)
        with pytest.raises(Forbidden) as caught:
            await reply  # type: ignore[misc]
        return waited, str(caught.value).replace(profile, "P")

    first = copy_of_sleep(tmp_path, "one")
    with running(first) as one, running(copy_of_sleep(tmp_path, "two")) as two:
        unknown, refused = await decide(one, "no_such"), await decide(two, "p_hash")
        assert unknown == refused and unknown[0] and state.programs.reads == 2
    with running(first) as again:  # the same file: its hash is known
        for profile in ("no_such", "p_hash"):
            with pytest.raises(Forbidden):
                HANDLERS["token"](state, again, {"profile": profile}, trio.current_time())
