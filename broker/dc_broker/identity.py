"""The caller's identity from the kernel: SO_PEERCRED, /proc and the user/group databases.

Nothing the client says about itself counts. uid, gid and pid come from SO_PEERCRED (fixed when the
client connected). Supplementary groups and the systemd unit come from ``/proc/PID``, which is read
through one directory file descriptor, and only after checking that the process behind it started
before the connection was accepted: if the client exited and its pid was reused, the new process is
younger than the connection, and we refuse to take its groups or unit (uid/gid rules still work).
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import socket
import struct
import time

from dc_broker.acl import Identity

_UCRED = struct.Struct("3i")
_CLK_TCK = os.sysconf("SC_CLK_TCK")
# the unit is the innermost *.service / *.scope in the cgroup path (user units live under user@UID.service)
_UNIT = re.compile(r"([^/]+\.(?:service|scope|socket))$")


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of whoever connected ``sock``."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return pid, uid, gid


def boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def unit_from_cgroup(text: str) -> str | None:
    """The systemd unit in a /proc/PID/cgroup file (cgroup v2 ``0::`` line, or v1 ``name=systemd``)."""
    paths = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            paths[parts[1]] = parts[2]
    for hierarchy in ("", "name=systemd"):  # unified first; the v1 named hierarchy on hybrid systems
        for component in reversed([c for c in paths.get(hierarchy, "").split("/") if c]):
            m = _UNIT.match(component)
            if m and not component.startswith("user@"):
                return m.group(1)
    return None


def _start_seconds(stat: str) -> float:
    # field 22 (starttime, clock ticks since boot); the command name (field 2) may contain spaces
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19]) / _CLK_TCK


def identify(pid: int, uid: int, gid: int, *, accepted_at: float, proc: str = "/proc") -> Identity:
    """Full identity of a connected peer. ``accepted_at`` is ``boottime()`` when it was accepted."""
    user = group_names = None
    with contextlib.suppress(KeyError):
        user = pwd.getpwuid(uid).pw_name
    groups: set[int] = {gid}
    unit: str | None = None
    try:
        dirfd = os.open(f"{proc}/{pid}", os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        dirfd = -1
    if dirfd >= 0:
        try:
            stat = _read(dirfd, "stat")
            if stat is not None and _start_seconds(stat) <= accepted_at + 0.05:
                status = _read(dirfd, "status") or ""
                proc_uid = re.search(r"^Uid:\s+(\d+)", status, re.M)
                if proc_uid and int(proc_uid.group(1)) == uid:
                    m = re.search(r"^Groups:[ \t]*([0-9 \t]*)$", status, re.M)
                    if m:
                        groups.update(int(g) for g in m.group(1).split())
                    unit = unit_from_cgroup(_read(dirfd, "cgroup") or "")
        finally:
            os.close(dirfd)
    names = set()
    for g in groups:
        with contextlib.suppress(KeyError):
            names.add(grp.getgrgid(g).gr_name)
    group_names = frozenset(names)
    return Identity(uid=uid, gid=gid, pid=pid, user=user, groups=frozenset(groups), group_names=group_names, unit=unit)


def _read(dirfd: int, name: str) -> str | None:
    try:
        fd = os.open(name, os.O_RDONLY, dir_fd=dirfd)
    except OSError:
        return None
    try:
        return os.read(fd, 65536).decode("utf-8", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)
