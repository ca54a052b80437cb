"""Keeping a process's secrets from the other processes of its own user. Standard library only.

Any process of a user can read another of the same user's memory (``/proc/PID/mem``, ptrace,
``gcore``) and gets a core file of it when it crashes, unless that process says otherwise. So every
process that holds a secret calls ``no_dumps`` before it reads one: the daemon, ``dc-token exec``
beside its command, and ``dc-broker add``, ``rotate``, ``login``, ``unlock``, ``passwd`` and ``init``.

- ``PR_SET_DUMPABLE 0``: the kernel then lets no process without CAP_SYS_PTRACE attach to it or
  open its ``/proc/PID/mem`` (nor ``environ``, ``maps``...), and writes no core file of it (or one
  only root may read, as ``fs.suid_dumpable`` says);
- ``RLIMIT_CORE 0``: no core file either way. ``keep_hard_limit`` lowers only the soft limit, so a
  child (``dc-token exec``'s command) can get its own back (``CoreLimit.restore``).

``parent_death_signal`` is for a child between fork and exec: the kernel sends it that signal when
the thread that forked it ends (a ``kill -9`` of ``dc-token exec``), so the command does not run on
with nobody keeping its token current.

Linux only; elsewhere ``no_dumps`` still sets the rlimit and reports ``dumpable`` as unknown (None).
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal

PR_SET_PDEATHSIG = 1
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4

_libc: ctypes.CDLL | None = None


def _prctl(option: int, arg: int = 0) -> int:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    result: int = _libc.prctl(option, arg, 0, 0, 0)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


class CoreLimit:
    """RLIMIT_CORE as it was before ``no_dumps`` (for a child to get back)."""

    def __init__(self, soft: int, hard: int) -> None:
        self.soft = soft
        self.hard = hard

    def restore(self) -> None:
        """In a child before exec: its core limit as the parent had it (the hard limit is unchanged
        when ``no_dumps(keep_hard_limit=True)`` lowered only the soft one)."""
        hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
        fits = hard == resource.RLIM_INFINITY or (self.soft != resource.RLIM_INFINITY and self.soft <= hard)
        resource.setrlimit(resource.RLIMIT_CORE, (self.soft if fits else hard, hard))


def no_dumps(*, keep_hard_limit: bool = False) -> tuple[CoreLimit, int | None]:
    """RLIMIT_CORE 0 and PR_SET_DUMPABLE 0 for this process. Returns the core limit as it was and
    the dumpable flag now (0; None where prctl is not there)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, hard if keep_hard_limit else 0))
    try:
        _prctl(PR_SET_DUMPABLE, 0)
        dumpable: int | None = _prctl(PR_GET_DUMPABLE)
    except (OSError, AttributeError):  # not Linux: the rlimit still stops core files
        dumpable = None
    return CoreLimit(soft, hard), dumpable


def parent_death_signal(signum: int, parent: int) -> None:
    """In a child between fork and exec: get ``signum`` when the thread that forked it ends. If the
    parent (pid ``parent``) is gone already, the signal is sent at once, as the kernel would have."""
    _prctl(PR_SET_PDEATHSIG, signum)
    if os.getppid() != parent:
        os.kill(os.getpid(), signum)


def unblock_all_signals() -> None:
    """In a child before exec: no signal blocked, whatever the parent blocks."""
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
