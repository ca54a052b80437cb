"""The one way dc-broker writes a file, and the rule for the directories it writes in.

``write`` replaces (or, ``new_only``, creates) a file so that a reader sees the old complete file or
the new complete file, never a partial or empty one, and a crash leaves one of the two:

1. the directory is opened once, walked from ``/`` one component at a time with ``O_NOFOLLOW``
   (``open_directory``): a symbolic link swapped in anywhere on the way fails the walk, and every
   later step is relative to that one open directory, whatever happens to its path meanwhile;
2. a temporary file is created in it (``O_CREAT|O_EXCL|O_NOFOLLOW``, a random name), given its
   owner, group and mode (an existing file's, unless the caller names them), written and fsynced;
   an existing file of another owner in a directory others may add files to (sticky ``/tmp``) is
   refused instead: anyone could have made it there, and its owner would get what is written;
3. it is renamed over the target (``new_only``: linked, which fails if the target exists), and the
   directory is fsynced, so the rename itself survives a power cut.

The directory rule (``safe=True``: token files and key files) is OpenSSH's StrictModes, applied to
every directory from the file's up to ``/``: each must be owned by the writer (the effective uid) or
root, and writable by nobody else, unless it is sticky (``/tmp``: others may add files but not
replace ours). Anyone else who may write a directory on the path could swap the file or a
directory above it. The check runs on the opened directories (``fstat``), at every write, so a
directory made unsafe after start is refused at the next write.

Must never: follow a symbolic link for the file itself, leave a temporary file behind, or write a
byte through a path that failed the rule. Blocking: run it in a worker thread from trio.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import secrets
import stat
from typing import Final

from dc_broker.errors import ConfigError

_DIR_FLAGS: Final = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeDirectory(ConfigError):
    """A directory on the way to a file fails the rule: ``directory`` names it, the message says why."""

    def __init__(self, directory: str, why: str) -> None:
        super().__init__(f"{directory} {why}")
        self.directory = directory
        self.why = why


RULE: Final = (
    "every directory from the file's up to / must be owned by you or root and writable by no one else "
    "(sticky directories like /tmp excepted), as OpenSSH's StrictModes asks"
)


def _owner_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _group_name(gid: int) -> str:
    try:
        return f"group {grp.getgrgid(gid).gr_name}"
    except KeyError:
        return f"gid {gid}"


def directory_problem(st: os.stat_result, uid: int | None = None) -> str | None:
    """Why a directory with this ``stat`` fails the rule for a writer of ``uid`` (None: it passes)."""
    uid = os.geteuid() if uid is None else uid
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid not in (uid, 0):
        return f"belongs to {_owner_name(st.st_uid)}, who could replace what is in it"
    if mode & 0o022 and not mode & stat.S_ISVTX:
        who = " and ".join(w for bit, w in ((0o020, _group_name(st.st_gid)), (0o002, "every user")) if mode & bit)
        return f"has mode {mode:04o}: {who} may write in it and could replace what is in it"
    return None


def _shared(st: os.stat_result) -> bool:
    """A directory others may add files to (group- or world-writable: under the rule, ``safe``, only
    a sticky one such as /tmp gets this far)."""
    return bool(stat.S_IMODE(st.st_mode) & 0o022)


def open_directory(directory: str, *, create: bool = False, safe: bool = True) -> int:
    """An ``O_PATH`` descriptor of ``directory``, walked from ``/`` without following a link, each
    component checked with the rule when ``safe``; missing components are made 0700 when ``create``.
    The path is resolved once first (``realpath``), so a link configured on purpose (/var/run) is fine;
    one swapped in afterwards fails the walk. Raises ``UnsafeDirectory`` or ``OSError``."""
    real = os.path.realpath(directory)
    fd = os.open("/", _DIR_FLAGS)
    walked = "/"
    try:
        for part in ["", *(p for p in real.split("/") if p)]:
            if part:
                try:
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o700, dir_fd=fd)
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = child
                walked = os.path.join(walked, part)
            if safe and (problem := directory_problem(os.fstat(fd))) is not None:
                raise UnsafeDirectory(walked, problem)
        return fd
    except BaseException:
        os.close(fd)
        raise


def check_directory(directory: str) -> None:
    """Raise ``UnsafeDirectory`` if ``directory`` (or, while it does not exist yet, the part of it
    that does) fails the rule. What a command checks before it names a file the broker will write."""
    path = os.path.realpath(directory)
    while not os.path.exists(path) and path != "/":
        path = os.path.dirname(path)
    os.close(open_directory(path))


def write(
    path: str,
    data: bytes,
    *,
    mode: int | None = None,
    gid: int = -1,
    safe: bool = False,
    create_dirs: bool = False,
    new_only: bool = False,
) -> None:
    """Replace ``path`` with ``data`` as the module docstring says. ``mode``: exactly these bits
    (default: an existing file's, else 0600); ``gid``: this group (default: an existing file's owner
    and group, which then must be ours to give, else ours); ``safe``: the directory rule; ``new_only``:
    refuse (``FileExistsError``) if ``path`` exists."""
    directory, name = os.path.split(os.path.abspath(path))
    dfd = open_directory(directory, create=create_dirs, safe=safe)
    try:
        try:
            old: os.stat_result | None = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            old = None
        if old is not None and new_only:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)
        if old is not None and not stat.S_ISREG(old.st_mode):
            raise OSError(errno.EEXIST, "is not a regular file (a link, a directory...); not replaced", path)
        if old is not None and old.st_uid != os.geteuid() and _shared(os.fstat(dfd)):
            # anyone may add a file to a sticky shared directory (/tmp): one that is not ours was put
            # there by someone else, and its owner is not one to give what we write
            raise OSError(
                errno.EPERM,
                f"belongs to {_owner_name(old.st_uid)}, in a directory every user may add files to: someone "
                "else made it; not replaced (remove it, or write the file in a private directory)",
                path,
            )
        tmp = f".{name}.{secrets.token_hex(6)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        try:
            try:
                _own(fd, old, mode, gid, path)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            if new_only:
                os.link(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
                os.unlink(tmp, dir_fd=dfd)
            else:
                os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dfd)
            raise
        _fsync(dfd)
    finally:
        os.close(dfd)


def remove(path: str, *, safe: bool = False) -> bool:
    """Remove ``path`` (never following a link) and fsync its directory. Returns whether it was there."""
    directory, name = os.path.split(os.path.abspath(path))
    try:
        dfd = open_directory(directory, safe=safe)
    except FileNotFoundError:
        return False
    try:
        try:
            os.unlink(name, dir_fd=dfd)
        except FileNotFoundError:
            return False
        _fsync(dfd)
        return True
    finally:
        os.close(dfd)


def _own(fd: int, old: os.stat_result | None, mode: int | None, gid: int, path: str) -> None:
    """Give the new file its owner, group and mode (owner first: chown clears set-id bits)."""
    uid = -1
    if gid == -1 and old is not None and (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()):
        uid, gid = old.st_uid, old.st_gid
    if (uid, gid) != (-1, -1):
        try:
            os.fchown(fd, uid, gid)
        except PermissionError:
            whose = f"uid {uid}, gid {gid}" if uid != -1 else f"gid {gid}"
            why = f"cannot give the new file the owner it must have ({whose}); run this as root or as its owner"
            raise PermissionError(errno.EPERM, why, path) from None
    if mode is None:
        mode = stat.S_IMODE(old.st_mode) if old is not None else 0o600
    os.fchmod(fd, mode)  # exactly these bits, whatever the umask


def _fsync(dfd: int) -> None:
    """fsync a directory given by an ``O_PATH`` descriptor (which itself cannot be fsynced)."""
    try:
        rfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dfd)
    except PermissionError:
        return  # a directory we may write but not read (mode 0300): the rename stands, unsynced
    try:
        os.fsync(rfd)
    finally:
        os.close(rfd)
