"""Process hardening the daemon applies to itself at start-up, before it holds any secret.

- no core dumps and no same-user ptrace or ``/proc/PID/mem``: RLIMIT_CORE 0 and PR_SET_DUMPABLE 0
  (``dc_token.protect.no_dumps``, which the CLI commands and ``dc-token exec`` that hold secrets
  apply to themselves too);
- a tight umask (077), so every file the daemon creates is private unless it says otherwise;
- the open-files limit raised to its hard maximum, so many idle clients cannot starve the accept loop.
"""

from __future__ import annotations

import logging
import os
import resource

from dc_token.protect import no_dumps

log = logging.getLogger("dc_broker")


def harden() -> dict[str, object]:
    """Apply everything above; returns what took effect (for the log and the tests)."""
    _, dumpable = no_dumps()
    if dumpable is None:
        log.warning("could not clear the dumpable flag (no prctl); core files are still off")
    os.umask(0o077)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return {"core_limit": resource.getrlimit(resource.RLIMIT_CORE)[0], "dumpable": dumpable, "nofile": soft}
