"""Token files ("sinks"): the files the broker keeps holding each profile's current token.

For programs that can only read a file (``EnvironmentFile=``, a cron job, a BI tool's "token file"
setting). Per profile with ``[[profiles.NAME.sinks]]`` (``dc_broker.config.Sink``), one trio task
(``_Keeper``) waits on the session's ``token_changed`` and rewrites every file of the profile:

- atomically (``dc_broker.atomic.write``): a new file (O_EXCL, the sink's mode and group) in the
  same directory, written, fsync'ed, renamed over the old one, then the directory fsync'ed. A reader
  sees the old complete file or the new complete file, never a partial or empty one. The new token
  is written as soon as the broker has it, which is before the old one expires (the broker
  refreshes ahead of expiry);
- only in a safe directory, checked at every write on the opened directory: every directory up to
  ``/`` owned by the broker's user or root and writable by no one else unless sticky (OpenSSH's
  StrictModes, ``dc_broker.atomic.RULE``). A refused file is logged with the config line of its
  ``path`` (``Sink.origin``) and tried again at the next check;
- removed when the broker can no longer vouch for the token: the vault is locked, the profile is
  logged out or removed, the written token is about to expire with no new one (``REMOVE_BEFORE``
  its expiry: the IdP is down), or it is not a token of the profile's login any more, and when the
  broker stops.

**Which login a file's token is for.** Each write records the profile's ``login_fingerprint`` (IdP,
client, grant, user, scope: whom the token is for) as it was when the token was read from the
session. A file is kept only while that is still the profile's fingerprint, the same rule by which
the store never restores another login's tokens: a reload that makes the profile another login
(`dc-broker set acme username=bob`, `add --force` with another user, client or IdP) removes the old
login's file at once, whether or not the new login has a token yet (a new token is written over it;
if that write fails, the old one is removed all the same). Between two tokens of the *same* login
the file stays as it was, up to ``REMOVE_BEFORE`` its token's expiry: a refresh in flight, an IdP
outage, a reload that changes nothing about whom the login is for (a proxy, a CA bundle), and new
secrets for the same user and client (`dc-broker rotate`), which drop the session's token until
the IdP grants one for them: the file's token is still the same user's.

The task only reads a session through ``token_changed``, ``peek``, ``effective_state``,
``login_fingerprint`` and ``profile``; it re-checks every ``CHECK_EVERY`` seconds, and
``TokenFiles.run`` looks for profiles that gained sinks (a reload) every ``SCAN_EVERY`` seconds.
`logout`, `lock` and `reload` do not wait for either: they call ``TokenFiles.settle``, one pass now
(after a write in progress), so the files they take away are gone when they return. A file that
cannot be written is logged, once per distinct error, and retried at the next check: a sink never
stops the daemon.
Never logs a token; never writes outside the configured paths.
"""

from __future__ import annotations

import errno
import grp
import logging
import time
from typing import Final, NamedTuple

import trio

from dc_broker import atomic
from dc_broker.config import Sink
from dc_broker.errors import ConfigError
from dc_broker.sessions.registry import Sessions
from dc_broker.sessions.session import Session
from dc_broker.tokens import TokenSet
from dc_token.errors import UnknownProfile

log = logging.getLogger("dc_broker.sinks")

#: seconds between checks of a profile's state (lock/logout/expiry) besides token_changed
CHECK_EVERY: Final = 0.5
#: a file whose token was not replaced goes this long before the token expires (at most this share
#: of the token's lifetime): a reader must not pick up a token that dies while it uses it
REMOVE_BEFORE: Final = 5.0
REMOVE_BEFORE_SHARE: Final = 0.1
#: seconds between scans for profiles that gained sinks
SCAN_EVERY: Final = 2.0
#: session states in which nobody may use the token any more: the files go
_NOT_VOUCHED: Final = frozenset({"locked", "login_required"})
#: how file I/O (fsync) leaves the event loop: a worker thread (tests on a fake clock run it inline)
_blocking = trio.to_thread.run_sync
_B64TOKEN_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/=")


