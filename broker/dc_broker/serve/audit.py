"""The ``token_served`` audit event: which caller got which profile's tokens. Never the token itself.

Recording is a dict increment on the serve path; ``run`` writes one ``token_served`` record per
(profile, caller) per interval (``dc_broker.observe.events``), so a client asking a million times a
minute costs one line a minute, not a million.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from dc_broker.observe.events import caller_fields, emit

if TYPE_CHECKING:
    from dc_broker.access.caller import Caller


class Audit:
    def __init__(self, interval: float = 60.0) -> None:
        self.interval = interval
        #: (profile, who) -> token requests in this interval
        self._counts: dict[tuple[str, str], int] = {}
        #: (profile, who) -> the first caller seen as that in this interval (its fields)
        self._callers: dict[tuple[str, str], Caller] = {}

    def record(self, profile: str, caller: Caller) -> None:
        key = (profile, caller.describe())
        counts = self._counts
        n = counts.get(key)
        if n is None:
            self._callers[key] = caller
            counts[key] = 1
        else:
            counts[key] = n + 1

    def flush(self) -> int:
        counts, self._counts = self._counts, {}
        callers, self._callers = self._callers, {}
        for (profile, who), n in sorted(counts.items()):
            emit(
                "token_served",
                "profile %s: %d token request(s) from %s in the last %.0f s",
                profile,
                n,
                who,
                self.interval,
                profile=profile,
                count=n,
                interval=self.interval,
                **caller_fields(callers[(profile, who)]),
            )
        return len(counts)

    async def run(self) -> None:
        try:
            while True:
                await trio.sleep(self.interval)
                self.flush()
        finally:
            self.flush()
