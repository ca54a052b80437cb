"""The proxy's caller from the kernel (dc_broker.access.peer): the netlink answers read exactly
(built byte by byte as linux/inet_diag.h lays them out), then the real kernel asked about real
loopback connections, and the holder check against this process's own file descriptors."""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator

import pytest

from dc_broker.access.peer import (
    NLMSG_ERROR,
    SOCK_DIAG_BY_FAMILY,
    Known,
    SockDiag,
    Unknown,
    diag_answer,
    diag_request,
    holder,
    peer,
)

CLIENT = ("127.0.0.1", 40000)
SERVER = ("127.0.0.1", 8765)


def answer(
    *,
    state: int = 1,
    uid: int = 1000,
    inode: int = 4242,
    seq: int = 7,
    client: tuple[str, int] = CLIENT,
    server: tuple[str, int] = SERVER,
    family: int = socket.AF_INET,
) -> bytes:
    """An inet_diag_msg as the kernel sends it: nlmsghdr, then family/state/timer/retrans, the
    sockid (ports big-endian, 16-byte addresses, interface, cookie), expires/rqueue/wqueue/uid/inode."""
    src = socket.inet_pton(family, client[0]).ljust(16, b"\0")
    dst = socket.inet_pton(family, server[0]).ljust(16, b"\0")
    body = struct.pack("=BBBB", family, state, 0, 0) + struct.pack("!HH16s16s", client[1], server[1], src, dst)
    body += struct.pack("=III", 1, 11, 12) + struct.pack("=IIIII", 0, 0, 0, uid, inode)
    return struct.pack("=IHHII", 16 + len(body), SOCK_DIAG_BY_FAMILY, 0, seq, 0) + body


def error(code: int, seq: int = 7) -> bytes:
    return struct.pack("=IHHII", 36, NLMSG_ERROR, 0, seq, 0) + struct.pack("=i", -code) + b"\0" * 16


def test_the_request_names_the_one_socket() -> None:
    raw = diag_request(socket.AF_INET, CLIENT, SERVER, 7)
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", raw)
    assert (length, kind, flags, seq) == (len(raw), SOCK_DIAG_BY_FAMILY, 1, 7)  # NLM_F_REQUEST, no NLM_F_DUMP
    family, protocol = struct.unpack_from("=BB", raw, 16)
    sport, dport, src, dst = struct.unpack_from("!HH16s16s", raw, 24)
    assert (family, protocol, sport, dport) == (socket.AF_INET, socket.IPPROTO_TCP, 40000, 8765)
    assert (src[:4], dst[:4]) == (bytes([127, 0, 0, 1]), bytes([127, 0, 0, 1]))
    assert struct.unpack_from("=III", raw, 24 + 36) == (0, 0xFFFFFFFF, 0xFFFFFFFF)  # any interface, no cookie


def test_an_established_socket_with_an_inode_names_its_uid() -> None:
    assert diag_answer(answer(), 7, CLIENT, SERVER) == Known(1000, 4242)
    six = answer(client=("::1", 40000), server=("::1", 8765), family=socket.AF_INET6)
    assert diag_answer(six, 7, ("::1", 40000), ("::1", 8765)) == Known(1000, 4242)
    # a v4-mapped address on an IPv6 socket is the IPv4 socket the kernel answers about
    assert diag_answer(answer(), 7, ("::ffff:127.0.0.1", 40000), ("::ffff:127.0.0.1", 8765)) == Known(1000, 4242)


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        (answer(state=4, uid=0, inode=0), "FIN_WAIT1, not ESTABLISHED (it closed)"),  # closed at once: uid 0!
        (answer(state=6, uid=0, inode=0), "TIME_WAIT, not ESTABLISHED"),
        (answer(state=1, uid=0, inode=0), "has no inode (no process holds it)"),
        (answer(client=("127.0.0.1", 40001)), "names another socket"),
        (answer(server=("127.0.0.2", 8765)), "names another socket"),
        (error(errno.ENOENT), "is gone (it closed before it was checked)"),
        (error(errno.EPERM), "lookup failed: Operation not permitted"),
        (answer()[:40], "not a socket"),
        (b"\0" * 8, "truncated"),
    ],
    ids=["fin-wait", "time-wait", "no-inode", "other-client", "other-server", "enoent", "eperm", "short", "runt"],
)
def test_every_doubt_is_a_refusal(reply: bytes, why: str) -> None:
    found = diag_answer(reply, 7, CLIENT, SERVER)
    assert isinstance(found, Unknown) and why in found.why, found


def test_an_answer_to_an_older_question_is_passed_over() -> None:
    assert diag_answer(answer(seq=6), 7, CLIENT, SERVER) is None


# ---------------------------------------------------------------- the real kernel


@pytest.fixture
def diag() -> Iterator[SockDiag]:
    d = SockDiag()
    yield d
    d.close()


def connected(family: int = socket.AF_INET, host: str = "127.0.0.1") -> tuple[socket.socket, socket.socket]:
    with socket.socket(family) as listener:
        listener.bind((host, 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname()[:2])
        server, _ = listener.accept()
    return client, server


def test_the_kernel_names_this_process_for_its_own_connection(diag: SockDiag) -> None:
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        client, server = connected(family, host)
        with client, server:
            found = peer(server, diag)
            assert isinstance(found, Known) and found.uid == os.geteuid()
            assert found.inode == os.fstat(client.fileno()).st_ino  # the client end, not ours
            assert holder(found.inode, os.geteuid()) == os.getpid()
            assert holder(found.inode, os.geteuid(), first=[1, os.getpid()]) == os.getpid()
            assert holder(found.inode, os.geteuid() + 1) is None  # held, but not by a process of that uid


def test_a_client_that_closed_at_once_is_not_named(diag: SockDiag) -> None:
    client, server = connected()
    with server:
        client.sendall(b"GET / HTTP/1.1\r\n\r\n")
        client.close()
        found = peer(server, diag)
        assert isinstance(found, Unknown) and "not ESTABLISHED" in found.why, found


def test_a_socket_no_process_holds_has_no_holder(diag: SockDiag) -> None:
    client, server = connected()
    with client, server:
        found = peer(server, diag)
        assert isinstance(found, Known) and found.inode is not None
    assert holder(found.inode, os.geteuid()) is None  # closed since: no process holds that inode


def test_a_unix_socket_is_named_by_so_peercred(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "s")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen(1)
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)
            server, _ = listener.accept()
            client.close()  # credentials are fixed at connect: closing changes nothing
            with server:
                assert peer(server, None) == Known(os.geteuid(), None)
