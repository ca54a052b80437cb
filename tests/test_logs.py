"""The daemon's log forms (``dc_broker.logs``) as their readers decode them: journal entries in
systemd's native protocol, read off a bound datagram socket as journald reads them (a value with a
newline in its binary framing, a traceback, an entry too big for a datagram passed as a sealed memfd,
stderr with priority prefixes when the socket is gone), and the JSON form, one object per line.
The journal itself, under a real systemd, is tests/systemd/test_system_unit.py's.
"""

from __future__ import annotations

import array
import fcntl
import io
import json
import logging
import os
import socket
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dc_broker.logs import (
    JournalFormatter,
    JournalHandler,
    JsonFormatter,
    ProfileField,
    journal_message,
    journal_name,
    make_handler,
    stderr_is_journal,
)


def decode(data: bytes) -> dict[str, str]:
    """One native-protocol entry as journald parses it: ``NAME=value\\n``, or ``NAME\\n``, a 64-bit
    little-endian length, that many bytes, ``\\n``. Fails on anything else."""
    out: dict[str, str] = {}
    i = 0
    while i < len(data):
        end = data.index(b"\n", i)
        line = data[i:end]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            i = end + 1
        else:
            name = line
            (size,) = struct.unpack("<Q", data[end + 1 : end + 9])
            value = data[end + 9 : end + 9 + size]
            assert data[end + 9 + size : end + 10 + size] == b"\n", "a binary value ends with a newline"
            i = end + 10 + size
        key = name.decode("ascii")
        assert key not in out, f"field {key} twice"
        out[key] = value.decode("utf-8")
    return out


