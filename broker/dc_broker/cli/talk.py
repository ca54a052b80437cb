"""The commands that talk to the running daemon: ``dc-broker status``, ``login``, ``logout``, ``unlock``,
``lock``; and the one way any command does so (``ask``, ``ask_stream``, ``broker_running``: thin
calls over ``dc_token.sync.TokenClient``, which owns the socket conversation).

Owns what these commands print (the status table, a login's URL, code and countdown). Never opens the
config or the vault itself: with a daemon running, the daemon holds both (one writer); the commands
that work on files (``dc_broker.cli.files``) decide when to use ``ask`` instead of opening them.
Reads no secret from argv (``read_secret``: a hidden prompt or stdin); raises the error tree and
leaves its printing to the boundary (``dc_broker.cli.boundary``).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import click

from dc_broker.cli.boundary import PROFILE, SOCKET, profile_argument, read_secret
from dc_broker.config.values import SIGNS_IN_WITH
from dc_token.errors import (
    EXIT_INTERRUPTED,
    BrokerTimeout,
    BrokerUnavailable,
    DcBrokerError,
    Locked,
    LoginRequired,
    UpstreamUnavailable,
)
from dc_token.paths import ANSWER_TIMEOUT, default_socket_path
from dc_token.protocol import OpArgs
from dc_token.sync import TokenClient

#: how long a command waits for the broker's first answer: a socket-activated cold start takes well
#: under a second; a socket whose service cannot start would otherwise keep the caller for 60 s
HELLO_TIMEOUT = 15.0
#: the ops the broker may rightly take minutes to answer: it waits at the IdP (a grant that checks
#: new credentials, a logout's end of the login), for a lock a stalled refresh holds (the login's),
#: or for refreshes at the IdP to store their answers (``lock``; ``unlock`` waits for a ``lock``)
SLOW_OPS = frozenset({"lock", "unlock", "set_secrets", "logout", "login"})
#: seconds a slow op is given: twice the longest the broker may rightly take before it answers one
#: (180 s: a token grant read patiently, ``Timeouts.patient_total``; a ``lock``'s settling,
#: ``LOCK_SETTLE_LIMIT``), once waiting for whoever holds what it needs and once for its own work,
#: plus 30 s for the vault, token files and a loaded machine. A constant, not computed from those:
#: they live in modules that bring trio and httpx, which a CLI command must not import to wait
#: (tests/test_cli.py holds it above each bound).
SLOW_ANSWER_TIMEOUT = 2 * 180.0 + 30.0


class BrokerSlow(DcBrokerError):
    """The broker took an op and did not answer it in time: it is running (it answered a ``hello``
    first) and may still complete the op. Not "not running" (exit 3): "unavailable, retry" (7)."""

    exit_code = UpstreamUnavailable.exit_code


def answer_timeout(op: str) -> float:
    """Seconds a command waits for the broker's answer to ``op``: ``SLOW_ANSWER_TIMEOUT`` for
    ``SLOW_OPS``, else dc-token's ``ANSWER_TIMEOUT``."""
    return SLOW_ANSWER_TIMEOUT if op in SLOW_OPS else ANSWER_TIMEOUT


def ask(socket_path: str | None, op: str, *, timeout: float | None = None, **args: Any) -> dict[str, Any]:
    """One request to the running broker (the management side of ``TokenClient``); its arguments are
    checked against the wire contract (``OpArgs``) before anything is sent. ``timeout``: seconds to
    wait for the answer, default ``answer_timeout(op)``.

    A slow op (``SLOW_OPS``) is sent only once the broker has answered a ``hello`` (``HELLO_TIMEOUT``):
    then no answer to it in time is ``BrokerSlow`` (the broker may still complete it), never "not
    running", which stays for a socket nobody listens on, or no broker answers on."""
    wire = OpArgs(op, **args).to_wire()
    limit = answer_timeout(op) if timeout is None else timeout
    slow = op in SLOW_OPS
    if slow:
        try:
            ask(socket_path, "hello", timeout=HELLO_TIMEOUT)  # nobody listening: "not running", as ever
        except BrokerTimeout:
            raise _no_answer(socket_path) from None
    try:
        with TokenClient(socket_path, timeout=limit, cache=False) as broker:
            return broker.request(op, **wire)
    except BrokerTimeout:
        if not slow:
            raise
        profile = f" for profile {args['profile']!r}" if isinstance(args.get("profile"), str) else ""
        raise BrokerSlow(
            f"the broker took longer than {limit:g} s to answer {op}{profile}; it may still complete it: "
            "check with `dc-broker status`"
        ) from None


