"""``dc-token``: hand a valid bearer token from the running dc-broker to a program, in the form it wants.

    curl -H "Authorization: Bearer $(dc-token acme)" https://dc.example.com/dp/api/v1/...
    curl -H "$(dc-token acme --header)" ...          kubectl: --exec-credential     git: git-credential
    dc-token exec acme -- ./script.sh                the token in $DC_TOKEN, the command exec'd
    dc-token exec acme --token-file --signal HUP -- ./daemon    kept current beside a long-lived command

Every failure is one line on stderr ("dc-token: <what is wrong>; <what to do>") and a distinct exit
status (``dc_token.errors.EXIT_CODES``). Start-up time is most of what this command costs (the
launcher, client/scripts/dc-token, starts Python without ``site``), so the command line is parsed by
hand (no argparse: it pulls in re, gettext and shutil), its requests go through its own driver over
``ClientConnection`` with the ``_socket`` module and ``dc_token.minipack`` (``socket`` builds enums of
its constants at import, msgpack imports datetime), and nothing else beyond the standard library's
cheapest is imported on the way to a token: json, math, os and the clients only where they are used.
"""

import sys
import time

from dc_token.errorbase import BrokerTimeout, BrokerUnavailable, DcBrokerError
from dc_token.paths import ANSWER_TIMEOUT as TIMEOUT
from dc_token.protocol import MAX_MIN_TTL, NEED_DATA, min_ttl_problem

# dc-token imports this module on every run: typing, collections.abc and even __future__ cost it
# start-up time, so the annotations that name them are strings (no `from __future__ import annotations`)
TYPE_CHECKING = False
if TYPE_CHECKING:
    import _socket
    from collections.abc import Callable, Iterable, Sequence
    from typing import Any

    from dc_token.cache import Token

    #: what dc_token.quick hands over (its ``Handover``): the connection, what was read, what stopped it
    Handover = tuple[_socket.socket, bytes, BaseException | None]

PROG = "dc-token"
USAGE = f"""usage: {PROG} PROFILE [--header | --json | --exec-credential] [--id-token | --scope SCOPE]
                [--min-ttl SECONDS] [--socket PATH]
       {PROG} exec PROFILE [--env NAME] [--token-file] [--signal SIG | --restart] [--scope SCOPE] [--min-ttl SECONDS]
                    [--socket PATH] -- COMMAND [ARG...]
       {PROG} git-credential [--profile NAME] [--username NAME] [--min-ttl SECONDS] [--socket PATH] get|store|erase"""

#: a first word that makes the command line one of the other forms (dc_token.quick.FORMS: the same words)
FORMS = {"exec": "exec", "git-credential": "git"}
#: kubectl's ExecCredential expires this long before the token does, so kubectl asks again in time
EXEC_CREDENTIAL_MARGIN = 60.0
#: env var `dc-token exec` puts the token in, unless --env says otherwise
DEFAULT_ENV = "DC_TOKEN"
#: default --min-ttl per form: kubectl caches until expirationTimestamp, git may run a long push
DEFAULT_MIN_TTL = {"token": 0.0, "exec-credential": 2 * EXEC_CREDENTIAL_MARGIN, "git": 60.0, "exec": 0.0}
#: expiry times printed are at most this far ahead (a broker or IdP promising more is not believed)
MAX_PRINTED_LIFETIME = 10 * 365 * 86400.0
#: shell conventions for a command that cannot be run (`dc-token exec`)
#: `git-credential get` with no profile for the URL: nothing to say, so exit like "unknown profile"
EXIT_NO_PROFILE = 4  # UnknownProfile.exit_code (tests/test_startup.py holds them equal)


