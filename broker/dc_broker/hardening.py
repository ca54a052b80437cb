"""Process hardening the daemon applies to itself at start-up, before it holds any secret.

- no core dumps: RLIMIT_CORE 0 and PR_SET_DUMPABLE 0 (which also keeps other processes of the same
  uid from ptrace-attaching or reading our /proc/PID/mem);
- a tight umask (077), so every file the daemon creates is private unless it says otherwise;
- the open-files limit raised to its hard maximum, so many idle clients cannot starve the accept loop.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import resource

log = logging.getLogger("dc_broker")

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


def _prctl(option: int, arg: int = 0) -> int:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    result: int = libc.prctl(option, arg, 0, 0, 0)
    return result


def harden() -> dict[str, object]:
    """Apply everything above; returns what took effect (for the log and the tests)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.umask(0o077)
    dumpable = 1
    try:
        _prctl(PR_SET_DUMPABLE, 0)
        dumpable = _prctl(PR_GET_DUMPABLE)
    except OSError as exc:  # no libc prctl (not Linux): the rlimit still stops core files
        log.warning("could not clear the dumpable flag: %s", exc)
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
