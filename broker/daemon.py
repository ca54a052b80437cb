"""Assemble and run one broker: listening socket + sessions + server, until a signal stops it.

This is the composition root: it owns the process-level concerns (signals, the socket's lifetime,
closing the HTTP client) and nothing else. ``dc-broker run`` and ``dc-broker dev`` both call
``run_broker``; tests can call it in-process too.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable

import trio

from broker.config import Profile
from broker.listen import bind_unix_socket, release
from broker.oidc import IdpTransport
from broker.ops import BrokerState
from broker.policy import DEFAULT_POLICY, RefreshPolicy
from broker.server import Server
from broker.sessions import Sessions
from broker.store import SecretStore

log = logging.getLogger("dc_broker")


async def run_broker(
    profiles: dict[str, Profile],
    store: SecretStore,
    socket_path: str,
    *,
    idp: IdpTransport | None = None,
    refresh_policy: RefreshPolicy = DEFAULT_POLICY,
    strict_dir: bool = True,
    on_ready: Callable[[], None] | None = None,
    task_status: trio.TaskStatus[Sessions] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled. ``task_status.started(sessions)`` once the socket accepts."""
    sock, lock = bind_unix_socket(socket_path, strict_dir=strict_dir)
    transport = idp or IdpTransport()
    sessions = Sessions(profiles, store, transport, refresh_policy=refresh_policy)
    state = BrokerState(sessions=sessions, socket_path=os.path.abspath(socket_path))  # noqa: ASYNC240
    server = Server(state)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(sessions.run)
            await nursery.start(server.serve, sock)
            log.info("dc-broker ready on %s with %d profile(s)", socket_path, len(sessions))
            if on_ready is not None:
                on_ready()
            task_status.started(sessions)
    finally:
        release(socket_path, sock, lock)
        with trio.CancelScope(shield=True):
            await transport.aclose()


async def until_signalled(scope: trio.CancelScope) -> None:
    """Cancel ``scope`` on SIGINT or SIGTERM (a clean stop, exit status 0)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s; stopping", signal.Signals(signum).name)
            scope.cancel()
            return