def _help() -> str:
    from dc_token.errors import EXIT_CODES

    codes = "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES.items())
    exec_ttl = DEFAULT_MIN_TTL["exec-credential"]
    return f"""{USAGE}

Print a valid bearer token for PROFILE from the running dc-broker (nothing else on stdout).

output forms (one of):
  (default)          the token and a newline
  --header           Authorization: Bearer <token>
  --json             {{"token", "type", "expires_at" (unix seconds), "expires_in", "scope", "profile"}}
  --exec-credential  a kubectl client.authentication.k8s.io/v1 ExecCredential; its expirationTimestamp
                     is {EXEC_CREDENTIAL_MARGIN:g} s before the token's real expiry (min-ttl default {exec_ttl:g})
  --id-token         the login's OIDC ID token instead of the access token, in any form above (--json:
                     {{"id_token", "expires_at", "expires_in", "profile"}}); kubectl's OIDC authenticator
                     takes it through --exec-credential. The profile's scope must include openid

options:
  --min-ttl SECONDS  the token must stay valid at least this long (default 0; git-credential 60;
                     at most {MAX_MIN_TTL:g}). The broker honours up to half the token lifetime the
                     identity provider grants; asked for more, it serves a token with that much left
                     and says so: the reply carries min_ttl_shortfall, and dc-token warns on stderr
                     (exit status 0, the token on stdout as usual)
  --scope SCOPE      a narrower scope than the profile's, e.g. "openid email" (the broker narrows its login)
  --socket PATH      broker socket (default: $DC_BROKER_SOCKET, else $XDG_RUNTIME_DIR/dc-broker/broker.sock)
  -h, --help         this text
  -V, --version      print dc-token's version

{PROG} exec PROFILE [--env NAME] -- COMMAND [ARG...]
  replaces itself with COMMAND, the token in $NAME (default ${DEFAULT_ENV}); signals and the exit
  status are COMMAND's own. Exit 127 if COMMAND is not found, 126 if it cannot be executed.
  For a command that outlives a token, dc-token stays beside it instead:
  --token-file       COMMAND gets $DC_TOKEN_FILE, a private file kept holding the current token
                     (replaced atomically; removed when COMMAND exits); no ${DEFAULT_ENV} then
  --signal SIG       with --token-file: send COMMAND SIG (e.g. HUP) after each new token
  --restart          stop COMMAND (SIGTERM) after each new token and start it again with the new ${DEFAULT_ENV}
  SIGINT/SIGTERM/SIGHUP/SIGQUIT/SIGUSR1/SIGUSR2 sent to dc-token go to COMMAND; stdin and the exit
  status (or the signal that killed it) are COMMAND's.

{PROG} git-credential [--profile NAME] [--username NAME] get|store|erase
  git's credential-helper protocol. The profile is --profile, else the git config value
  dc-token.<url>.profile that best matches the remote URL (git config --get-urlmatch), e.g.
      git config --global credential.https://dc.example.com.helper "!dc-token git-credential --profile acme"
  or  git config --global credential.https://dc.example.com.helper "!dc-token git-credential"
      git config --global dc-token.https://dc.example.com.profile acme
  `get` answers username (--username, else the URL's, else "oauth2"), password=<token> and
  password_expiry_utc; with no broker or no profile it prints nothing and exits non-zero, so git
  falls through to its next helper or prompt. `erase` (git saw a 401) invalidates that token;
  `store` does nothing (the broker keeps the tokens).

exit status:
{codes}
"""


class _Usage(Exception):
    """A command-line mistake: exit 2 with this one line."""


def _fail(exc: "DcBrokerError", profile: str) -> int:
    """One line: what is wrong, then what to do (unless the broker's message already says it)."""
    from dc_token.errors import hint_for

    message = str(exc)
    hint = hint_for(exc, profile)
    line = f"{PROG}: {message}; {hint}" if hint else f"{PROG}: {message}"
    sys.stderr.write(line + "\n")
    return exc.exit_code


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    problem = min_ttl_problem(seconds)
    if problem is not None:
        raise _Usage(f"--min-ttl {problem}")
    return seconds


def _warn_short(remaining: float, min_ttl: float) -> None:
    """Never a silent shortfall: a token with less than --min-ttl left is said to be one."""
    if remaining < min_ttl:
        sys.stderr.write(
            f"{PROG}: warning: the token has {max(0.0, remaining):.0f} s left, less than --min-ttl {min_ttl:g}: "
            "the identity provider grants shorter tokens (the broker honours up to half their lifetime)\n"
        )


