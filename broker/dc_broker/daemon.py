"""Assemble and run one broker: listening socket + sessions + server, until cancelled or signalled.

This is the composition root: it owns the process-level concerns (the socket's lifetime, signals,
telling systemd how we are, closing the HTTP client and the store) and nothing else. ``dc-broker
run`` and ``dc-broker dev`` both call ``run_broker``; tests can call it in-process too.

As a ``service`` (``BrokerSettings.service``: ``dc-broker run``) the broker speaks the
service-manager contract through ``dc_broker.systemd``, all of it a no-op outside systemd:

- socket activation: a listening socket passed in ``LISTEN_FDS`` is served instead of binding our
  own, and is neither unlinked nor locked (systemd owns it);
- ``READY=1`` once the socket accepts; ``STATUS=`` with the profile count and vault lock state;
  ``WATCHDOG=1`` every half ``WatchdogSec=`` from a task of the event loop;
- SIGTERM/SIGINT send ``STOPPING=1``, stop accepting, let requests already waiting on a refresh
  get their answers, let refreshes in progress store their tokens (a grant that spends no refresh
  token is not waited for), close the store and return
  (exit status 0); a second signal stops at once. SIGHUP re-reads the config file and applies it
  with ``Sessions.reload`` (unchanged profiles keep their tokens); a config that does not load is
  logged and the running profiles are kept.
"""

from __future__ import annotations

import grp
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

import trio

from dc_broker import sinks, systemd
from dc_broker.config import DaemonSettings, Profile
from dc_broker.config.load import load_config
from dc_broker.errors import ConfigError
from dc_broker.idp.transport import IdpTransport
from dc_broker.serve.audit import Audit
from dc_broker.serve.listen import bind_unix_socket, release
from dc_broker.serve.ops import BrokerState, auto_lock, reloaded, render_metrics
from dc_broker.serve.server import Limits, Server
from dc_broker.sessions.policy import DEFAULT_POLICY, RefreshPolicy
from dc_broker.sessions.registry import Sessions
from dc_broker.sessions.states import State
from dc_broker.store import SecretStore

log = logging.getLogger("dc_broker")

#: longest a stop waits for in-flight requests and refreshes (systemd's TimeoutStopSec is 90 s)
DRAIN_TIMEOUT = 20.0
#: how often STATUS= is recomputed (sent only when it changed)
STATUS_EVERY = 5.0
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def vault_state(store: SecretStore) -> str:
    """``locked`` / ``unlocked`` for the vault, ``in memory`` for a store that never locks."""
    if not store.lockable:
        return "in memory"
    return "locked" if store.locked else "unlocked"


def status_line(sessions: Sessions, store: SecretStore, reload_error: str | None = None) -> str:
    """One line for ``systemctl status``: counts and states only, never a token or a name's secret.
    Profiles without a usable token are counted (unavailable, waiting for a person); a failed reload
    is said until the next one succeeds."""
    now = sessions.clock()
    states = [sessions.lookup(name).effective_state(now) for name in sessions.names()]
    fresh = sum(1 for s in states if s is State.FRESH)
    waiting = sum(1 for s in states if s in (State.LOGIN_REQUIRED, State.REJECTED))
    unavailable = sum(1 for s in states if s is State.UNAVAILABLE)
    stale = sum(1 for s in states if s is State.STALE)
    text = f"{len(states)} profile(s), {fresh} fresh"
    if stale:
        text += f", {stale} stale (refresh failing)"
    if unavailable:
        text += f", {unavailable} unavailable (identity provider failing)"
    if waiting:
        text += f", {waiting} need a login or new credentials"
    text = f"{text}; vault {vault_state(store)}"
    if reload_error is not None:
        text += f"; last reload failed: {reload_error}"
    return text


