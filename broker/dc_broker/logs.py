"""The daemon's logging: one handler on stderr, in the form whoever reads stderr wants.

Owns ``setup_logging``. Under systemd (``$JOURNAL_STREAM`` names the device and inode of our stderr)
each line starts with a syslog priority prefix (``<3>`` error, ``<4>`` warning, ``<6>`` info, ``<7>``
debug; sd-daemon(3)) and carries no timestamp, since the journal adds its own; every line of a
multi-line record (a traceback) gets the prefix, so the journal keeps them at the record's
priority. Anywhere else (a terminal, a pipe, a test) lines are plain: time, level, logger, message.

It never formats secrets: log calls pass profile names and error messages, and a ``Secret``
renders masked. Pure apart from the handler it installs and one ``fstat`` of stderr.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Final, TextIO

PLAIN_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT: Final = "%(name)s: %(message)s"

#: logging level -> syslog priority (RFC 5424 severities as sd-daemon(3) spells them)
_PRIORITIES: Final = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def syslog_priority(levelno: int) -> int:
    for level, priority in _PRIORITIES:
        if levelno >= level:
            return priority
    return 7


class JournalFormatter(logging.Formatter):
    """Prefix every line of a record with ``<priority>``."""

    def __init__(self) -> None:
        super().__init__(JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines() or [""])


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


def setup_logging(verbose: bool = False, environ: Mapping[str, str] | None = None) -> logging.Handler:
    """Install the one stderr handler on the root logger; returns it."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter() if stderr_is_journal(environ) else logging.Formatter(PLAIN_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # httpx logs every request URL at INFO; URLs are not secret but the noise is not useful
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("hpack").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)  # -v must not trace HTTP internals
    return handler
