"""``dc-token exec PROFILE --token-file | --signal SIG | --restart -- COMMAND``: stay beside COMMAND.

Plain ``dc-token exec`` replaces itself with the command (``dc_token.cli``). With one of these flags
dc-token stays as the command's parent for the command's whole life (Vault Agent's ``exec``):

- ``--token-file``: the command gets ``DC_TOKEN_FILE``, a 0600 file in a private 0700 directory
  ($XDG_RUNTIME_DIR when set) holding the current token and a newline. Every new token replaces it
  atomically (a new file renamed over the old), so a reader never sees a partial file. The file and
  its directory are removed when dc-token exits. The environment has no ``DC_TOKEN`` (it would go
  stale), unless ``--restart`` is given too.
- ``--signal SIG`` (with ``--token-file``): after each update the command is sent SIG (e.g. HUP), so
  it can re-read the file.
- ``--restart``: after each new token the command is stopped (SIGTERM, SIGKILL after
  ``RESTART_GRACE`` s) and started again with the fresh token in ``$DC_TOKEN``.

With ``--scope``, no token lacking a scope asked for is handed over (``dc_token.scopes.check_scope``):
the first one ends dc-token before the command starts, with the printing path's message and exit
status; a later one is said once, and the command keeps its last token.

New tokens come from ``TokenClient.watch`` in a thread (it reconnects by itself across broker
restarts). The main thread blocks the signals it handles and takes them with ``sigtimedwait``:
SIGCHLD reaps the command; SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 sent to dc-token
(``kill``, systemd) are forwarded to the command, while the same signals from the terminal (Ctrl-C:
the kernel sends them to the whole foreground process group, the command included) are not sent a
second time. stdin, stdout and stderr are the command's own. dc-token exits with the command's
status; a command killed by a signal makes dc-token die of the same signal. Standard library only.

Holding a token, dc-token keeps other processes of its user out of its memory before it asks for
the first one (``dc_token.protect.no_dumps``: not dumpable, no core file; the command gets its own
core limit back). The command gets ``PARENT_DEATH_SIGNAL`` (SIGTERM) should dc-token be killed
without stopping it (``kill -9``), so it does not run on with a token nobody renews; the token
directory such a dc-token leaves behind (``dc-token-PID-...``, locked while its dc-token lives) is
removed by the next ``dc-token exec --token-file`` of the user (``remove_left_behind``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import stat as statmod
import subprocess
import sys
import tempfile
import threading
import time

from dc_token import protect
from dc_token.cache import Token
from dc_token.errors import EXIT_CANNOT_EXECUTE, EXIT_NOT_FOUND, DcBrokerError
from dc_token.scopes import check_scope
from dc_token.sync import TokenClient
from dc_token.watch import jitter, reconnect_delay

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

#: forwarded to the command when sent to dc-token by a process (not by the terminal)
FORWARD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
#: seconds a restarted command has to exit after SIGTERM before it gets SIGKILL
RESTART_GRACE = 10.0
#: si_code above 0: sent by the kernel (the terminal's Ctrl-C, Ctrl-\\), below or at 0 by a process
_SI_KERNEL_MIN = 1
#: what the command gets when dc-token dies without stopping it (``kill -9``): the parent-death signal
PARENT_DEATH_SIGNAL = signal.SIGTERM
#: token directories are named ``dc-token-PID-RANDOM`` (and locked while their dc-token runs)
DIR_PREFIX = "dc-token-"
#: a directory whose lock is free but whose pid runs (reused) is left behind once it is this old (s)
LEFT_BEHIND_AFTER = 60.0


def signal_number(name: str) -> int:
    """``HUP``, ``SIGHUP`` or ``1`` -> 1; ValueError for anything else."""
    text = name.strip().upper()
    if text.isdigit():
        number = int(text)
        signal.Signals(number)  # ValueError if no such signal
        return number
    return int(signal.Signals[text if text.startswith("SIG") else f"SIG{text}"])


class Supervisor:
    """One command and the token it is kept supplied with."""

    def __init__(
        self,
        client: TokenClient,
        profile: str,
        command: Sequence[str],
        *,
        env_name: str = "DC_TOKEN",
        min_ttl: float = 0.0,
        scope: str | None = None,
        token_file: bool = False,
        notify: int | None = None,
        restart: bool = False,
    ) -> None:
        self.client = client
        self.profile = profile
        self.command = list(command)
        self.env_name = env_name
        self.min_ttl = min_ttl
        self.scope = scope
        self.token_file = token_file
        self.notify = notify
        self.restart = restart
        self.path: str | None = None
        self._dir: str | None = None
        self._lock = threading.Lock()
        self._pid = 0
        self._current = ""
        self._restart_with: str | None = None
        self._stopping = False
        self._told: str | None = None
        self._core: protect.CoreLimit | None = None
        self._dir_fd: int | None = None
        #: the commands started and not yet reaped, by pid
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    # -- the token ---------------------------------------------------------------------------

    def _write(self, token: str) -> None:
        assert self.path is not None and self._dir is not None
        tmp = os.path.join(self._dir, f".token.{os.getpid()}.{time.monotonic_ns()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, f"{token}\n".encode())
        finally:
            os.close(fd)
        os.rename(tmp, self.path)

    def _update(self, tok: Token) -> None:
        """A new token: into the file, then signal or restart the command."""
        with self._lock:
            if tok.token == self._current or self._stopping:
                return
            self._current = tok.token
            if self.token_file:
                self._write(tok.token)
            pid = self._pid
            if self.restart:
                self._restart_with = tok.token
                if pid:
                    _kill(pid, signal.SIGTERM)
                    timer = threading.Timer(RESTART_GRACE, self._kill_if_still, (pid,))
                    timer.daemon = True
                    timer.start()
            elif self.notify is not None and pid:
                _kill(pid, self.notify)

    def _offer(self, tok: Token) -> None:
        """A token from the watch: handed over (``_update``) unless it lacks a scope ``--scope`` asked
        for (the login changed since the first one was checked); then the command keeps its last
        token, and that is said once."""
        if self.scope:
            try:
                check_scope(self.scope, tok.scope, self.profile)
            except DcBrokerError as exc:
                self._say(f"dc-token: {exc}; the command keeps its last token")
                return
        self._told = None
        self._update(tok)

    def _say(self, message: str) -> None:
        """``message`` on stderr, unless it is the one said last (not at every retry or token)."""
        if message != self._told:
            self._told = message
            sys.stderr.write(message + "\n")
            sys.stderr.flush()

    def _kill_if_still(self, pid: int) -> None:
        with self._lock:
            if self._pid == pid and self._restart_with is not None:
                _kill(pid, signal.SIGKILL)

    def _watch(self) -> None:
        """The watch thread: every new token, until the process ends (a daemon thread)."""
        failures = 0
        while True:
            try:
                with self.client.watch(self.profile, min_ttl=self.min_ttl, scope=self.scope) as tokens:
                    for tok in tokens:
                        failures = 0
                        self._offer(tok)
            except DcBrokerError as exc:
                self._say(f"dc-token: {exc}; the command keeps its last token")
            except OSError as exc:  # the token file could not be written
                sys.stderr.write(f"dc-token: cannot update {self.path}: {exc.strerror or exc}\n")
            time.sleep(reconnect_delay(failures, jitter()))
            failures += 1

    # -- the command -------------------------------------------------------------------------

    def _spawn(self, token: str) -> int:
        env = dict(os.environ)
        env.pop(self.env_name, None)
        if self.path is not None:
            env["DC_TOKEN_FILE"] = self.path
        if not self.token_file or self.restart:
            env[self.env_name] = token
        sys.stdout.flush()
        sys.stderr.flush()
        core, parent = self._core, os.getpid()

        def in_child() -> None:  # between fork and exec
            protect.unblock_all_signals()  # the command starts with no signal blocked, whatever we block
            if core is not None:
                core.restore()  # its own core limit, not ours
            protect.parent_death_signal(PARENT_DEATH_SIGNAL, parent)

        # Popen for its preexec hook (posix_spawn has no parent-death signal); it is called from the
        # main thread only, which lives as long as dc-token: the kernel's parent is the forking thread
        child = subprocess.Popen(
            self.command,
            env=env,
            preexec_fn=in_child,  # only prctl, setrlimit and the signal mask: no lock is taken
            restore_signals=True,  # SIGPIPE, SIGXFSZ back to default: Python ignores them
            close_fds=False,  # the command gets the descriptors it would get from a plain exec
        )
        self._children[child.pid] = child
        return child.pid

    def _reaped(self, pid: int, status: int) -> None:
        """``pid`` was reaped (by our own waitpid): its Popen must not wait for it again."""
        child = self._children.pop(pid, None)
        if child is not None:
            child.returncode = os.waitstatus_to_exitcode(status)

    def _token_dir(self) -> str:
        """A new private directory for the token file, locked for this process's life; first, the
        directories of killed dc-token processes are removed (``remove_left_behind``)."""
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        where = runtime if runtime and os.path.isdir(runtime) else tempfile.gettempdir()
        remove_left_behind(where)
        path = tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-", dir=where)
        self._dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        fcntl.flock(self._dir_fd, fcntl.LOCK_EX)
        return path

    def run(self) -> int:
        """Start the command and keep it supplied; its exit status. Broker errors before the first
        start raise (dc-token prints them); later ones are reported and retried."""
        self._core, _ = protect.no_dumps(keep_hard_limit=True)  # before the first token is read
        first = self.client.token_info(self.profile, min_ttl=self.min_ttl, scope=self.scope)
        if self.scope:  # as dc-token's printing path: raised, so the command never starts without them
            check_scope(self.scope, first.scope, self.profile)
        self._current = first.token
        handled = {*FORWARD, signal.SIGCHLD}
        signal.pthread_sigmask(signal.SIG_BLOCK, handled)  # before any thread starts: they inherit it
        try:
            if self.token_file:
                self._dir = self._token_dir()
                self.path = os.path.join(self._dir, "token")
                self._write(first.token)
            try:
                self._pid = self._spawn(first.token)
            except FileNotFoundError:
                sys.stderr.write(f"dc-token: {self.command[0]}: command not found\n")
                return EXIT_NOT_FOUND
            except OSError as exc:
                sys.stderr.write(f"dc-token: {self.command[0]}: {exc.strerror or exc}\n")
                return EXIT_CANNOT_EXECUTE
            threading.Thread(target=self._watch, name="dc-token-watch", daemon=True).start()
            status = self._wait(handled)
        finally:
            with self._lock:
                self._stopping = True
                if self._dir is not None:
                    shutil.rmtree(self._dir, ignore_errors=True)
                if self._dir_fd is not None:
                    os.close(self._dir_fd)
        return _pass_on(status)

    def _wait(self, handled: set[signal.Signals]) -> int:
        """Forward signals and restart on demand until the command exits; its wait status."""
        while True:
            info = signal.sigtimedwait(handled, 1.0)
            if info is not None and info.si_signo != signal.SIGCHLD:
                if info.si_code < _SI_KERNEL_MIN:  # from a process: forward; from the terminal: it has it
                    with self._lock:
                        _kill(self._pid, info.si_signo)
                if info.si_signo in (signal.SIGINT, signal.SIGTERM):
                    with self._lock:
                        self._restart_with = None
                        self._stopping = True  # no more restarts: the command is being stopped
            pid, status = os.waitpid(self._pid, os.WNOHANG)
            if pid == 0:
                continue
            self._reaped(pid, status)
            with self._lock:
                again, self._restart_with = self._restart_with, None
                if again is None or self._stopping:
                    self._pid = 0
                    return status
                try:
                    self._pid = self._spawn(again)
                except OSError as exc:
                    sys.stderr.write(f"dc-token: cannot restart {self.command[0]}: {exc.strerror or exc}\n")
                    self._pid = 0
                    return 256 * (EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError) else EXIT_CANNOT_EXECUTE)


def remove_left_behind(where: str) -> None:
    """Remove the token directories in ``where`` that dc-token processes of this user left behind
    (killed with ``kill -9``: no ``finally`` ran). A directory is left behind when its lock is free
    and the process its name carries is gone; one whose pid runs (reused) is removed only once it is a
    minute old, so a directory made a moment ago and not yet locked is never taken."""
    try:
        entries = list(os.scandir(where))
    except OSError:
        return
    for entry in entries:
        pid_text = entry.name[len(DIR_PREFIX) :].partition("-")[0]
        if not entry.name.startswith(DIR_PREFIX) or not pid_text.isdigit():
            continue  # not ours, or an older dc-token's (it never locked it: it may still run)
        try:
            st = entry.stat(follow_symlinks=False)
            if not statmod.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
                continue
            fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its dc-token runs
            if _running(int(pid_text)) and time.time() - st.st_mtime < LEFT_BEHIND_AFTER:
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
        finally:
            os.close(fd)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill(pid: int, signum: int) -> None:
    if pid:
        with contextlib.suppress(ProcessLookupError):  # already gone; the next waitpid reaps it
            os.kill(pid, signum)


def _pass_on(status: int) -> int:
    """The command's wait status as ours: its exit code, or death by the same signal."""
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return code
    signum = -code
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
    os.kill(os.getpid(), signum)
    return 128 + signum  # a signal that does not kill (e.g. SIGCHLD-like): the shell's convention
