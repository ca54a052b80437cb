"""The content hashes of callers' programs (``exe-sha256`` rules), off the event loop and within a
budget per caller.

Hashing a program reads it whole (up to ``MAX_EXE_BYTES``, 128 MiB). Done on the event loop, one
consumer running a fresh copy of a big program (a ``chmod`` changes its ctime, so the cache misses)
froze every other caller for hundreds of milliseconds, and the time a decision took told profiles
apart. So:

- the hash is read in a worker thread (``identity.hash_program``), one at a time for the whole
  broker (``CapacityLimiter(1)``): a flood of hashes takes one core at most, never the loop. The
  thread reads 4 MiB at a time into one buffer it reuses (no allocation and unmapping per chunk)
  and hashes it with the GIL released, so it takes the GIL about 64 times for 128 MiB. (A thread
  at nice 19 did worse: descheduled while it held the GIL, it kept the event loop waiting.);
- the digest is cached by the program's (device, inode, size, mtime, ctime) (``CACHE_SIZE`` of them),
  so a program is read once until it changes; callers of the same program share one read. Only a
  digest is cached: a read that gets none (the caller's process exited, or exec'd, before it ran,
  which anyone may arrange by queueing behind another hash) says nothing about the file, so the next
  caller of that program has it read again rather than being refused for someone else's exit;
- each caller (uid) may have the broker read ``HASH_BURST_BYTES`` at once and ``HASH_BYTES_PER_MINUTE``
  a minute after that (``dc_broker.budget.Budget``), and one program of its own at a time; beyond
  that it is told ``overloaded`` with ``retry_after`` and nothing is read for it. Programs larger
  than ``MAX_EXE_BYTES`` are never read and match no ``exe-sha256`` rule;
- it happens before the connection's first decision whenever any profile pins a program by hash
  (``Sessions.pins_programs``), whatever the request is about, so an unknown profile, a refused one
  and an ``exe-sha256`` one cost the same (``dc_broker.serve.ops``).

Must never: hash on the event loop, hash a file other than the one the caller's identity was read
from (``hash_program`` checks the stamp on the file it opened), or cache a failed read.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

import trio

from dc_broker.access.caller import Caller
from dc_broker.access.identity import MAX_EXE_BYTES, hash_program
from dc_broker.budget import Budget
from dc_token.errors import Overloaded

__all__ = ["CACHE_SIZE", "HASH_BURST_BYTES", "HASH_BYTES_PER_MINUTE", "MAX_EXE_BYTES", "ProgramHashes"]

#: digests kept (by device, inode, size, mtime, ctime)
CACHE_SIZE: Final = 1024
#: program bytes one caller may have hashed at once, and per minute after that
HASH_BURST_BYTES: Final = 2 * MAX_EXE_BYTES
HASH_BYTES_PER_MINUTE: Final = 2 * MAX_EXE_BYTES

Stamp = tuple[int, int, int, int, int]


class ProgramHashes:
    """The broker's program hashes: cache, per-caller budgets, one worker thread."""

    def __init__(
        self,
        clock: Callable[[], float] = trio.current_time,
        *,
        burst_bytes: int = HASH_BURST_BYTES,
        bytes_per_minute: int = HASH_BYTES_PER_MINUTE,
    ) -> None:
        self.clock = clock
        self.burst_bytes = burst_bytes
        self.bytes_per_minute = bytes_per_minute
        self._digests: OrderedDict[Stamp, str] = OrderedDict()
        self._reading: dict[Stamp, trio.Event] = {}
        self._budgets: dict[int, Budget] = {}
        self._busy: set[int] = set()
        self._limiter = trio.CapacityLimiter(1)
        #: programs read (for the tests and the bench)
        self.reads = 0

    def cached(self, caller: Caller) -> bool:
        """Settle ``caller``'s program hash from the cache if it can be (no I/O beyond the identity
        it reads once per connection): True when it is now known (or cannot be: no program, too big)."""
        if caller.attested:
            return True
        stamp = caller.identity().exe_stamp
        if stamp is None or stamp[2] > MAX_EXE_BYTES:
            caller.attest(None)
            return True
        if stamp in self._digests:
            self._digests.move_to_end(stamp)
            caller.attest(self._digests[stamp])
            return True
        return False

    async def attest(self, caller: Caller) -> None:
        """Make ``caller``'s program hash known: from the cache, from another caller's read of the
        same program in progress, or read now in the worker thread, within the caller's budget
        (``Overloaded`` beyond it)."""
        while not self.cached(caller):
            stamp = caller.identity().exe_stamp
            assert stamp is not None
            pending = self._reading.get(stamp)
            if pending is not None:
                await pending.wait()
                continue
            self._charge(caller.uid, stamp[2])
            done = self._reading[stamp] = trio.Event()
            self._busy.add(caller.uid)
            try:
                digest = await trio.to_thread.run_sync(
                    hash_program, caller.pid, caller.uid, caller.accepted_at, stamp, limiter=self._limiter
                )
                self.reads += 1
            finally:
                self._busy.discard(caller.uid)
                del self._reading[stamp]
                done.set()
            if digest is not None:  # a failure is this caller's (its process gone, exec'd, ...), not the file's
                self._digests[stamp] = digest
                if len(self._digests) > CACHE_SIZE:
                    self._digests.popitem(last=False)
            caller.attest(digest)

    def _charge(self, uid: int, size: int) -> None:
        if uid in self._busy:
            raise Overloaded(
                f"uid {uid} already has a program of its own being hashed for an exe-sha256 rule; ask again",
                retry_after=1.0,
            )
        budget = self._budgets.get(uid)
        if budget is None:
            if len(self._budgets) >= CACHE_SIZE:
                now = self.clock()
                self._budgets = {u: b for u, b in self._budgets.items() if not b.full(now)}
            budget = self._budgets[uid] = Budget(self.burst_bytes, self.bytes_per_minute)
        wait = budget.spend(self.clock(), max(1, size))
        if wait > 0:
            raise Overloaded(
                f"uid {uid} has had more new programs hashed for exe-sha256 rules than the broker reads per minute "
                f"({self.bytes_per_minute // (1024 * 1024)} MiB); ask again in {math.ceil(wait)} s",
                retry_after=wait,
            )