def _bounded(expires_at: float, now: float) -> float:
    """An expiry time fit for printing: finite, not past ``now + MAX_PRINTED_LIFETIME``."""
    if expires_at != expires_at:  # NaN
        return now
    return min(expires_at, now + MAX_PRINTED_LIFETIME)


def _scope(value: str) -> str:
    scope = " ".join(value.split())
    if not scope:
        raise _Usage('--scope needs space-separated scope names, e.g. --scope "openid email"')
    return scope


def _signal(value: str) -> int:
    from dc_token.supervise import signal_number

    try:
        return signal_number(value)
    except (ValueError, KeyError):
        raise _Usage(f"--signal {value}: not a signal name (e.g. HUP, USR1) or number") from None


class _Args:
    """The parsed command line: which form, its options, its operands."""

    def __init__(self, form: str) -> None:
        self.form = form
        self.profile = ""
        self.output = "token"
        self.min_ttl: float | None = None
        self.socket: str | None = None
        self.env = DEFAULT_ENV
        self.scope: str | None = None
        self.id_token = False
        self.token_file = False
        self.notify: int | None = None
        self.restart = False
        self.username: str | None = None
        self.command: list[str] = []
        self.operands: list[str] = []
        #: the conversation ``dc_token.quick`` began and hands over (its reply was not a plain token)
        self.handover: Handover | None = None


#: per form: option -> (takes a value, how to apply it)
_COMMON: "dict[str, tuple[bool, Callable[[_Args, str], None]]]" = {
    "--min-ttl": (True, lambda a, v: setattr(a, "min_ttl", _seconds(v))),
    "--socket": (True, lambda a, v: setattr(a, "socket", v)),
    "--scope": (True, lambda a, v: setattr(a, "scope", _scope(v))),
}
_OPTIONS: "dict[str, dict[str, tuple[bool, Callable[[_Args, str], None]]]]" = {
    "token": {
        **_COMMON,
        "--header": (False, lambda a, v: setattr(a, "output", "header")),
        "--json": (False, lambda a, v: setattr(a, "output", "json")),
        "--exec-credential": (False, lambda a, v: setattr(a, "output", "exec-credential")),
        "--id-token": (False, lambda a, v: setattr(a, "id_token", True)),
    },
    "exec": {
        **_COMMON,
        "--env": (True, lambda a, v: setattr(a, "env", v)),
        "--token-file": (False, lambda a, v: setattr(a, "token_file", True)),
        "--signal": (True, lambda a, v: setattr(a, "notify", _signal(v))),
        "--restart": (False, lambda a, v: setattr(a, "restart", True)),
    },
    "git": {
        **_COMMON,
        "--profile": (True, lambda a, v: setattr(a, "profile", v)),
        "--username": (True, lambda a, v: setattr(a, "username", v)),
    },
}


def parse(argv: "Sequence[str]") -> "_Args":
    """Parse by hand. Raises _Usage for mistakes; --help is the caller's business."""
    argv = list(argv)
    form = FORMS.get(argv[0] if argv else "", "token")
    if form != "token":
        argv = argv[1:]
    args = _Args(form)
    options = _OPTIONS[form]
    outputs = 0
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            if form != "exec":
                args.operands += argv[i:]
            else:
                args.command = argv[i:]
            break
        if arg.startswith("-") and arg != "-":
            name, eq, value = arg.partition("=")
            spec = options.get(name)
            if spec is None:
                raise _Usage(f"unknown option {name} (see {PROG} --help)")
            takes_value, apply = spec
            if takes_value and not eq:
                if i >= len(argv):
                    raise _Usage(f"{name} needs a value")
                value = argv[i]
                i += 1
            elif eq and not takes_value:
                raise _Usage(f"{name} takes no value")
            if name in ("--header", "--json", "--exec-credential"):
                outputs += 1
            apply(args, value)
            continue
        if form == "exec" and args.operands:  # PROFILE taken: the command starts here
            args.command = argv[i - 1 :]
            break
        args.operands.append(arg)
    if outputs > 1:
        raise _Usage("--header, --json and --exec-credential are alternatives: give one")
    if form == "git":
        if len(args.operands) != 1:
            raise _Usage("git-credential needs one operation: get, store or erase")
        return args
    if len(args.operands) != 1:
        raise _Usage("give one PROFILE" if args.operands else "missing PROFILE (see dc-token --help)")
    args.profile = args.operands[0]
    if args.id_token and args.scope:
        raise _Usage("--id-token and --scope are alternatives: the ID token is the login's, whatever the scope")
    if form == "exec" and not args.command:
        raise _Usage("exec needs a COMMAND after the profile (dc-token exec PROFILE -- COMMAND...)")
    if form == "exec" and (not args.env or "=" in args.env):
        raise _Usage("--env needs a variable name")
    if args.notify is not None and args.restart:
        raise _Usage("--signal and --restart are alternatives: give one")
    if args.notify is not None and not args.token_file:
        raise _Usage("--signal needs --token-file (the command re-reads the file when signalled)")
    return args


