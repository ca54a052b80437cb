"""The audit trail: which caller got which profile's tokens. Never the token itself.

Recording is a dict increment on the serve path; ``run`` writes one log line per (profile, caller)
per interval, so a client asking a million times a minute costs one line a minute, not a million.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from dc_broker.access.caller import Caller

log = logging.getLogger("dc_broker.audit")


class Audit:
    def __init__(self, interval: float = 60.0) -> None:
        self.interval = interval
        self._counts: Counter[tuple[str, str]] = Counter()

    def record(self, profile: str, caller: Caller) -> None:
        self._counts[(profile, caller.describe())] += 1

    def flush(self) -> int:
        counts, self._counts = self._counts, Counter()
        for (profile, who), n in sorted(counts.items()):
            log.info("profile %s: %d token request(s) from %s in the last %.0f s", profile, n, who, self.interval)
        return len(counts)

    async def run(self) -> None:
        try:
            while True:
                await trio.sleep(self.interval)
                self.flush()
        finally:
            self.flush()
