"""Where the broker's socket lives. Shared by the broker and every client; no I/O but os.environ/getuid.

Order: ``$DC_BROKER_SOCKET``; else ``$XDG_RUNTIME_DIR/dc-broker/broker.sock``; else
``/run/user/$UID/dc-broker/broker.sock`` when that runtime directory exists; else a per-user
directory in the system temp dir (``/tmp/dc-broker-$UID/broker.sock``), which the broker creates 0700
and refuses to use if someone else owns it.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing costs dc-token start-up time
if TYPE_CHECKING:
    from dc_token.errors import BrokerUnavailable

SOCKET_ENV = "DC_BROKER_SOCKET"
SOCKET_NAME = "broker.sock"
SYSTEM_SOCKET = "/run/dc-broker/broker.sock"


def default_socket_path(environ: dict[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    explicit = env.get(SOCKET_ENV)
    if explicit:
        return explicit
    runtime = env.get("XDG_RUNTIME_DIR")
    if not runtime:
        candidate = f"/run/user/{os.getuid()}"
        runtime = candidate if os.path.isdir(candidate) else ""
    if runtime:
        return os.path.join(runtime, "dc-broker", SOCKET_NAME)
    tmp = env.get("TMPDIR") or "/tmp"  # noqa: S108 - owner and mode are checked before use
    return os.path.join(tmp, f"dc-broker-{os.getuid()}", SOCKET_NAME)


def unreachable(path: str, exc: OSError) -> BrokerUnavailable:
    """What a failed connect to ``path`` means for the caller, and what to do about it."""
    from dc_token.errors import BrokerUnavailable

    if isinstance(exc, FileNotFoundError | ConnectionRefusedError):
        return BrokerUnavailable(f"no dc-broker is running on {path}")
    if isinstance(exc, PermissionError):
        return BrokerUnavailable(f"no permission to use the broker socket {path}{_why_denied(path)}")
    return BrokerUnavailable(f"cannot connect to {path}: {exc.strerror or exc}")


def _why_denied(path: str) -> str:
    """A shared broker is there but admits a group the caller is not in: say which, and how to join."""
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