def ask(
    socket_path: str | None, op: str, args: "dict[str, Any]", handover: "Handover | None" = None
) -> "dict[str, Any]":
    """One request on a connection of its own, and its result: dc-token's driver over
    ``ClientConnection`` (``TokenClient``'s errors: ``BrokerUnavailable`` naming what to do,
    ``BrokerTimeout`` after ``TIMEOUT`` s, an error reply as its ``BrokerError``). ``handover``:
    this very request was already sent by ``dc_token.quick`` on that connection, and this is what
    came back (the same bytes: tests/test_quick.py); carry on from there."""
    import _socket

    from dc_token.connection import ClientConnection, Closed, End, Failed
    from dc_token.paths import default_socket_path, unreachable
    from dc_token.protocol import minipack_codec

    where = socket_path or default_socket_path()
    conn = ClientConnection(minipack_codec())
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM) if handover is None else handover[0]
    try:
        if handover is None:
            sock.settimeout(TIMEOUT)
            try:
                sock.connect(where)
            except OSError as exc:
                raise unreachable(where, exc) from None
            sock.sendall(conn.send_request(op, args)[1])
        else:
            conn.send_request(op, args)  # request 1, as quick sent it
            _, received, stopped = handover
            if received:
                conn.receive_data(received)
            if stopped is not None:  # quick's reading failed before a whole reply came
                raise stopped
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                conn.receive_data(sock.recv(65536))
            elif isinstance(event, Failed):
                raise event.error
            elif isinstance(event, Closed):
                raise BrokerUnavailable(f"the broker on {where} closed the connection")
            elif isinstance(event, End):
                return {}
            else:
                return event.result  # type: ignore[union-attr]
    except (BrokenPipeError, ConnectionResetError):
        raise BrokerUnavailable(f"the broker on {where} closed the connection") from None
    except TimeoutError:
        raise BrokerTimeout(f"the broker on {where} did not answer within {TIMEOUT:g} s") from None
    finally:
        sock.close()


def _token(args: "_Args", min_ttl: float) -> "Token":
    from dc_token.cache import Token, token_args

    result = ask(args.socket, "token", token_args(args.profile, min_ttl, args.scope), args.handover)
    return Token.from_result(result, args.profile)


def _rfc3339(unix: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))


def _print_token(args: "_Args") -> int:
    min_ttl = args.min_ttl if args.min_ttl is not None else DEFAULT_MIN_TTL.get(args.output, 0.0)
    if args.id_token:
        return _print_id_token(args, min_ttl)
    tok = _token(args, min_ttl)
    if args.scope:
        from dc_token.scopes import check_scope

        check_scope(args.scope, tok.scope, args.profile)
    now = time.time()
    expires_at = _bounded(tok.expires_at, now)
    _warn_short(expires_at - now, min_ttl)
    if args.output == "token":
        out = tok.token
    elif args.output == "header":
        out = f"Authorization: Bearer {tok.token}"
    else:
        if args.output == "json":
            doc: dict[str, object] = {
                "token": tok.token,
                "type": tok.type,
                "expires_at": int(expires_at),
                "expires_in": max(0, int(expires_at - now)),
                "scope": tok.scope,
                "profile": tok.profile,
            }
        else:
            doc = exec_credential(tok.token, expires_at, now)
        out = dumps(doc)
    sys.stdout.write(out + "\n")
    sys.stdout.flush()
    return 0