class _Listener:
    """The socket we serve: our own (bound, locked, unlinked on exit) or systemd's (only closed)."""

    def __init__(self, sock: socket.socket, path: str, lock: IO[bytes] | None) -> None:
        self.sock = sock
        self.path = path
        self.lock = lock

    @classmethod
    def open(cls, socket_path: str, *, activation: bool, strict_dir: bool, mode: int) -> _Listener:
        fds = systemd.listen_fds() if activation else []
        if fds:
            if len(fds) > 1:
                log.warning("systemd passed %d sockets; serving the first (fd %d) only", len(fds), fds[0])
            try:
                sock = systemd.listening_unix_socket(fds[0])
            except systemd.ActivationError as exc:
                raise ConfigError(str(exc)) from None
            name = sock.getsockname()
            path = name if isinstance(name, str) and name else f"fd {fds[0]}"
            log.info("serving the socket systemd passed: %s", path)
            return cls(sock, path, None)
        sock, lock = bind_unix_socket(socket_path, strict_dir=strict_dir, mode=mode)
        return cls(sock, os.path.abspath(socket_path), lock)

    @property
    def activated(self) -> bool:
        return self.lock is None

    def close(self) -> None:
        if self.lock is None:
            self.sock.close()  # systemd's socket: it keeps the path and queues the next callers
        else:
            release(self.path, self.sock, self.lock)


