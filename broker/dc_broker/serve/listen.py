"""The broker's listening Unix socket: private directory, 0600 socket, stale-socket cleanup and
"one daemon per socket".

``bind_unix_socket(path)`` returns a listening stdlib socket plus the open lock file that proves this
process owns the path. The lock (``flock`` on ``<socket>.lock`` next to the socket) is taken *before*
any stale socket is removed, so two daemons starting at once cannot unlink each other's socket: the
loser gets ``AlreadyRunning`` naming the path. A socket file left by a crashed daemon (lock free,
connect refused) is removed and re-created. The lock file is opened with O_NOFOLLOW (a symlink planted
there is refused, never followed).

A directory the broker creates is 0700. An existing directory is used as is when it is ours, unless it
is the default per-user directory and its mode lets others in, which is refused.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
from typing import IO

from dc_broker.errors import ConfigError


class AlreadyRunning(ConfigError):
    """Another dc-broker holds this socket."""


def _ensure_private_dir(directory: str, *, strict: bool) -> None:
    try:
        os.makedirs(directory, mode=0o700, exist_ok=False)
        os.chmod(directory, 0o700)  # makedirs honours the umask; be exact
        return
    except FileExistsError:
        pass
    st = os.stat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{directory} exists and is not a directory; remove it or choose another socket path")
    if strict:
        if st.st_uid != os.getuid():
            raise ConfigError(
                f"socket directory {directory} belongs to uid {st.st_uid}, not you; remove it or set DC_BROKER_SOCKET"
            )
        if st.st_mode & 0o077:
            raise ConfigError(
                f"socket directory {directory} has mode {stat.S_IMODE(st.st_mode):o}; "
                f"run `chmod 700 {directory}` (it must be private)"
            )


def bind_unix_socket(
    path: str, *, mode: int = 0o600, strict_dir: bool = True, backlog: int = 1024
) -> tuple[socket.socket, IO[bytes]]:
    """Bind and listen on ``path``; see the module docstring. Raises AlreadyRunning or ConfigError."""
    path = os.path.abspath(path)
    if len(path.encode()) > 107:
        raise ConfigError(f"socket path {path} is longer than the 107 bytes a Unix socket allows; choose a shorter one")
    _ensure_private_dir(os.path.dirname(path), strict=strict_dir)
    lock_path = path + ".lock"
    try:  # never through a symlink (someone else's file), like the vault's lock
        fd = os.open(lock_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(
                f"{lock_path} is a symbolic link; remove it (the broker's lock must be its own file)"
            ) from None
        raise ConfigError(f"cannot create the lock file {lock_path}: {exc.strerror}") from None
    lock = os.fdopen(fd, "ab")
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise AlreadyRunning(
            f"another dc-broker is already serving on {path}; stop it first (`dc-broker status` talks to it)"
        ) from None
    try:
        _remove_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o777 & ~mode)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        lock.close()
        raise
    return sock, lock


def _remove_stale(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{path} exists and is not a socket; remove it or choose another socket path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ConfigError(f"cannot check the existing socket {path}: {exc.strerror}") from None
    else:
        raise AlreadyRunning(f"another process is already listening on {path}; stop it first")
    finally:
        probe.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def release(path: str, sock: socket.socket, lock: IO[bytes]) -> None:
    """Close and remove our socket (only while we still hold the lock, so we never remove another's)."""
    sock.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.abspath(path))
    lock.close()
