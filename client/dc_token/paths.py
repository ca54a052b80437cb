"""Where the broker's socket lives. Shared by the broker and every client; no I/O but the environment,
getuid and one stat. dc-token reads it on every run, so it uses ``posix`` (built in) rather than
``os``, whose import costs dc-token a tenth of an interpreter's start.

Order: ``$DC_BROKER_SOCKET``; else ``$XDG_RUNTIME_DIR/dc-broker/broker.sock``; else
``/run/user/$UID/dc-broker/broker.sock`` when that runtime directory exists; else a per-user
directory in the system temp dir (``/tmp/dc-broker-$UID/broker.sock``), which the broker creates 0700
and refuses to use if someone else owns it.
"""

import posix
import sys

# dc-token imports this module on every run: typing, collections.abc and even __future__ cost it
# start-up time, so the annotations that name them are strings (no `from __future__ import annotations`)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

    from dc_token.errorbase import BrokerUnavailable

SOCKET_ENV = "DC_BROKER_SOCKET"
SOCKET_NAME = "broker.sock"
SYSTEM_SOCKET = "/run/dc-broker/broker.sock"
#: how long dc-token waits for the broker's answer (its quick path and its full path alike)
ANSWER_TIMEOUT = 60.0


def default_socket_path(environ: "Mapping[str, str] | None" = None) -> str:
    """The socket to use when none is given (``environ``: the environment, default this process's)."""
    env = _Environ() if environ is None else environ
    explicit = env.get(SOCKET_ENV)
    if explicit:
        return explicit
    runtime = env.get("XDG_RUNTIME_DIR")
    if not runtime:
        candidate = f"/run/user/{posix.getuid()}"
        runtime = candidate if _is_dir(candidate) else ""
    if runtime:
        return _join(runtime, f"dc-broker/{SOCKET_NAME}")
    tmp = env.get("TMPDIR") or "/tmp"  # noqa: S108 - owner and mode are checked before use
    return _join(tmp, f"dc-broker-{posix.getuid()}/{SOCKET_NAME}")


class _Environ:
    """This process's environment as ``os.environ`` reads it (str, decoded as file names are),
    one variable at a time."""

    def get(self, name: str) -> str | None:
        value = posix.environ.get(name.encode(sys.getfilesystemencoding(), "surrogateescape"))
        return None if value is None else value.decode(sys.getfilesystemencoding(), "surrogateescape")


def _is_dir(path: str) -> bool:
    try:
        return posix.stat(path).st_mode & 0o170000 == 0o040000  # S_ISDIR
    except OSError:
        return False


def _join(directory: str, rest: str) -> str:
    """``os.path.join(directory, rest)`` for a relative ``rest``."""
    return directory + rest if directory.endswith("/") else f"{directory}/{rest}"


def unreachable(path: str, exc: "OSError") -> "BrokerUnavailable":
    """What a failed connect to ``path`` means for the caller, and what to do about it."""
    from dc_token.errorbase import BrokerDenied, BrokerUnavailable

    if isinstance(exc, FileNotFoundError | ConnectionRefusedError):
        return BrokerUnavailable(f"no dc-broker is running on {path}")
    if isinstance(exc, PermissionError):
        return BrokerDenied(f"no permission to use the broker socket {path}{_why_denied(path)}")
    return BrokerUnavailable(f"cannot connect to {path}: {exc.strerror or exc}")


def _why_denied(path: str) -> str:
    """A shared broker is there but admits a group the caller is not in: say which, and how to join."""
    import os
    import stat

    try:
        st = os.stat(path)
    except OSError:
        return ""
    if not stat.S_ISSOCK(st.st_mode) or not st.st_mode & 0o020:
        return f" (it is private to uid {st.st_uid}; run your own broker: `dc-broker run`)"
    try:
        import grp

        group = grp.getgrgid(st.st_gid).gr_name
    except (KeyError, ImportError):
        group = str(st.st_gid)
    return (
        f": the shared broker there admits members of group {group!r}, and you are not one; ask its "
        f"administrator to add you (`usermod -aG {group} $USER`), then log in again"
    )