def render(fmt: str, token: str, token_type: str, expires_at: float, scope: str, profile: str) -> bytes:
    """The file's bytes for one token (pure). ``expires_at``: unix seconds.

    token  -> ``<token>\\n``                       header -> ``Authorization: Bearer <token>\\n``
    json   -> ``{"token", "type", "expires_at", "scope", "profile"}``
    env    -> ``DC_TOKEN=<token>`` and ``DC_TOKEN_EXPIRES_AT=<unix>`` lines (systemd EnvironmentFile=,
              or ``set -a; . FILE``)
    """
    if not token or not set(token) <= _B64TOKEN_CHARS:  # RFC 6750 b64token: safe unquoted everywhere
        raise ValueError("the token has characters outside RFC 6750's b64token set; not written")
    if fmt == "token":
        text = f"{token}\n"
    elif fmt == "header":
        text = f"Authorization: Bearer {token}\n"
    elif fmt == "env":
        text = f"DC_TOKEN={token}\nDC_TOKEN_EXPIRES_AT={int(expires_at)}\n"
    elif fmt == "json":
        import json

        doc = {"token": token, "type": token_type, "expires_at": int(expires_at), "scope": scope, "profile": profile}
        text = json.dumps(doc) + "\n"
    else:
        raise ValueError(f"unknown sink format {fmt!r}")
    return text.encode()


def _gid(group: str | None) -> int:
    if group is None:
        return -1
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise OSError(errno.EINVAL, f"group {group!r} does not exist") from None


def write_atomically(path: str, data: bytes, mode: int = 0o600, group: str | None = None) -> None:
    """Replace ``path`` with ``data`` so that a reader sees either file whole (blocking: run it in a
    thread): ``dc_broker.atomic.write`` under the directory rule, checked again at this write. The
    directory is created 0700 if missing."""
    atomic.write(path, data, mode=mode, gid=_gid(group), safe=True, create_dirs=True)


def remove_file(path: str) -> bool:
    """Remove a sink file (blocking). Returns whether there was one."""
    return atomic.remove(path)


