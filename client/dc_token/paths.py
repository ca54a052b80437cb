"""Where the broker's socket lives. Shared by the broker and every client; no I/O but os.environ/getuid.

Order: ``$DC_BROKER_SOCKET``; else ``$XDG_RUNTIME_DIR/dc-broker/broker.sock``; else
``/run/user/$UID/dc-broker/broker.sock`` when that runtime directory exists; else a per-user
directory in the system temp dir (``/tmp/dc-broker-$UID/broker.sock``), which the broker creates 0700
and refuses to use if someone else owns it.
"""

from __future__ import annotations

import os

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
