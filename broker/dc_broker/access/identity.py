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

The program is read as the broker's namespace sees it: ``/proc/PID/exe`` is stat'ed through the
magic link, so ``exe_file`` is the (device, inode) of the file the caller runs, whatever its own mount
namespace calls it, and ``own_mount_ns`` says whether ``/proc/PID/ns/mnt`` is one whose paths the
rules mean (``mount_namespaces``: the broker's own, or the host's, pid 1's, when the broker may read
it; under the system unit the broker's own is private to it). The path (``readlink``) is kept for
messages only. ``hash_program`` reads the program's content for
``exe-sha256`` rules; it is blocking and is run in a worker thread (``dc_broker.access.programs``).

Must never: trust a path from a process's own cgroup names beyond that rule, compare a program by
the path it was started under, or read more than ``MAX_EXE_BYTES`` of a program.
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
from typing import NamedTuple

from dc_broker.access.rules import Identity

log = logging.getLogger("dc_broker.identity")

_UCRED = struct.Struct("3i")
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_UNIT = re.compile(r"^[^/]+\.(?:service|scope|socket|mount|swap|device|target|timer|path)$")
_USER_MANAGER = re.compile(r"^user@(\d+)\.service$")
#: programs larger than this are never hashed (an exe-sha256 rule does not match them)
MAX_EXE_BYTES = 128 * 1024 * 1024
#: bytes read and hashed per step (each step takes the GIL twice)
_HASH_CHUNK = 4 * 1024 * 1024
_MOUNT_NAMESPACES: dict[str, frozenset[str]] = {}


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


def identify(pid: int, uid: int, gid: int, *, accepted_at: float, proc: str = "/proc") -> Identity:
    """Full identity of a connected peer (its program's hash aside: ``hash_program``).
    ``accepted_at`` is ``boottime()`` when it was accepted."""
    user = None
    with contextlib.suppress(KeyError):
        user = pwd.getpwuid(uid).pw_name
    groups: set[int] = {gid}
    units = Units(None)
    program = _Program()
    dirfd, status = _open_process(pid, uid, accepted_at, proc)
    if dirfd >= 0:
        try:
            m = re.search(r"^Groups:[ \t]*([0-9 \t]*)$", status, re.M)
            if m:
                groups.update(int(g) for g in m.group(1).split())
            units = units_from_cgroup(_read(dirfd, "cgroup") or "")
            program = _program(dirfd, pid, proc)
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
        exe=program.path,
        exe_file=program.file,
        exe_stamp=program.stamp,
        own_mount_ns=program.own_mount_ns,
    )


def _open_process(pid: int, uid: int, accepted_at: float, proc: str) -> tuple[int, str]:
    """A directory fd on ``/proc/PID`` and its ``status``, if that process is the one that
    connected (it started before the connection was accepted and runs as ``uid``); else (-1, "")."""
    try:
        dirfd = os.open(f"{proc}/{pid}", os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return -1, ""
    stat = _read(dirfd, "stat")
    status = _read(dirfd, "status") if stat is not None and _start_seconds(stat) <= accepted_at + 0.05 else None
    proc_uid = re.search(r"^Uid:\s+(\d+)", status or "", re.M)
    if status is None or proc_uid is None or int(proc_uid.group(1)) != uid:
        os.close(dirfd)
        return -1, ""
    return dirfd, status


class _Program(NamedTuple):
    path: str | None = None
    file: tuple[int, int] | None = None
    stamp: tuple[int, int, int, int, int] | None = None
    own_mount_ns: bool = False


def mount_namespaces(proc: str = "/proc") -> frozenset[str]:
    """The mount namespaces whose paths an ``exe:`` rule means, read once: the broker's own
    (``/proc/self/ns/mnt``) and the host's, pid 1's (``/proc/1/ns/mnt``), where the broker may read
    it (root, or CAP_SYS_PTRACE, which reading another uid's ``/proc/PID/exe`` needs anyway). Under
    the system unit (ProtectSystem, PrivateTmp, PrivateMounts...) the broker's own namespace is
    private to it and no caller shares it, but its ``/usr`` and ``/etc`` are the host's files
    (read-only bind mounts: the same device and inode), so the host's callers are the ones the
    administrator's paths mean. Neither readable: the empty set, and no caller is in one."""
    found = _MOUNT_NAMESPACES.get(proc)
    if found is None:
        names = set()
        for who in ("self", "1"):
            with contextlib.suppress(OSError):
                names.add(os.readlink(f"{proc}/{who}/ns/mnt"))
        found = _MOUNT_NAMESPACES[proc] = frozenset(names)
    return found


def _program(dirfd: int, pid: int, proc: str) -> _Program:
    """The program the process runs, as the broker's namespace sees it: the file behind
    ``/proc/PID/exe`` (stat'ed through the link), its path for messages, and whether the process
    is in a mount namespace whose paths the rules mean (``mount_namespaces``). Another user's needs
    root or CAP_SYS_PTRACE; without it: nothing (exe rules then deny)."""
    try:
        path = os.readlink("exe", dir_fd=dirfd)
        st = os.stat("exe", dir_fd=dirfd)
    except OSError as exc:
        log.debug("cannot read /proc/%d/exe: %s", pid, exc.strerror)
        return _Program()
    try:
        ns = os.readlink("ns/mnt", dir_fd=dirfd)
    except OSError:
        ns = None
    stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    regular = statmod.S_ISREG(st.st_mode)
    meant = ns is not None and ns in mount_namespaces(proc)
    return _Program(path, (st.st_dev, st.st_ino), stamp if regular else None, meant)


def hash_program(
    pid: int, uid: int, accepted_at: float, stamp: tuple[int, int, int, int, int], proc: str = "/proc"
) -> str | None:
    """The SHA-256 of the program process ``pid`` runs, if it is still the file ``stamp`` names
    (device, inode, size and times as ``identify`` saw them) and at most ``MAX_EXE_BYTES``; else
    None. Blocking (up to 128 MiB read): run it in a worker thread."""
    if stamp[2] > MAX_EXE_BYTES:
        return None
    dirfd, _ = _open_process(pid, uid, accepted_at, proc)
    if dirfd < 0:
        return None
    try:
        fd = os.open("exe", os.O_RDONLY | os.O_CLOEXEC, dir_fd=dirfd)
    except OSError as exc:
        log.debug("cannot open /proc/%d/exe: %s", pid, exc.strerror)
        return None
    finally:
        os.close(dirfd)
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) != stamp:
            return None  # not the file the identity was read from (it changed, or the process exec'd)
        h = hashlib.sha256()
        buffer = bytearray(_HASH_CHUNK)  # one buffer: no allocation (and munmap) per chunk
        view = memoryview(buffer)
        left = st.st_size
        while left > 0 and (got := os.readv(fd, [view[: min(_HASH_CHUNK, left)]])):
            h.update(view[:got])  # hashlib lets go of the GIL for the whole chunk
            left -= got
        after = os.fstat(fd)
        if left or (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != stamp[2:]:
            return None  # changed while it was read: not the file the identity names
        return h.hexdigest()
    except OSError as exc:
        log.debug("cannot read /proc/%d/exe: %s", pid, exc.strerror)
        return None
    finally:
        os.close(fd)


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