def ask_stream(socket_path: str | None, op: str, **args: Any) -> Iterator[dict[str, Any]]:
    """A streamed request (``login``): each result until the last, with no deadline (a person acts)."""
    wire = OpArgs(op, **args).to_wire()
    return TokenClient(socket_path, timeout=None, cache=False).stream(op, **wire)


def _no_answer(socket_path: str | None) -> BrokerUnavailable:
    """What a ``hello`` that timed out means: something accepts, but no broker answers."""
    path = socket_path or default_socket_path()
    return BrokerUnavailable(
        f"{path} accepted the connection but no broker answered in {HELLO_TIMEOUT:g} s: its service "
        "did not start? See `systemctl status dc-broker.service` and `journalctl -u dc-broker`"
    )


def broker_running(socket_path: str | None) -> bool:
    """Whether a broker answers on the socket; an error when something accepts but never answers."""
    try:
        ask(socket_path, "hello", timeout=HELLO_TIMEOUT)
    except BrokerTimeout:
        raise _no_answer(socket_path) from None
    except BrokerUnavailable:
        return False
    return True


def fmt_seconds(value: Any) -> str:
    """A duration as people read it: ``4m05s``, ``12s``, ``expired``, ``-`` (unknown)."""
    if value is None:
        return "-"
    value = float(value)
    if value < 0:
        return "expired"
    minutes, seconds = divmod(int(value), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


@click.command()
@SOCKET
@click.option("--json", "as_json", is_flag=True, help="print the broker's status as JSON")
@click.option(
    "--limit", type=click.IntRange(1), default=None, help="show at most this many profiles (default: all of them)"
)
@profile_argument(required=False)
def status(socket_path: str | None, as_json: bool, limit: int | None, profile: str | None) -> None:
    """Show the profiles the running broker holds: state, expiry, when each login ends, last refresh,
    last error. Every profile you may see, page after page (--limit N: at most N)."""
    with TokenClient(socket_path) as broker:
        result = broker.status(profile) if profile else broker.status_all(limit)
    if as_json:
        click.echo(json.dumps(result, indent=2, sort_keys=True))
        return
    info = result["broker"]
    click.echo(f"broker {info['version']} pid {info['pid']} on {info['socket']}, up {fmt_seconds(info['uptime'])}")
    rows = [("PROFILE", "STATE", "EXPIRES IN", "LOGIN ENDS", "LAST REFRESH", "LAST ERROR")]
    for p in result["profiles"]:
        last = time.strftime("%H:%M:%S", time.localtime(p["last_refresh"])) if p.get("last_refresh") else "-"
        rows.append(
            (
                p["profile"],
                p["state"],
                fmt_seconds(p.get("expires_in")),
                _login_end(p),
                last,
                p.get("last_error") or "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        click.echo("  ".join(c.ljust(widths[i]) for i, c in enumerate(r[:5])) + "  " + r[5])
    for p in result["profiles"]:
        note = _client_auth_note(p)
        if note:
            click.echo(note)
    if info.get("truncated"):
        counts = ", ".join(f"{n} {state}" for state, n in sorted(info.get("states", {}).items()))
        click.echo(f"... and {info['truncated']} more ({counts} in all); `dc-broker status PROFILE` shows one")


def _login_end(row: dict[str, Any]) -> str:
    """When a login ends: ``at 18:02`` (its session maximum: a person logs in again then), ``offline``,
    ``~4m05s`` (its refresh token's deadline, which refreshing moves), ``-`` (none known)."""
    ends = row.get("login_ends_in")
    offline = " (offline)" if row.get("offline") else ""
    if ends is None:
        return "offline" if row.get("offline") else "-"
    if row.get("login_end_final"):
        return time.strftime("at %H:%M", time.localtime(time.time() + float(ends))) + offline
    return f"~{fmt_seconds(ends)}{offline}"


#: a client certificate that expires within this is flagged (the broker logs it too)
RENEW_WITHIN = 14 * 86400


def _fmt_long(seconds: float) -> str:
    """A long duration: ``29d 23h``, below a day as ``fmt_seconds`` shows it."""
    days, rest = divmod(int(seconds), 86400)
    return f"{days}d {rest // 3600}h" if days else fmt_seconds(seconds)


def _client_auth_note(row: dict[str, object]) -> str | None:
    """One line on how a profile's client authenticates, when there is something to know: the key
    that signs (and the next one), a certificate's or assertion file's expiry."""
    auth = row.get("client_auth")
    if not isinstance(auth, dict):
        return None
    name = row["profile"]
    if auth.get("method") == "private_key_jwt":
        keys = auth.get("keys")
        if not keys:
            return f"{name}: no client key readable (vault locked, or none: `dc-broker rotate {name} --key`)"
        shown = ", ".join(f"{k['state']} {k['kid']} ({k['alg']})" for k in keys)
        return f"{name}: client keys {shown}"
    # a certificate is renewed by a person (or a job they set up): say so ahead of time; an assertion
    # file lives minutes to hours and the agent that writes it (kubelet, a SPIRE agent) renews it
    # well before it expires, so only one found expired is news (that agent has stopped)
    for what, path_key, left_key, renew_within, expired in (
        ("client certificate", "cert", "cert_expires_in", RENEW_WITHIN, "renew it"),
        (
            "client assertion file",
            "assertion_file",
            "assertion_expires_in",
            0,
            "whatever writes it stopped renewing it",
        ),
    ):
        if path_key in auth:
            left = auth.get(left_key)
            subject = f" ({auth['cert_subject']})" if auth.get("cert_subject") else ""
            if not isinstance(left, int | float):
                return f"{name}: {what} {auth[path_key]}{subject} cannot be read"
            if left <= 0:
                return f"{name}: {what} {auth[path_key]}{subject} EXPIRED {_fmt_long(-left)} ago: {expired}"
            renew = "; renew it" if left < renew_within else ""
            return f"{name}: {what} {auth[path_key]}{subject} expires in {_fmt_long(left)}{renew}"
    return None


@click.command()
@SOCKET
@click.option("--password-stdin", is_flag=True, help="read the password from stdin instead of a hidden prompt")
@click.option("--no-browser", is_flag=True, help="browser login: print the URL instead of opening a browser")
@PROFILE
def login(socket_path: str | None, password_stdin: bool, no_browser: bool, profile: str) -> None:
    """Log PROFILE in: a password prompt for password profiles, a browser for browser profiles (the
    authorization code flow; with --no-browser, e.g. over ssh, the URL is printed), else the device flow
    (a URL and a code to enter in a browser anywhere). This command waits until you have logged in."""
    try:
        row = ask(socket_path, "status", profile=profile)["profiles"][0]
        grant = row["grant"]
        with_what = SIGNS_IN_WITH.get(str((row.get("client_auth") or {}).get("method")))
        if grant == "client_credentials" and row.get("state") != "login_required":
            click.echo(
                f"Profile {profile} uses client credentials: the broker signs in with "
                f"{with_what or 'its stored client secret'}, so there is nothing to log in."
            )
            return
        if grant == "client_credentials" and with_what is None:  # its client secret is gone (logout forgets it)
            raise LoginRequired(
                f"profile {profile!r} uses client credentials and has no client secret stored (`dc-broker "
                f"logout` forgets it): store it again with `dc-broker rotate {profile} --client-secret`"
            )
        if grant == "password":
            if password_stdin:
                password = sys.stdin.readline().rstrip("\n")
            else:
                password = click.prompt(f"Password for profile {profile}", hide_input=True)
            if not password:
                raise click.UsageError("the password is empty")
            results = ask_stream(socket_path, "login", profile=profile, password=password)
        else:
            results = ask_stream(socket_path, "login", profile=profile)
        countdown = Countdown()
        try:
            for result in results:
                countdown.stop()
                if result.get("logged_in"):
                    expires = fmt_seconds(result.get("expires_in"))
                    click.echo(f"Logged in: profile {profile} has a token for {expires}.")
                    return
                if "authorization_url" in result:
                    _show_authorization_url(profile, result, open_browser=not no_browser)
                else:
                    uri = result.get("verification_uri_complete") or result["verification_uri"]
                    click.echo(
                        f"To log in profile {profile}, open\n\n    {uri}\n\nand enter the code "
                        f"{result['user_code']} (valid {fmt_seconds(result.get('expires_in'))}). Waiting...",
                    )
                countdown.start(result.get("expires_in"))
        finally:
            countdown.stop()
    except KeyboardInterrupt:  # Ctrl-C while waiting: the broker drops the login when the stream closes
        click.echo(f"Login of profile {profile} cancelled.", err=True)
        sys.exit(EXIT_INTERRUPTED)


class Countdown:
    """While a device or browser login waits, the time left on one self-rewriting stderr line (only
    on a terminal: a log or a pipe gets nothing). Ctrl-C and the login's end stop it."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self._stop: Any = None
        self._thread: Any = None

    def start(self, seconds: object) -> None:
        if not isinstance(seconds, int | float) or not seconds > 0 or not self.stream.isatty():
            return
        import signal
        import threading

        self._stop = threading.Event()
        end = time.monotonic() + float(seconds)
        self._thread = threading.Thread(target=self._run, args=(end, self._stop), daemon=True)
        # Ctrl-C and SIGTERM must reach the main thread: there they interrupt the read of the login
        # stream. Taken by this thread instead, they waited until the broker next said something. The
        # thread is born with them blocked (it inherits this mask), so there is no moment it could
        # take one; one that arrives meanwhile is the main thread's when the mask is put back.
        before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            self._thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)

    def _run(self, end: float, stop: Any) -> None:
        while not stop.is_set():
            left = end - time.monotonic()
            if left <= 0:
                break
            self.stream.write(f"\r  {fmt_seconds(left)} left to log in (Ctrl-C cancels)   ")
            self.stream.flush()
            stop.wait(1.0)

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.stream.write("\r" + " " * 50 + "\r")
            self.stream.flush()
            self._thread = None


def _show_authorization_url(profile: str, result: dict[str, Any], *, open_browser: bool) -> None:
    url = str(result["authorization_url"])
    opened = False
    if open_browser:
        import webbrowser

        try:
            opened = webbrowser.open(url)
        except webbrowser.Error:
            opened = False
    lead = (
        f"A browser was opened to log in profile {profile}; if none appeared, open"
        if opened
        else f"To log in profile {profile}, open"
    )
    click.echo(
        f"{lead}\n\n    {url}\n\nin a browser on this machine (valid {fmt_seconds(result.get('expires_in'))}). "
        "Waiting..."
    )


@click.command()
@SOCKET
@PROFILE
def logout(socket_path: str | None, profile: str) -> None:
    """Revoke PROFILE's login at the IdP and forget its secrets (the profile stays configured)."""
    result = ask(socket_path, "logout", profile=profile)
    how = {
        "session": "its session at the identity provider ended",
        "revoked": "its login revoked at the identity provider",
        "nothing": "its login already over at the identity provider (nothing to revoke)",
    }.get(str(result.get("ended")), "its login forgotten (the identity provider did not confirm an end)")
    rest = f"its {result.get('forgotten') or 'secrets'} forgotten"
    if result.get("kept_client_secret"):
        rest += " (the client secret stays: `dc-broker login` uses it)"
    elif result.get("forgotten") == "client secret":
        rest += f" (`dc-broker rotate {profile} --client-secret` stores one again)"
    elif result.get("forgotten") == "token":
        rest += f" (`dc-broker login {profile}` signs in again)"
    click.echo(f"Logged out of profile {profile}: {how}, {rest}.")


@click.command()
@SOCKET
@click.option("--passphrase-stdin", is_flag=True, help="read the passphrase from stdin instead of a prompt")
def unlock(socket_path: str | None, passphrase_stdin: bool) -> None:
    """Unlock the running broker's vault, so it can serve tokens. A vault whose key is in the desktop
    keyring, a key file or a systemd credential needs no passphrase: it is read again; a passphrase
    vault asks for its passphrase (or reads it from stdin)."""
    if passphrase_stdin:
        result = ask(socket_path, "unlock", passphrase=read_secret("Vault passphrase", True).reveal())
    else:
        try:
            result = ask(socket_path, "unlock")  # a key source that needs no passphrase: read it again
        except Locked:  # a passphrase vault (no attempt was counted): ask the person
            passphrase = read_secret("Vault passphrase", False)
            result = ask(socket_path, "unlock", passphrase=passphrase.reveal())
    click.echo(f"Unlocked: serving {result.get('profiles', 0)} profile(s).")


@click.command()
@SOCKET
def lock(socket_path: str | None) -> None:
    """Lock the running broker's vault: keys and tokens leave its memory until `dc-broker unlock`."""
    ask(socket_path, "lock")
    click.echo("Locked.")


#: what this module adds to the `dc-broker` group
COMMANDS = (status, login, logout, unlock, lock)