def _print_id_token(args: "_Args", min_ttl: float) -> int:
    """``--id-token``: the login's ID token in the form asked for (kubectl's OIDC authenticator takes
    it as its bearer token, through ``--exec-credential``)."""
    result = ask(args.socket, "id_token", {"profile": args.profile, "min_ttl": min_ttl})
    id_token = result["id_token"]
    now = time.time()
    expires_at = _bounded(float(result["expires_at"]), now)
    _warn_short(expires_at - now, min_ttl)
    if args.output == "token":
        out = id_token
    elif args.output == "header":
        out = f"Authorization: Bearer {id_token}"
    elif args.output == "json":
        doc: dict[str, object] = {
            "id_token": id_token,
            "expires_at": int(expires_at),
            "expires_in": max(0, int(expires_at - now)),
            "profile": result.get("profile", args.profile),
        }
        out = dumps(doc)
    else:
        out = dumps(exec_credential(id_token, expires_at, now))
    sys.stdout.write(out + "\n")
    sys.stdout.flush()
    return 0


def _json_str(value: str) -> str:
    if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
        return f'"{value}"'
    import json

    return json.dumps(value)


def dumps(doc: dict[str, object]) -> str:
    """``json.dumps`` for our flat documents (str, int, nested dicts) without importing json (and re)
    for the usual all-printable-ASCII values; the same text json.dumps gives."""
    parts = []
    for key, value in doc.items():
        if isinstance(value, dict):
            text = dumps(value)
        elif isinstance(value, str):
            text = _json_str(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            text = str(value)
        else:
            import json

            text = json.dumps(value)
        parts.append(f"{_json_str(key)}: {text}")
    return "{" + ", ".join(parts) + "}"


def exec_credential(token: str, expires_at: float, now: float | None = None) -> dict[str, object]:
    """kubectl's ExecCredential (client.authentication.k8s.io/v1), expiring a margin before the token:
    ``EXEC_CREDENTIAL_MARGIN``, or half the time left for a short token, so that the expiry it
    reports is never already past."""
    import math

    now = time.time() if now is None else now
    early = expires_at - EXEC_CREDENTIAL_MARGIN
    half = now + max(0.0, expires_at - now) / 2
    # RFC 3339 here has whole seconds: round the margin down, a short token's half-life up
    stamp = math.floor(early) if early >= half else math.ceil(half)
    return {
        "apiVersion": "client.authentication.k8s.io/v1",
        "kind": "ExecCredential",
        "spec": {},
        "status": {"token": token, "expirationTimestamp": _rfc3339(stamp)},
    }


def _exec(args: "_Args") -> int:
    import os

    from dc_token.errors import EXIT_CANNOT_EXECUTE, EXIT_NOT_FOUND

    if args.token_file or args.restart:
        from dc_token.supervise import Supervisor
        from dc_token.sync import TokenClient

        with TokenClient(args.socket, cache=False) as client:
            return Supervisor(
                client,
                args.profile,
                args.command,
                env_name=args.env,
                min_ttl=args.min_ttl or 0.0,
                scope=args.scope,
                token_file=args.token_file,
                notify=args.notify,
                restart=args.restart,
            ).run()
    tok = _token(args, args.min_ttl or 0.0)
    if args.scope:  # as the printing path: the command never gets a token without the scopes it was asked for
        from dc_token.scopes import check_scope

        check_scope(args.scope, tok.scope, args.profile)
    env = dict(os.environ)
    env[args.env] = tok.token
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(args.command[0], args.command, env)  # noqa: S606 - the user's own command, by design
    except FileNotFoundError:
        sys.stderr.write(f"{PROG}: {args.command[0]}: command not found\n")
        return EXIT_NOT_FOUND
    except OSError as exc:
        sys.stderr.write(f"{PROG}: {args.command[0]}: {exc.strerror or exc}\n")
        return EXIT_CANNOT_EXECUTE


def read_credential(stream: "Iterable[str]") -> dict[str, str]:
    """git's credential attributes: key=value lines up to a blank line (array keys keep the last)."""
    attrs: dict[str, str] = {}
    for line in stream:
        line = line.rstrip("\n")
        if not line:
            break
        key, eq, value = line.partition("=")
        if eq:
            attrs[key] = value
    return attrs


def _credential_url(attrs: dict[str, str]) -> str:
    url = f"{attrs.get('protocol', 'https')}://{attrs.get('host', '')}"
    return f"{url}/{attrs['path']}" if attrs.get("path") else url


def _profile_from_git_config(attrs: dict[str, str]) -> str:
    """`git config --get-urlmatch dc-token.profile URL`: the dc-token.<url>.profile that best matches."""
    import subprocess

    if not attrs.get("host"):
        return ""
    try:
        found = subprocess.run(
            ["git", "config", "--get-urlmatch", "dc-token.profile", _credential_url(attrs)],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return found.stdout.strip() if found.returncode == 0 else ""


def _git_credential(args: "_Args") -> int:
    operation = args.operands[0]
    if operation not in ("get", "store", "erase"):
        return 0  # git's rule: ignore operations we do not know
    attrs = read_credential(sys.stdin)
    profile = args.profile or _profile_from_git_config(attrs)
    if operation == "store" or not profile:
        return 0 if operation != "get" else EXIT_NO_PROFILE
    args.profile = profile
    try:
        if operation == "erase":
            if attrs.get("password"):
                ask(args.socket, "invalidate", {"profile": profile, "token": attrs["password"]})
            return 0
        tok = _token(args, args.min_ttl if args.min_ttl is not None else DEFAULT_MIN_TTL["git"])
    except BrokerUnavailable as exc:
        return exc.exit_code  # quietly: git falls through to its next helper or the prompt
    except DcBrokerError as exc:
        return 0 if operation == "erase" else _fail(exc, profile)
    username = args.username or attrs.get("username") or "oauth2"
    expiry = int(_bounded(tok.expires_at, time.time()))
    sys.stdout.write(f"username={username}\npassword={tok.token}\npassword_expiry_utc={expiry}\n")
    sys.stdout.flush()
    return 0


def _complete_profiles(argv: list[str]) -> int:
    """Shell completion (``dc-broker completion``): the profiles the running broker lets us use."""
    socket = argv[1] if argv[:1] == ["--socket"] and len(argv) > 1 else None
    try:
        names = [p["profile"] for p in ask(socket, "status", {})["profiles"]]
    except DcBrokerError:
        return 0  # no broker: nothing to complete, and nothing to say
    sys.stdout.write("".join(f"{name}\n" for name in names))
    return 0


_RUN: "dict[str, Callable[[_Args], int]]" = {"token": _print_token, "exec": _exec, "git": _git_credential}


def main(argv: "Sequence[str] | None" = None, handover: "Handover | None" = None) -> int:
    """dc-token's command line. ``handover``: the conversation ``dc_token.quick`` began for this
    very command line (``dc-token PROFILE``) and leaves to the full path."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        head = argv[: argv.index("--")] if "--" in argv else argv
        if "-h" in head or "--help" in head:
            sys.stdout.write(_help())
            return 0
    if argv[:1] == ["--complete-profiles"]:
        return _complete_profiles(argv[1:])
    if argv[:1] in (["--version"], ["-V"]):
        from dc_token.version import version

        sys.stdout.write(f"{PROG} {version()}\n")
        return 0
    try:
        args = parse(argv)
    except _Usage as exc:
        sys.stderr.write(f"{PROG}: {exc}\n")
        return 2
    args.handover = handover
    try:
        return _RUN[args.form](args)
    except DcBrokerError as exc:
        return _fail(exc, args.profile)
    except KeyboardInterrupt:
        from dc_token.errors import EXIT_INTERRUPTED

        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (`dc-token acme | head -c0`)
        return 1


if __name__ == "__main__":
    sys.exit(main())
