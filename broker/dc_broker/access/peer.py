"""Who is on the other end of an accepted stream socket, from the kernel, for listeners that are not
the broker's own socket (``dc-broker proxy``): ``SO_PEERCRED`` on a Unix socket, and on loopback TCP
the client end's owner, asked of the kernel for that one socket (``sock_diag``), then checked against
the processes that hold it.

A Unix socket's credentials are fixed when the client connects (``identity.peer_credentials``):
nothing the client does later changes them. TCP has no such thing, so for a connection from
``client`` to ``server`` this module asks:

1. ``SockDiag.owner``: the kernel's record of the socket whose local end is ``client`` and remote
   end ``server`` (an exact 4-tuple lookup, netlink ``SOCK_DIAG_BY_FAMILY`` without ``NLM_F_DUMP``:
   one socket, not the table). It must be ``ESTABLISHED`` and have a non-zero inode, the answer must
   name exactly the asked addresses and ports, and its uid is the uid of whoever created it. A
   client that connected, sent and closed at once has left an orphan (``FIN_WAIT*``, uid 0, inode
   0): refused, never read as root's.
2. ``holder``: a process whose real and effective uid are that uid holds the inode
   (``/proc/PID/fd/* -> socket:[INODE]``). A socket created by one user and now held only by
   another's process (passed over a Unix socket, or kept across a privilege drop) is refused.

Anything uncertain is a refusal (``Unknown`` with the reason): no answer, an error answer, an answer
for another socket, an unexpected state, inode 0, no holder, a ``/proc`` that cannot be read.

Why a small netlink call rather than pyroute2: the request and the answer are two fixed C structs
(``inet_diag_req_v2``, ``inet_diag_msg`` in ``linux/inet_diag.h``) packed with ``struct``; the
library (pyroute2 0.9.7: 233 modules, 1.7 MB) would join the daemon's install for them. Why not
``/proc/net/tcp``: reading it means parsing every socket on the host for each connection (94 ms with
6,300 sockets), on the event loop.

Cost: ``SockDiag.owner`` is one ``sendto`` and one ``recv`` (the kernel answers inside the
``sendto``), a few microseconds, fine on the event loop. ``holder`` walks ``/proc``: the caller runs
it in a thread, and passes the pids that held its earlier sockets first (a client usually connects
again from the same process).

Must never: say who a caller is when the kernel's answer leaves room for doubt; block the event
loop on a walk of ``/proc``.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from dc_broker.access.identity import peer_credentials

# linux/netlink.h, linux/sock_diag.h, linux/inet_diag.h, include/net/tcp_states.h
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 1
TCP_ESTABLISHED = 1
_NOCOOKIE = 0xFFFFFFFF
_STATES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
}
#: struct nlmsghdr: len, type, flags, seq, pid (host order)
_NLMSGHDR = struct.Struct("=IHHII")
#: struct inet_diag_req_v2: family, protocol, ext, pad, states; then the sockid
_REQ = struct.Struct("=BBBBI")
#: struct inet_diag_sockid: sport, dport (network order), src[16], dst[16], if, cookie[2]
_SOCKID = struct.Struct("!HH16s16s")
_SOCKID_TAIL = struct.Struct("=III")
#: struct inet_diag_msg: family, state, timer, retrans; sockid (48 bytes); expires, rqueue, wqueue, uid, inode
_MSG_HEAD = struct.Struct("=BBBB")
_MSG_TAIL = struct.Struct("=IIIII")
_SOCKID_SIZE = _SOCKID.size + _SOCKID_TAIL.size  # 48
_MSG_SIZE = _MSG_HEAD.size + _SOCKID_SIZE + _MSG_TAIL.size  # 72


@dataclass(frozen=True, slots=True)
class Known:
    """The kernel says ``uid`` made this connection. ``inode``: the client socket's inode (TCP),
    still to be matched to a process of ``uid`` (``holder``); None for ``SO_PEERCRED``, which needs
    no more."""

    uid: int
    inode: int | None = None


@dataclass(frozen=True, slots=True)
class Unknown:
    """The kernel's answer leaves the caller in doubt; ``why`` says how (for the refusal and the log)."""

    why: str


Peer = Known | Unknown


def _address(family: int, host: str) -> bytes:
    """The 16-byte ``idiag_src``/``idiag_dst`` field: network-order address, zero padded."""
    raw = socket.inet_pton(family, host.split("%")[0])
    return raw.ljust(16, b"\0")


def diag_request(family: int, client: tuple[str, int], server: tuple[str, int], seq: int) -> bytes:
    """The netlink message asking for the one TCP socket whose local end is ``client`` and remote
    end ``server`` (``family``: AF_INET or AF_INET6, as the accepted socket's)."""
    sockid = _SOCKID.pack(client[1], server[1], _address(family, client[0]), _address(family, server[0]))
    sockid += _SOCKID_TAIL.pack(0, _NOCOOKIE, _NOCOOKIE)  # any interface, no cookie: match by address
    body = _REQ.pack(family, socket.IPPROTO_TCP, 0, 0, 1 << TCP_ESTABLISHED) + sockid
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq, 0) + body


def _mapped(family: int, raw: bytes) -> bytes:
    """An address as 16 bytes, IPv4 as its v4-mapped IPv6 form, so both families compare."""
    return b"\0" * 10 + b"\xff\xff" + raw[:4] if family == socket.AF_INET else raw[:16]


def _same_end(family: int, raw: bytes, port: int, want: tuple[str, int]) -> bool:
    """An answer's address and port are the asked ones (a v4-mapped address equals its IPv4 form)."""
    host = want[0].split("%")[0]
    asked = socket.AF_INET6 if ":" in host else socket.AF_INET
    return port == want[1] and _mapped(family, raw) == _mapped(asked, socket.inet_pton(asked, host))