class Journal:
    """A bound SOCK_DGRAM socket standing in for /run/systemd/journal/socket."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(10)

    def entry(self) -> tuple[dict[str, str], str]:
        """The next entry, and how it came: "datagram", or "memfd" (a sealed memfd, no payload)."""
        data, ancdata, _flags, _addr = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(4 * array.array("i").itemsize))
        if not ancdata:
            return decode(data), "datagram"
        assert data == b"", "a memfd entry carries no payload of its own"
        ((level, kind, raw),) = ancdata
        assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
        fds = array.array("i")
        fds.frombytes(raw[: len(raw) - len(raw) % fds.itemsize])
        (fd,) = fds
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            wanted = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
            assert seals & wanted == wanted, "journald accepts only a sealed memfd"
            size = os.fstat(fd).st_size
            return decode(os.pread(fd, size, 0)), "memfd"
        finally:
            os.close(fd)

    def nothing_more(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(1)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(10)
        return False


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(tmp_path / "journal.sock")
    yield j
    j.sock.close()


def record(
    msg: str, *args: object, level: int = logging.INFO, fields: dict[str, Any] | None = None, exc: bool = False
) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("the vault said no\nsecond line")
        except ValueError:
            exc_info = sys.exc_info()
    rec = logging.LogRecord("dc_broker.sessions", level, __file__, 42, msg, args, exc_info, func="refresh")
    if fields is not None:
        rec.fields = fields
    return rec


# ---------------------------------------------------------------- the journal's native protocol


def test_a_record_is_one_entry_with_its_fields_as_journal_fields(journal: Journal) -> None:
    handler = JournalHandler(journal.path, fallback=io.StringIO())
    fields = {"event": "caller_refused", "profile": "acme", "caller_uid": 1002, "caller-exe": "/usr/bin/x",
              "_hidden": "y", "message": "not the message", "priority": 0}  # fmt: skip
    handler.emit(record("refused uid %d", 1002, level=logging.WARNING, fields=fields))
    handler.close()
    entry, how = journal.entry()
    assert how == "datagram"
    assert entry == {
        "MESSAGE": "dc_broker.sessions: refused uid 1002",
        "PRIORITY": "4",
        "SYSLOG_IDENTIFIER": "dc-broker",
        "LOGGER": "dc_broker.sessions",
        "CODE_FILE": __file__,
        "CODE_LINE": "42",
        "CODE_FUNC": "refresh",
        "EVENT": "caller_refused",
        "PROFILE": "acme",
        "CALLER_UID": "1002",
        "CALLER_EXE": "/usr/bin/x",  # what the journal allows in a name: A-Z, 0-9, _
        "HIDDEN": "y",  # a leading _ is the journal's own (trusted) field: never ours
    }  # a field named like one of the entry's own never replaces it
    assert journal.nothing_more()


def test_a_value_with_newlines_goes_in_the_binary_framing(journal: Journal) -> None:
    handler = JournalHandler(journal.path, fallback=io.StringIO())
    handler.emit(record("profile %s: two\nlines", "acme", fields={"detail": "a\nb\n", "empty": ""}))
    handler.close()
    entry, _ = journal.entry()
    assert entry["MESSAGE"] == "dc_broker.sessions: profile acme: two\nlines"
    assert entry["DETAIL"] == "a\nb\n" and entry["EMPTY"] == ""
    raw = journal_message({"MESSAGE": "x\ny", "A": "b"})
    assert raw == b"MESSAGE\n" + struct.pack("<Q", 3) + b"x\ny\nA=b\n"


def test_a_traceback_is_part_of_the_message_at_error_priority(journal: Journal) -> None:
    handler = JournalHandler(journal.path, fallback=io.StringIO())
    handler.emit(record("profile %s: refresh failed", "acme", level=logging.ERROR, exc=True))
    handler.close()
    entry, _ = journal.entry()
    message = entry["MESSAGE"].splitlines()
    assert entry["PRIORITY"] == "3"
    assert message[0] == "dc_broker.sessions: profile acme: refresh failed"
    assert message[1] == "Traceback (most recent call last):"
    assert message[-2:] == ["ValueError: the vault said no", "second line"]


def test_an_entry_over_a_datagram_goes_as_a_sealed_memfd(journal: Journal) -> None:
    handler = JournalHandler(journal.path, fallback=io.StringIO())
    big = "x" * 300_000 + "\nend"  # over the kernel's datagram limit (net.core.wmem_max, ~208 KiB)
    handler.emit(record("profile %s: big", "acme", fields={"detail": big}))
    handler.emit(record("after it"))  # the socket still works for the next one
    fallback = handler.fallback
    handler.close()
    entry, how = journal.entry()
    assert how == "memfd"
    assert entry["DETAIL"] == big and entry["MESSAGE"] == "dc_broker.sessions: profile acme: big"
    entry, how = journal.entry()
    assert (how, entry["MESSAGE"]) == ("datagram", "dc_broker.sessions: after it")
    assert isinstance(fallback, io.StringIO) and fallback.getvalue() == ""


def test_without_the_journal_socket_lines_go_to_stderr_with_priority_prefixes(tmp_path: Path) -> None:
    stderr = io.StringIO()
    handler = JournalHandler(str(tmp_path / "absent.sock"), fallback=stderr)
    handler.emit(record("profile %s: refresh failed", "acme", level=logging.ERROR, exc=True))
    handler.emit(record("ready", level=logging.DEBUG))
    handler.close()
    lines = stderr.getvalue().splitlines()
    assert lines[0] == "<3>dc_broker.sessions: profile acme: refresh failed"
    assert lines[1] == "<3>Traceback (most recent call last):"
    assert lines[-3:] == ["<3>ValueError: the vault said no", "<3>second line", "<7>dc_broker.sessions: ready"]
    assert all(line.startswith(("<3>", "<7>")) for line in lines)  # sd-daemon(3): every line its priority


def test_a_journal_that_stops_reading_falls_back_to_stderr(tmp_path: Path) -> None:
    """The socket file is there but nobody is bound to it any more (journald restarting)."""
    gone = Journal(tmp_path / "journal.sock")
    gone.sock.close()
    stderr = io.StringIO()
    handler = JournalHandler(gone.path, fallback=stderr)
    handler.emit(record("profile %s: still said", "acme", level=logging.WARNING))
    handler.close()
    assert stderr.getvalue() == "<4>dc_broker.sessions: profile acme: still said\n"


def test_journal_names() -> None:
    assert journal_name("caller_uid") == "CALLER_UID"
    assert journal_name("é-x") == "X"  # each other character an _, none leading
    assert journal_name("___") == "FIELD"
    assert journal_name("a" * 100) == "A" * 64


# ---------------------------------------------------------------- JSON lines


def test_json_is_one_object_per_line_with_the_fields() -> None:
    fmt = JsonFormatter()
    rec = record("refused uid %d", 1002, level=logging.WARNING,
                 fields={"event": "caller_refused", "caller_uid": 1002, "dropped": ["password"],
                         "path": Path("/x"), "message": "not the message", "level": "not the level"})  # fmt: skip
    rec.created = 1_700_000_000.25
    line = fmt.format(rec)
    assert "\n" not in line
    assert json.loads(line) == {
        "time": "2023-11-14T22:13:20.250+00:00",
        "level": "warning",
        "logger": "dc_broker.sessions",
        "message": "refused uid 1002",
        "event": "caller_refused",
        "caller_uid": 1002,
        "dropped": ["password"],
        "path": "/x",  # what JSON cannot hold is written as its str()
    }


def test_json_keeps_a_traceback_on_the_records_one_line() -> None:
    line = JsonFormatter().format(record("profile %s: refresh\nfailed", "acme", level=logging.ERROR, exc=True))
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["message"] == "profile acme: refresh\nfailed"
    assert doc["exception"].startswith("Traceback (most recent call last):\n")
    assert doc["exception"].endswith("ValueError: the vault said no\nsecond line")


def test_the_json_handler_writes_one_line_per_record(monkeypatch: pytest.MonkeyPatch) -> None:
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    handler = make_handler("json", environ={})
    log = logging.getLogger("dc_broker.test_logs")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("profile %s: refresh failed", "acme")
        try:
            raise RuntimeError("boom\nline")
        except RuntimeError:
            log.exception("profile %s: crashed", "beta", extra={"fields": {"profile": "given", "generation": 3}})
    finally:
        log.removeHandler(handler)
        log.propagate = True
    docs = [json.loads(line) for line in stderr.getvalue().splitlines()]
    assert [(d["message"], d["profile"], d.get("generation")) for d in docs] == [
        ("profile acme: refresh failed", "acme", None),  # ProfileField: the sessions' lines name their profile
        ("profile beta: crashed", "given", 3),  # a field given is kept
    ]
    assert docs[1]["exception"].endswith("RuntimeError: boom\nline")


def test_profile_field_only_from_a_profile_message() -> None:
    rec = record("profile %s: x", "acme")
    ProfileField().filter(rec)
    assert rec.fields == {"profile": "acme"}  # type: ignore[attr-defined]
    other = record("profiles %s", "acme")
    ProfileField().filter(other)
    assert not hasattr(other, "fields")


# ---------------------------------------------------------------- which form where


def test_the_journal_only_when_stderr_is_the_journals_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open(tmp_path / "stream", "w") as stream:
        monkeypatch.setattr(sys, "stderr", stream)
        st = os.fstat(stream.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert stderr_is_journal(env)
        assert not stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})  # redirected since
        assert not stderr_is_journal({})
        assert not stderr_is_journal({"JOURNAL_STREAM": "garbage"})
        socket_path = tmp_path / "journal.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(socket_path))
        try:
            handler = make_handler("text", env, journal_socket=str(socket_path))
            assert isinstance(handler, JournalHandler)
            handler.close()
        finally:
            sock.close()
        absent = make_handler("text", env, journal_socket=str(tmp_path / "absent.sock"))
        assert isinstance(absent, logging.StreamHandler) and isinstance(absent.formatter, JournalFormatter)
        assert isinstance(make_handler("json", env).formatter, JsonFormatter)  # the config's choice wins
        plain = make_handler("text", {})
        assert plain.formatter is not None and plain.formatter._fmt == "%(asctime)s %(levelname)s %(name)s: %(message)s"
