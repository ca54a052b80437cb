"""The caller's identity from the kernel: SO_PEERCRED, /proc and the user/group databases.

Nothing the client says about itself counts. uid, gid and pid come from SO_PEERCRED (fixed when the
client connected). Supplementary groups, the systemd units and the program come from ``/proc/PID``,
which is read through one directory file descriptor, and only after checking that the process behind
it started before the connection was accepted: if the client exited and its pid was reused, the new
process is younger than the connection, and we refuse to take its groups, units or program (uid/gid
rules still work).

Units follow systemd's own rule: a process's unit is the first cgroup path component below the
slices (``/system.slice/report.service/anything`` is in ``report.service``). A user manager is the
system unit ``user@UID.service``; the user unit is the first non-slice component below it. Nothing a
process can create itself (a user manager's tree, a delegated unit's sub-cgroups) changes its system
unit.

Must never: trust a path from a process's own cgroup names beyond that rule, or block the event loop
on an unbounded read (the program's hash reads at most ``MAX_EXE_BYTES``, once per inode: it is
cached by device, inode, size and times, so only a caller's first connection from a new program pays).
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import logging
import os
import pwd
import re
import socket
import stat as statmod
import struct
import time
from collections import OrderedDict
from typing import NamedTuple

from dc_broker.access.rules import Identity

log = logging.getLogger("dc_broker.identity")

_UCRED = struct.Struct("3i")
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_UNIT = re.compile(r"^[^/]+\.(?:service|scope|socket|mount|swap|device|target|timer|path)$")
_USER_MANAGER = re.compile(r"^user@(\d+)\.service$")
#: programs larger than this are never hashed (an exe-sha256 rule does not match them)
MAX_EXE_BYTES = 128 * 1024 * 1024
_HASHES: OrderedDict[tuple[int, int, int, int, int], str] = OrderedDict()
_HASH_CACHE_SIZE = 256


class Units(NamedTuple):
    """The units of a cgroup path: the system unit, and (inside a user manager) the user unit and
    the manager's uid."""

    system: str | None
    user: str | None = None
    user_uid: int | None = None


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of whoever connected ``sock``."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return pid, uid, gid


def boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def _first_unit(components: list[str]) -> tuple[str | None, list[str]]:
    """The first non-slice component (if it is a unit) and the components below it."""
    for i, component in enumerate(components):
        if component.endswith(".slice"):
            continue
        return (component if _UNIT.match(component) else None), components[i + 1 :]
    return None, []


def units_from_cgroup(text: str) -> Units:
    """The systemd units in a /proc/PID/cgroup file (cgroup v2 ``0::`` line, else v1 ``name=systemd``)."""
    paths = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            paths[parts[1]] = parts[2]
    for hierarchy in ("", "name=systemd"):  # unified first; the v1 named hierarchy on hybrid systems
        components = [c for c in paths.get(hierarchy, "").split("/") if c]
        system, below = _first_unit(components)
        if system is None:
            continue
        manager = _USER_MANAGER.match(system)
        if manager is None:
            return Units(system)
        user, _ = _first_unit(below)
        return Units(system, user, int(manager.group(1)) if user else None)
    return Units(None)


def unit_from_cgroup(text: str) -> str | None:
    """The system unit in a /proc/PID/cgroup file (see ``units_from_cgroup``)."""
    return units_from_cgroup(text).system


def _start_seconds(stat: str) -> float:
    # field 22 (starttime, clock ticks since boot); the command name (field 2) may contain spaces
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19]) / _CLK_TCK


def identify(
    pid: int, uid: int, gid: int, *, accepted_at: float, proc: str = "/proc", exe_hash: bool = False
) -> Identity:
    """Full identity of a connected peer. ``accepted_at`` is ``boottime()`` when it was accepted;
    ``exe_hash`` also hashes its program (for ``exe-sha256`` rules)."""
    user = None
    with contextlib.suppress(KeyError):
        user = pwd.getpwuid(uid).pw_name
    groups: set[int] = {gid}
    units = Units(None)
    exe = digest = None
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
                    units = units_from_cgroup(_read(dirfd, "cgroup") or "")
                    exe, digest = _program(dirfd, pid, exe_hash)
        finally:
            os.close(dirfd)
    names = set()
    for g in groups:
        with contextlib.suppress(KeyError):
            names.add(grp.getgrgid(g).gr_name)
    return Identity(
        uid=uid,
        gid=gid,
        pid=pid,
        user=user,
        groups=frozenset(groups),
        group_names=frozenset(names),
        unit=units.system,
        user_unit=units.user,
        user_unit_uid=units.user_uid,
        exe=exe,
        exe_sha256=digest,
    )


def _program(dirfd: int, pid: int, want_hash: bool) -> tuple[str | None, str | None]:
    """The path of the program (``/proc/PID/exe``) and, if asked, its content hash. Reading another
    user's ``exe`` needs root or CAP_SYS_PTRACE; without it both are None (exe rules then deny)."""
    try:
        path = os.readlink("exe", dir_fd=dirfd)
    except OSError as exc:
        log.debug("cannot read /proc/%d/exe: %s", pid, exc.strerror)
        return None, None
    # a program deleted (or replaced) on disk reads "PATH (deleted)": it never equals an exe rule
    if not want_hash:
        return path, None
    try:
        fd = os.open("exe", os.O_RDONLY | os.O_CLOEXEC, dir_fd=dirfd)
    except OSError as exc:
        log.debug("cannot open /proc/%d/exe: %s", pid, exc.strerror)
        return path, None
    try:
        return path, _hash_program(fd)
    finally:
        os.close(fd)


def _hash_program(fd: int) -> str | None:
    st = os.fstat(fd)
    if not statmod.S_ISREG(st.st_mode) or st.st_size > MAX_EXE_BYTES:
        return None
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    cached = _HASHES.get(key)
    if cached is not None:
        _HASHES.move_to_end(key)
        return cached
    h = hashlib.sha256()
    while chunk := os.read(fd, 1 << 20):
        h.update(chunk)
    digest = h.hexdigest()
    _HASHES[key] = digest
    if len(_HASHES) > _HASH_CACHE_SIZE:
        _HASHES.popitem(last=False)
    return digest


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