def diag_answer(data: bytes, seq: int, client: tuple[str, int], server: tuple[str, int]) -> Peer | None:
    """What one netlink datagram says about the asked socket; None if it answers another request
    (an older ``seq``: read on)."""
    if len(data) < _NLMSGHDR.size:
        return Unknown("the kernel's sock_diag answer is truncated")
    length, kind, _flags, got_seq, _pid = _NLMSGHDR.unpack_from(data)
    if got_seq != seq:
        return None
    if kind == NLMSG_ERROR:
        (code,) = struct.unpack_from("=i", data, _NLMSGHDR.size) if len(data) >= _NLMSGHDR.size + 4 else (0,)
        if -code == errno.ENOENT:
            return Unknown("the client's socket is gone (it closed before it was checked)")
        return Unknown(f"the kernel's sock_diag lookup failed: {os.strerror(-code) if code else 'no error code'}")
    if kind != SOCK_DIAG_BY_FAMILY or length < _NLMSGHDR.size + _MSG_SIZE or len(data) < _NLMSGHDR.size + _MSG_SIZE:
        return Unknown(f"the kernel's sock_diag answer is not a socket (message type {kind})")
    at = _NLMSGHDR.size
    family, state, _timer, _retrans = _MSG_HEAD.unpack_from(data, at)
    sport, dport, src, dst = _SOCKID.unpack_from(data, at + _MSG_HEAD.size)
    _expires, _rq, _wq, uid, inode = _MSG_TAIL.unpack_from(data, at + _MSG_HEAD.size + _SOCKID_SIZE)
    if family not in (socket.AF_INET, socket.AF_INET6) or not (
        _same_end(family, src, sport, client) and _same_end(family, dst, dport, server)
    ):
        return Unknown("the kernel's sock_diag answer names another socket")
    if state != TCP_ESTABLISHED:
        return Unknown(f"the client's socket is {_STATES.get(state, str(state))}, not ESTABLISHED (it closed)")
    if inode == 0:
        return Unknown("the client's socket has no inode (no process holds it)")
    return Known(uid, inode)


class SockDiag:
    """A netlink ``NETLINK_SOCK_DIAG`` socket for exact TCP lookups. Not thread-safe: one owner (the
    event loop) asks at a time, and every answer is read before the next question."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def owner(self, family: int, client: tuple[str, int], server: tuple[str, int]) -> Peer:
        """The kernel's record of the TCP socket from ``client`` to ``server`` (see ``diag_answer``)."""
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        try:
            self._sock.sendto(diag_request(family, client, server, self._seq), (0, 0))
            while True:
                # the kernel queues its answer before sendto returns: nothing to wait for
                answer = diag_answer(self._sock.recv(65536, socket.MSG_DONTWAIT), self._seq, client, server)
                if answer is not None:
                    return answer
        except BlockingIOError:
            return Unknown("the kernel gave no sock_diag answer")
        except (OSError, ValueError) as exc:
            return Unknown(f"the kernel's sock_diag lookup failed: {exc}")


def peer(sock: socket.socket, diag: SockDiag | None) -> Peer:
    """Who connected ``sock`` (accepted from a listener): ``SO_PEERCRED`` on a Unix socket; on TCP
    ``diag.owner`` for the connection's exact ends (``holder`` is the caller's second step)."""
    if sock.family == socket.AF_UNIX:
        _pid, uid, _gid = peer_credentials(sock)
        return Known(uid)
    if diag is None:
        return Unknown("no sock_diag socket to ask who is calling")
    try:
        client, server = sock.getpeername()[:2], sock.getsockname()[:2]
    except OSError:
        return Unknown("the client's socket is gone (it closed before it was checked)")
    return diag.owner(sock.family, client, server)


def _pids(proc: str) -> Iterator[int]:
    """Every pid in ``proc``, newest (highest) first: a client has usually started recently."""
    yield from sorted((int(name) for name in os.listdir(proc) if name.isdigit()), reverse=True)


def _runs_as(proc: str, pid: int, uid: int) -> bool:
    """Real and effective uid of ``pid`` are both ``uid`` (/proc/PID/status ``Uid:`` real, effective, ...)."""
    try:
        with open(f"{proc}/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    real, effective = line.split()[1:3]
                    return int(real) == uid and int(effective) == uid
    except (OSError, ValueError):
        return False
    return False


def _holds(proc: str, pid: int, link: str) -> bool:
    try:
        fds = os.open(f"{proc}/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False  # gone, or not ours to read (another user's, or not dumpable)
    try:
        for name in os.listdir(fds):
            try:
                if os.readlink(name, dir_fd=fds) == link:
                    return True
            except OSError:
                continue  # closed while we looked
        return False
    except OSError:
        return False
    finally:
        os.close(fds)


def holder(inode: int, uid: int, *, first: Iterable[int] = (), proc: str = "/proc") -> int | None:
    """The pid of a process whose real and effective uid are ``uid`` and that holds the socket
    ``inode``, else None. ``first``: pids to try before the rest (those that held earlier sockets).
    Reads /proc: call it from a thread. Processes of other users are passed over by the owner of
    their /proc directory (their effective uid) before any fd is read."""
    link = f"socket:[{inode}]"
    tried: set[int] = set()
    for pid in itertools.chain(first, _pids(proc)):
        if pid in tried:
            continue
        tried.add(pid)
        try:
            owner = os.stat(f"{proc}/{pid}").st_uid  # the effective uid (root for a process not dumpable)
        except OSError:
            continue
        if owner not in (uid, 0):
            continue
        if _holds(proc, pid, link) and _runs_as(proc, pid, uid):
            return pid
    return None
