"""The daemon's logging: one handler, in the form whoever reads the logs wants, with fields.

Owns ``setup_logging``. Every record may carry ``fields`` (a dict passed as ``extra={"fields":
{...}}``: profile, caller_uid, caller_user, caller_unit, caller_exe, op, event, error_code,
generation, ...); the audit trail's events always do (``dc_broker.observe.events``), and a record
whose message starts ``"profile %s"`` gets ``profile`` from its first argument
(``ProfileField``), so the sessions' lines can be found by profile too. Three forms:

- **journal** (under systemd: ``$JOURNAL_STREAM`` names our stderr, and the journal's socket is
  there): each record is one datagram of the journal's native protocol to
  ``/run/systemd/journal/socket`` (``JournalHandler``), its fields as journal fields in upper case
  (``PROFILE=acme``, ``CALLER_UID=1002``, ``EVENT=caller_refused``) beside ``MESSAGE``,
  ``PRIORITY``, ``SYSLOG_IDENTIFIER`` and ``LOGGER``; a record too big for a datagram goes as a
  sealed memfd, as sd_journal_send does. If the socket fails, the line goes to stderr with a
  syslog priority prefix (``<3>``...; sd-daemon(3)), which the journal reads as well.
- **json** (``[daemon] log_format = "json"``): one JSON object per line on stderr, for log
  shippers: time, level, logger, message, the fields, and a traceback as ``exception``.
- **text** anywhere else (a terminal, a pipe, a test): time, level, logger, message.

It never formats secrets: log calls pass profile names and error messages, and a ``Secret``
renders masked. Apart from the handler it installs it does no I/O of its own.
"""

from __future__ import annotations

import array
import datetime
import json
import logging
import os
import socket
import struct
import sys
from collections.abc import Mapping
from typing import Any, Final, TextIO

PLAIN_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT: Final = "%(name)s: %(message)s"
JOURNAL_SOCKET: Final = "/run/systemd/journal/socket"
IDENTIFIER: Final = "dc-broker"

#: logging level -> syslog priority (RFC 5424 severities as sd-daemon(3) spells them)
_PRIORITIES: Final = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def syslog_priority(levelno: int) -> int:
    for level, priority in _PRIORITIES:
        if levelno >= level:
            return priority
    return 7


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The record's fields (``extra={"fields": ...}``), or none."""
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


class ProfileField(logging.Filter):
    """A record whose message starts ``"profile %s"`` names its profile: add it as a field."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg
        if isinstance(msg, str) and msg.startswith("profile %s") and isinstance(record.args, tuple) and record.args:
            fields = fields_of(record)
            if "profile" not in fields:
                record.fields = {**fields, "profile": str(record.args[0])}
        return True


class JournalFormatter(logging.Formatter):
    """Prefix every line of a record with ``<priority>``."""

    def __init__(self) -> None:
        super().__init__(JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines() or [""])


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in fields_of(record).items():
            if key not in doc:
                doc[key] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str, separators=(",", ":"))


def journal_name(key: str) -> str:
    """A field name as the journal wants it: upper case letters, digits and ``_``, not starting with ``_``."""
    name = "".join(c if c.isascii() and c.isalnum() else "_" for c in key.upper()).lstrip("_")
    return name[:64] or "FIELD"


def journal_message(fields: Mapping[str, object]) -> bytes:
    """One native-protocol entry: ``NAME=value\\n``, or for a value with a newline ``NAME\\n``,
    its length as 64-bit little-endian, the value, ``\\n`` (systemd's journal-native-protocol)."""
    out = bytearray()
    for name, value in fields.items():
        data = str(value).encode("utf-8", "replace")
        key = name.encode("ascii")
        if b"\n" in data:
            out += key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key + b"=" + data + b"\n"
    return bytes(out)


class JournalHandler(logging.Handler):
    """Records as journal entries over the native protocol, with their fields."""

    def __init__(self, path: str = JOURNAL_SOCKET, fallback: TextIO | None = None) -> None:
        super().__init__()
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.fallback = fallback if fallback is not None else sys.stderr
        self._prefixed = JournalFormatter()

    def entry(self, record: logging.LogRecord) -> dict[str, object]:
        message = record.getMessage()
        if record.exc_info:
            message = f"{message}\n{logging.Formatter().formatException(record.exc_info)}"
        entry: dict[str, object] = {
            "MESSAGE": f"{record.name}: {message}",
            "PRIORITY": syslog_priority(record.levelno),
            "SYSLOG_IDENTIFIER": IDENTIFIER,
            "LOGGER": record.name,
            "CODE_FILE": record.pathname,
            "CODE_LINE": record.lineno,
            "CODE_FUNC": record.funcName,
        }
        for key, value in fields_of(record).items():
            name = journal_name(key)
            if name not in entry:
                entry[name] = value
        return entry

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = journal_message(self.entry(record))
            try:
                self.sock.sendto(data, self.path)
            except OSError as exc:
                if exc.errno != 90:  # EMSGSIZE: too big for a datagram; anything else: the fallback
                    raise
                self._send_memfd(data)
        except OSError:
            try:
                self.fallback.write(self._prefixed.format(record) + "\n")
                self.fallback.flush()
            except Exception:
                self.handleError(record)
        except Exception:
            self.handleError(record)

    def _send_memfd(self, data: bytes) -> None:
        """A big entry as a sealed memfd passed over the socket (what sd_journal_send does)."""
        import fcntl

        fd = os.memfd_create("dc-broker-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, data)
            fcntl.fcntl(
                fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
            )
            fds = array.array("i", [fd])
            self.sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())], 0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        self.sock.close()
        super().close()


def stderr_is_journal(environ: Mapping[str, str] | None = None, stream: TextIO | None = None) -> bool:
    """Whether our stderr is the stream systemd connected to the journal (``$JOURNAL_STREAM`` is
    ``DEVICE:INODE`` of it). A stderr redirected elsewhere since (a pipe, a file) is not."""
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError, AttributeError):
        return False


def make_handler(
    log_format: str = "text", environ: Mapping[str, str] | None = None, journal_socket: str = JOURNAL_SOCKET
) -> logging.Handler:
    """The handler for ``log_format`` ("text" or "json") where we run (see the module docstring)."""
    handler: logging.Handler
    if log_format == "json":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
    elif stderr_is_journal(environ):
        if os.path.exists(journal_socket):
            handler = JournalHandler(journal_socket)
        else:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(JournalFormatter())
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
    handler.addFilter(ProfileField())
    return handler


def setup_logging(
    verbose: bool = False, environ: Mapping[str, str] | None = None, log_format: str = "text"
) -> logging.Handler:
    """Install the one handler on the root logger; returns it."""
    handler = make_handler(log_format, environ)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        if isinstance(old, JournalHandler):
            old.close()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # httpx logs every request URL at INFO; URLs are not secret but the noise is not useful
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("hpack").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)  # -v must not trace HTTP internals
    return handler
