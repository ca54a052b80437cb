"""The daemon's side of the systemd contract: readiness notification, socket activation, watchdog.

Owns reading ``NOTIFY_SOCKET``, ``LISTEN_PID``/``LISTEN_FDS``/``LISTEN_FDNAMES`` and
``WATCHDOG_USEC``/``WATCHDOG_PID`` and speaking the sd_notify datagram protocol. It is the protocol
only, written from the documented wire format (no libsystemd): every function works without systemd,
and does nothing when the variables are absent, so the same daemon runs under a unit, under
``systemd-socket-activate`` and in a terminal.

Pure parsers take the environment as a parameter (``environ``) and are tested without sockets; the
only I/O is one datagram per ``Notifier.send`` and the ``fstat`` of a passed fd. It never imports
trio, httpx or anything else heavy: the watchdog's timer task lives in ``dc_broker.daemon``.

    READY=1            once the socket accepts and sessions run
    STATUS=...         one human line: profile count and vault lock state
    RELOADING=1        on SIGHUP, followed by READY=1 when the new config is live
    STOPPING=1         on SIGTERM/SIGINT, before the drain
    WATCHDOG=1         every half WATCHDOG_USEC while the event loop is alive

Never put a secret into a notification: systemd shows STATUS= to anyone who runs ``systemctl status``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

#: the first passed fd (sd_listen_fds(3): SD_LISTEN_FDS_START)
LISTEN_FDS_START = 3
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class ActivationError(Exception):
    """The socket systemd passed cannot be served (wrong family/type, not listening)."""


def notify_address(value: str) -> str | bytes | None:
    """``$NOTIFY_SOCKET`` as a ``socket.sendto`` address: a path, or an abstract name (``@name``)."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock:... and other forms are not ours to speak


def format_notify(**fields: str | int) -> bytes:
    """``format_notify(READY=1, STATUS="3 profiles")`` -> b"READY=1\\nSTATUS=3 profiles"."""
    lines = []
    for key, value in fields.items():
        text = str(value)
        if "\n" in text:
            raise ValueError(f"notification field {key} must be one line")
        lines.append(f"{key}={text}")
    return "\n".join(lines).encode()


class Notifier:
    """Sends sd_notify datagrams to the address given at start; a no-op when there is none."""

    def __init__(self, address: str | bytes | None) -> None:
        self.address = address
        self._sock: socket.socket | None = None
        if address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = True) -> Notifier:
        """Read ``$NOTIFY_SOCKET`` (and remove it, so child processes do not notify for us)."""
        env = os.environ if environ is None else environ
        value = env.pop("NOTIFY_SOCKET", "") if unset else env.get("NOTIFY_SOCKET", "")
        return cls(notify_address(value))

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, **fields: str | int) -> bool:
        """Send one notification; False (never an exception) if it could not be delivered."""
        if self._sock is None or self.address is None:
            return False
        try:
            self._sock.sendto(format_notify(**fields), socket.MSG_DONTWAIT, self.address)
        except OSError:
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def listen_fd_count(environ: Mapping[str, str], pid: int) -> int:
    """How many fds systemd passed to ``pid`` (0 when not socket-activated, or meant for another pid)."""
    if environ.get("LISTEN_PID", "") != str(pid):
        return 0
    try:
        count = int(environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return 0
    return max(count, 0)


def listen_fds(environ: MutableMapping[str, str] | None = None, *, unset: bool = True) -> list[int]:
    """The passed listening fds (3, 4, ...), marked close-on-exec. The LISTEN_* variables are removed
    (``unset``) so that nothing we start believes the fds are meant for it."""
    env = os.environ if environ is None else environ
    count = listen_fd_count(env, os.getpid())
    if unset:
        for name in _LISTEN_VARS:
            env.pop(name, None)
    fds = list(range(LISTEN_FDS_START, LISTEN_FDS_START + count))
    for fd in fds:
        with contextlib.suppress(OSError):
            os.set_inheritable(fd, False)
    return fds


def listening_unix_socket(fd: int) -> socket.socket:
    """Wrap a passed fd as a non-blocking stdlib socket, checking it is a listening AF_UNIX stream."""
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise ActivationError(f"fd {fd} passed by systemd is not a socket; check ListenStream= in the .socket unit")
    except OSError as exc:
        raise ActivationError(f"fd {fd} passed by systemd is not open ({exc.strerror})") from None
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ActivationError(
            f"fd {fd} passed by systemd is {sock.family.name}/{sock.type.name}; dc-broker serves a Unix "
            "stream socket: use ListenStream=/path/to/broker.sock"
        )
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise ActivationError(f"fd {fd} passed by systemd is not listening; do not set Accept=yes")
    sock.setblocking(False)
    return sock


@dataclass(frozen=True, slots=True)
class Watchdog:
    """WatchdogSec= as the daemon sees it: ping every ``ping_every`` seconds."""

    timeout: float

    @property
    def ping_every(self) -> float:
        return self.timeout / 2


def watchdog(
    environ: MutableMapping[str, str] | None = None, *, pid: int | None = None, unset: bool = True
) -> Watchdog | None:
    """``WATCHDOG_USEC`` (if ``WATCHDOG_PID`` is unset or ours) as a Watchdog; None when not asked for."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    owner = env.get("WATCHDOG_PID", "")
    if unset:
        env.pop("WATCHDOG_USEC", None)
        env.pop("WATCHDOG_PID", None)
    if owner and owner != str(os.getpid() if pid is None else pid):
        return None
    try:
        micros = int(usec)
    except ValueError:
        return None
    return Watchdog(micros / 1e6) if micros > 0 else None