class _Supervisor:
    """Signals, notifications and the watchdog around one running broker."""

    def __init__(
        self,
        server: Server,
        sessions: Sessions,
        store: SecretStore,
        notifier: systemd.Notifier,
        settings: BrokerSettings,
    ) -> None:
        self.server = server
        self.sessions = sessions
        self.store = store
        self.notifier = notifier
        self.config_path = settings.config_path
        self.drain_timeout = settings.drain_timeout
        self._last_status = ""
        #: the [daemon] settings in force (SIGHUP applies changed limits)
        self.settings = settings.daemon
        #: why the last SIGHUP reload failed (shown in STATUS= until one succeeds)
        self.reload_error: str | None = None

    def send_status(self, **extra: str | int) -> None:
        line = status_line(self.sessions, self.store, self.reload_error)
        if extra or line != self._last_status:
            self._last_status = line
            self.notifier.send(**extra, STATUS=line)

    async def status_loop(self) -> None:
        while True:
            await trio.sleep(STATUS_EVERY)
            self.send_status()

    async def watchdog_loop(self, dog: systemd.Watchdog) -> None:
        log.debug("watchdog: pinging every %.1f s", dog.ping_every)
        while True:
            self.notifier.send(WATCHDOG=1)
            await trio.sleep(dog.ping_every)

    async def signals(
        self, scope: trio.CancelScope, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Handle SIGTERM/SIGINT (drain, then cancel ``scope``) and SIGHUP (reload) until cancelled."""
        with trio.open_signal_receiver(*_STOP_SIGNALS, signal.SIGHUP) as received:
            task_status.started()  # from here SIGHUP no longer kills the process
            async with trio.open_nursery() as nursery:
                stopping = False
                async for signum in received:
                    name = signal.Signals(signum).name
                    if signum == signal.SIGHUP:
                        self.reload()
                    elif stopping:
                        log.warning("received %s again; stopping without waiting", name)
                        scope.cancel()
                    else:
                        stopping = True
                        log.info("received %s; stopping", name)
                        nursery.start_soon(self.stop, scope)

    async def stop(self, scope: trio.CancelScope) -> None:
        self.notifier.send(STOPPING=1, STATUS=f"stopping: answering {self.server.pending} request(s) in flight")
        deadline = trio.current_time() + self.drain_timeout
        answered = await self.server.drain(self.drain_timeout)
        if not answered:
            log.warning(
                "stopping with %d request(s) still unanswered after %.0f s", self.server.pending, self.drain_timeout
            )
        with trio.move_on_at(deadline) as settle:
            await self.sessions.settled(spending_only=True)  # a refresh in flight stores its rotated tokens first
        if settle.cancelled_caught:
            log.warning("stopping during a refresh; its result is lost")
        scope.cancel()

    def reload(self) -> None:
        """SIGHUP: apply the config file again; a broken file changes nothing."""
        self.notifier.send(RELOADING=1, MONOTONIC_USEC=time.monotonic_ns() // 1000, STATUS="reloading config")
        try:
            if self.config_path is None:
                raise ConfigError("no config file was given at start")
            config = load_config(self.config_path, missing_ok=False)
        except ConfigError as exc:
            log.error(
                "SIGHUP: config not reloaded, still serving the %d profile(s) loaded before: %s",
                len(self.sessions),
                exc,
            )
            self.reload_error = str(exc)[:200].replace("\n", " ")
        else:
            self.reload_error = None
            added, changed, removed = self.sessions.reload(config.profiles)
            reloaded("SIGHUP", added, changed, removed)
            restart = apply_daemon_settings(self.server, self.settings, config.daemon)
            self.settings = config.daemon
            if restart:
                log.warning(
                    "SIGHUP: daemon.%s changed; that takes effect only after a restart",
                    ", daemon.".join(restart),
                )
            log.info(
                "SIGHUP: reloaded %s: %d profile(s); added %s, changed %s, removed %s",
                self.config_path,
                len(self.sessions),
                ", ".join(added) or "none",
                ", ".join(changed) or "none",
                ", ".join(removed) or "none",
            )
        self.send_status(READY=1)


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """How one broker runs, apart from its profiles and store: where it listens and what kind of
    process it is. ``dc-broker run`` and ``dc-broker dev`` each build one; tests build their own.

    ``system`` is the shared broker: its socket is 0660 for the ``[daemon] group`` (and its directory,
    systemd's RuntimeDirectory, 0755), and profiles without allow rules are closed to everyone.
    ``service`` is a broker under a service manager (``dc-broker run``): the systemd contract
    (socket activation, notify, watchdog) and the stop/reload signals, all no-ops outside systemd.
    """

    socket_path: str
    system: bool = False
    service: bool = False
    #: the file SIGHUP and the ``reload`` op re-read (None: not started from a file)
    config_path: str | None = None
    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    refresh_policy: RefreshPolicy = DEFAULT_POLICY
    drain_timeout: float = DRAIN_TIMEOUT
    #: refuse a socket directory others can write to (off for the system broker's 0755 RuntimeDirectory)
    private_dir: bool = True

    @property
    def socket_mode(self) -> int:
        return 0o660 if self.system else 0o600

    @property
    def strict_dir(self) -> bool:
        return self.private_dir and not self.system


async def run_broker(
    profiles: dict[str, Profile],
    store: SecretStore,
    settings: BrokerSettings,
    *,
    idp: IdpTransport | None = None,
    on_ready: Callable[[], None] | None = None,
    task_status: trio.TaskStatus[Sessions] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled (or, as a ``service``, until SIGTERM/SIGINT has drained us).

    ``task_status.started(sessions)`` once the socket accepts. See the module docstring for what
    ``settings.service`` turns on; ``settings.config_path`` is what SIGHUP re-reads."""
    service = settings.service
    notifier = systemd.Notifier.from_environ() if service else systemd.Notifier(None)
    dog = systemd.watchdog() if service else None
    listener = _Listener.open(
        settings.socket_path, activation=service, strict_dir=settings.strict_dir, mode=settings.socket_mode
    )
    transport = idp or IdpTransport()
    sessions = Sessions(profiles, store, transport, refresh_policy=settings.refresh_policy)
    daemon = settings.daemon
    if settings.system and daemon.group and not listener.activated:
        try:
            _give_socket_to_group(listener.path, daemon.group)
        except BaseException:
            listener.close()  # no stale socket left behind
            raise
    files = sinks.TokenFiles(sessions)
    state = BrokerState(
        sessions=sessions,
        socket_path=listener.path,
        system=settings.system,
        audit=Audit(daemon.audit_interval),
        config_path=settings.config_path,
        files=files,
    )
    server = Server(state, limits=limits_of(daemon))
    supervisor = _Supervisor(server, sessions, store, notifier, settings)
    metrics_sock = None
    try:
        if daemon.metrics_listen is not None:  # h11's server side is imported only when configured
            from dc_broker.config.values import metrics_address
            from dc_broker.observe.http import MetricsServer, open_listener

            metrics_sock = open_listener(
                metrics_address(daemon.metrics_listen, allow_remote=daemon.metrics_allow_remote)
            )
    except BaseException:
        listener.close()
        raise
    try:
        async with trio.open_nursery() as nursery:
            if service:
                await nursery.start(supervisor.signals, nursery.cancel_scope)
            await nursery.start(sessions.run)
            await nursery.start(files.run)  # token files ([[profiles.NAME.sinks]])
            await nursery.start(server.serve, listener.sock)
            if metrics_sock is not None:
                await nursery.start(MetricsServer(lambda: render_metrics(state)).serve, metrics_sock)
            nursery.start_soon(state.audit.run)
            nursery.start_soon(auto_lock, state, daemon.auto_lock_after)
            how = " (socket from systemd)" if listener.activated else ""
            log.info("dc-broker ready on %s%s with %d profile(s)", listener.path, how, len(sessions))
            if notifier.enabled:
                supervisor.send_status(READY=1)
                nursery.start_soon(supervisor.status_loop)
            if dog is not None:
                nursery.start_soon(supervisor.watchdog_loop, dog)
            if on_ready is not None:
                on_ready()
            task_status.started(sessions)
    finally:
        listener.close()
        if metrics_sock is not None:
            metrics_sock.close()
        with trio.CancelScope(shield=True):
            await transport.aclose()
            store.close()  # the vault checkpoints its WAL and releases its lock; memory: nothing
        notifier.close()


def _give_socket_to_group(path: str, group: str) -> None:
    """System mode: members of ``group`` may connect (socket 0660); allow rules decide the rest."""
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"daemon.group {group!r} does not exist; create it or change the config") from None
    try:
        os.chown(path, -1, gid)
    except PermissionError:
        raise ConfigError(
            f"cannot give the socket {path} to group {group!r}: uid {os.getuid()} is not in that group and "
            "lacks CAP_CHOWN (run the broker as a member of the group or with CAP_CHOWN, or unset daemon.group)"
        ) from None


def limits_of(settings: DaemonSettings) -> Limits:
    """The server's limits from ``[daemon]`` (applied again on SIGHUP)."""
    return Limits(
        max_in_flight=settings.max_in_flight,
        max_connections=settings.max_connections,
        max_frame=settings.max_frame,
        partial_frame_timeout=settings.partial_frame_timeout,
        max_connections_per_uid=settings.max_connections_per_uid,
        max_in_flight_per_uid=settings.max_in_flight_per_uid,
        idle_timeout=settings.idle_timeout,
    )


#: [daemon] settings a running broker cannot change: SIGHUP says they need a restart
RESTART_SETTINGS = ("socket", "group", "auto_lock_after", "metrics_listen", "metrics_allow_remote", "log_format")


def apply_daemon_settings(server: Server, old: DaemonSettings, new: DaemonSettings) -> list[str]:
    """SIGHUP: apply the new [daemon] limits at once; return the changed settings that need a restart."""
    server.limits = limits_of(new)
    server.state.audit.interval = new.audit_interval
    return [name for name in RESTART_SETTINGS if getattr(old, name) != getattr(new, name)]


async def until_signalled(scope: trio.CancelScope) -> None:
    """Cancel ``scope`` on SIGINT or SIGTERM (a clean stop, exit status 0)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s; stopping", signal.Signals(signum).name)
            scope.cancel()
            return