class _ProfileSinks:
    """What one profile's files hold: sink -> what was written there (``_Written``), or None
    (checked: no file)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.written: dict[Sink, _Written | None] = {}
        self._errors: dict[Sink, str] = {}

    async def write(self, sink: Sink, tok: TokenSet, login: str, now: float) -> None:
        token = tok.access_token.reveal()
        expires_at = time.time() + (tok.expires_at - now)
        try:
            data = render(sink.format, token, tok.token_type, expires_at, tok.scope or "", self.name)
            await _blocking(write_atomically, sink.path, data, sink.mode, sink.group)
        except (OSError, ValueError, ConfigError) as exc:
            self._failed(sink, "write", exc)
            return
        self.written[sink] = _Written(token, remove_at(tok), login)
        if self._errors.pop(sink, None) is not None:
            log.info("profile %s: token file %s written again", self.name, sink.path)

    async def remove(self, sink: Sink, why: str) -> None:
        had = self.written.get(sink) is not None
        try:
            removed = await _blocking(remove_file, sink.path)
        except OSError as exc:
            self._failed(sink, "remove", exc)
            return
        self.written[sink] = None
        if removed and had:
            log.info("profile %s: token file %s removed (%s)", self.name, sink.path, why)

    async def update(self, sink: Sink, tok: TokenSet | None, login: str, vouched: bool, now: float) -> None:
        """Bring one file in line: the current token (``tok``, of the login whose fingerprint is
        ``login``), or no file when there is none to vouch for. A token that could not be written
        leaves the file as it was only if the broker still vouches for what it holds."""
        have = self.written.get(sink, _UNSEEN)
        current = tok is not None and remove_at(tok) > now
        if tok is not None and current and (have is _UNSEEN or have is None or have.token != tok.access_token.reveal()):
            await self.write(sink, tok, login, now)
            have = self.written.get(sink, _UNSEEN)
        if have is _UNSEEN:
            if not current:  # (a failed write of the current token retries before removing it)
                await self.remove(sink, "left by an earlier run")
        elif have is None:
            return
        elif not vouched:
            await self.remove(sink, "locked or logged out")
        elif have.login != login:
            await self.remove(sink, "the profile is now for another user, client or identity provider")
        elif have.remove_at <= now:
            await self.remove(sink, "its token is about to expire and no new one came")

    def _failed(self, sink: Sink, action: str, exc: Exception) -> None:
        text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if isinstance(exc, atomic.UnsafeDirectory):
            text += f"; refused, since {atomic.RULE}"
        message = f"cannot {action} the token file {sink.where}: {text}"
        if self._errors.get(sink) != message:  # once per distinct error, not every check
            self._errors[sink] = message
            log.error("profile %s: %s; retrying", self.name, message)


class _Written(NamedTuple):
    """What a file holds: the token, when the file must go unless a new token replaced it (session
    clock), and the ``login_fingerprint`` of the profile the token was read for."""

    token: str
    remove_at: float
    login: str


#: a file not looked at yet in this run (it may hold anything an earlier run left)
_UNSEEN: Final = _Written("", 0.0, "")


def remove_at(tok: TokenSet) -> float:
    """When a file holding ``tok`` must go unless a new token replaced it (session clock)."""
    return tok.expires_at - min(REMOVE_BEFORE, REMOVE_BEFORE_SHARE * tok.lifetime)


def _current(sessions: Sessions, name: str, session: Session) -> bool:
    """Whether ``session`` is still the one serving ``name`` (not removed, not replaced)."""
    try:
        return sessions.lookup(name) is session
    except UnknownProfile:
        return False


class _Keeper:
    """One profile's files and the lock around each pass over them: a pass started by ``settle``
    waits for a write in progress and then sees the session as it is now."""

    def __init__(self, sessions: Sessions, name: str) -> None:
        self.sessions = sessions
        self.name = name
        self.session = sessions.lookup(name)
        self.files = _ProfileSinks(name)
        self.lock = trio.Lock()
        #: the profile has no sinks any more (removed, or dropped by a reload): the task ends
        self.done = False

    async def one_pass(self) -> float | None:
        """Bring every file in line with the session now; returns when to look again unwoken (None:
        the profile has no files any more, ``done``)."""
        session, files = self.session, self.files
        live = _current(self.sessions, self.name, session)
        sinks = set(session.profile.sinks) if live else set()
        for gone in [s for s in files.written if s not in sinks]:
            await files.remove(gone, "no longer configured")
            del files.written[gone]
        now = self.sessions.clock()
        if not sinks:
            self.done = True
            return None
        vouched = session.effective_state(now).value not in _NOT_VOUCHED
        # read together, with no checkpoint between: a session's token is always of its profile's login
        tok = session.peek(0.0, now) if vouched else None
        login = session.login_fingerprint
        for sink in sorted(sinks, key=lambda s: s.path):
            await files.update(sink, tok, login, vouched, now)
        # wake for the next file to remove; a past one (its removal failed) waits for the next check
        deadlines = [have.remove_at for have in files.written.values() if have is not None and have.remove_at > now]
        return min([now + CHECK_EVERY, *deadlines])

    async def run(self) -> None:
        """Keep the profile's files current until it has none or the task is cancelled; its files
        are removed on the way out."""
        try:
            while not self.done:
                changed = self.session.token_changed  # taken first: a token arriving from here on wakes us
                async with self.lock:
                    wake_at = await self.one_pass()
                if wake_at is None:
                    return
                with trio.move_on_at(wake_at):
                    await changed.wait()
        finally:
            with trio.CancelScope(shield=True):
                async with self.lock:
                    for sink, have in list(self.files.written.items()):
                        if have is not None:
                            await self.files.remove(sink, "the broker stops serving the profile")


class TokenFiles:
    """Every profile's token files, for as long as the broker runs (``run``), and ``settle``: what
    `logout`, `lock` and `reload` wait for, so the files are gone when they return (the task would
    otherwise notice within ``CHECK_EVERY``)."""

    def __init__(self, sessions: Sessions) -> None:
        self.sessions = sessions
        self._keepers: dict[str, _Keeper] = {}

    async def settle(self, names: list[str] | None = None) -> None:
        """One pass now over the files of ``names`` (default: every profile with files), after any
        write in progress: a profile logged out, locked, removed or made another login (its
        ``login_fingerprint`` changed) has no file of the old login when this returns."""
        for name in sorted(self._keepers) if names is None else names:
            keeper = self._keepers.get(name)
            if keeper is not None and not keeper.done:
                async with keeper.lock:
                    await keeper.one_pass()

    async def _keep(self, keeper: _Keeper) -> None:
        try:
            await keeper.run()
        finally:
            if self._keepers.get(keeper.name) is keeper:
                del self._keepers[keeper.name]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """One keeper task per profile with sinks; profiles that gain sinks are found every
        ``SCAN_EVERY`` seconds."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                for name in self.sessions.names():
                    if name in self._keepers:
                        continue
                    try:
                        if not self.sessions.lookup(name).profile.sinks:
                            continue
                    except UnknownProfile:
                        continue
                    keeper = self._keepers[name] = _Keeper(self.sessions, name)
                    nursery.start_soon(self._keep, keeper)
                await trio.sleep(SCAN_EVERY)
