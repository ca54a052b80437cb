"""What every ``dc-broker`` command shares at its edges: the inputs (the click options that find the
config, socket and vault, the PROFILE argument, a secret from a hidden prompt or stdin) and the one
error boundary, where the error tree becomes what a person sees and the shell gets.

The boundary (``ErrorBoundary``, the root group's ``invoke``, and ``main``) is the only place that
turns an error into output and an exit status:

    DcBrokerError (any, or the first one inside a trio nursery's exception group)
                        -> "Error: <message>" + the hint (``dc_token.errors.hint_for``, PROFILE filled
                           in from the command's PROFILE argument), exit ``exc.exit_code`` (the table
                           dc-token uses: ``dc_token.errors.EXIT_CODES``)
    click.UsageError    -> click's usage line, exit 2
    Ctrl-C              -> "Interrupted.", exit 130 (the shell's convention)
    click.Abort         -> "Aborted.", exit 1

So a command simply raises the error tree; it never catches a ``DcBrokerError`` only to print it, and
never picks an exit status itself (``EXIT_INTERRUPTED`` aside, for a login a person cancels). A
command never declares ``--config``/``--socket``/``--vault``/``-v``/PROFILE by hand: it uses these.

Imports only click and the light ``dc_token`` modules: every start (``--help``, each TAB) reads it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from dc_broker.cli.completion import complete_profiles
from dc_broker.secret import Secret
from dc_token.errors import EXIT_INTERRUPTED, DcBrokerError, hint_for

#: exit status after Ctrl-C (128 + SIGINT), as a shell reports it


class Failed(click.ClickException):
    """An expected failure: one `Error:` line (plus what to do), the error's own exit status."""

    def __init__(self, exc: DcBrokerError, profile: str | None = None) -> None:
        hint = f"\n  {text}" if (text := hint_for(exc, profile)) else ""
        super().__init__(f"{exc}{hint}")
        self.exit_code = exc.exit_code or 1  # type: ignore[misc]


def expected_error(exc: BaseException) -> DcBrokerError | None:
    """The error of ours that ``exc`` is, or (an exception group from a nursery) holds first; None
    for anything else, which stays a traceback: a bug must not look like an expected failure."""
    if isinstance(exc, DcBrokerError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        found: DcBrokerError | BaseExceptionGroup[DcBrokerError] | None = exc.subgroup(DcBrokerError)
        while isinstance(found, BaseExceptionGroup):
            found = found.exceptions[0]
        return found
    return None


#: the commands that read or hold a secret (a password, client secret, passphrase, the vault's data
#: key, or, for `proxy`, the bearer token it adds to every request it forwards): before they run, the
#: process keeps other processes of its user out of its memory (``dc_token.protect.no_dumps``: no
#: core file, no ptrace, no /proc/PID/mem). `run` and `dev` harden themselves (``dc_broker.hardening``).
HOLDS_SECRETS = frozenset({"init", "add", "rotate", "login", "unlock", "passwd", "proxy"})


class ErrorBoundary(click.Group):
    """A group whose commands may simply raise the error tree: any ``DcBrokerError`` that leaves a
    command (alone or inside an exception group) becomes ``Failed``, its hint naming the command's
    PROFILE argument when it has one (``PROFILE`` remembers it in the context's shared ``meta``).
    A command in ``HOLDS_SECRETS`` runs in a process protected before it reads anything."""

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None and command.name in HOLDS_SECRETS:
            from dc_token.protect import no_dumps

            no_dumps(keep_hard_limit=True)  # a browser `login` opens may still dump core if it wants
        return name, command, rest

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (DcBrokerError, BaseExceptionGroup) as exc:
            error = expected_error(exc)
            if error is None:
                raise
            raise Failed(error, ctx.meta.get(_PROFILE_KEY)) from None


def main(group: click.Group, prog_name: str) -> None:
    """Run ``group`` with click's own error handling, except that Ctrl-C exits 130, not 1."""
    try:
        group.main(prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Abort as exc:
        interrupted = isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt)
        click.echo("Interrupted." if interrupted else "Aborted.", err=True)  # click has ended the line
        sys.exit(EXIT_INTERRUPTED if interrupted else 1)
    except KeyboardInterrupt:
        click.echo("\nInterrupted.", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


# ---------------------------------------------------------------- the shared inputs

_PROFILE_KEY = "dc_broker.profile"


def _remember_profile(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if isinstance(value, str):
        ctx.meta[_PROFILE_KEY] = value
    return value


_F = TypeVar("_F", bound=Callable[..., Any])


def profile_argument(*, required: bool = True) -> Callable[[_F], _F]:
    """The PROFILE argument: completes profile names, and is what an error's hint names."""
    return click.argument("profile", required=required, shell_complete=complete_profiles, callback=_remember_profile)


def _path_option(flag: str, dest: str, envvar: str, help: str) -> Callable[[_F], _F]:
    # readable=False: whether it may be read (a socket of a group one is not in) is said by the
    # command's own message and fix, not click's "File ... is not readable"
    return click.option(flag, dest, type=click.Path(dir_okay=False, readable=False), envvar=envvar, help=help)


def socket_option(help: str = "broker socket (default: $XDG_RUNTIME_DIR/dc-broker/broker.sock)") -> Callable[[_F], _F]:
    """``--socket`` (``$DC_BROKER_SOCKET``); ``help`` for a command that listens rather than connects."""
    return _path_option("--socket", "socket_path", "DC_BROKER_SOCKET", help)


PROFILE = profile_argument()
SOCKET = socket_option()
CONFIG = _path_option(
    "--config", "config_path", "DC_BROKER_CONFIG", "config file (default: $XDG_CONFIG_HOME/dc-broker/config.toml)"
)
VAULT = _path_option(
    "--vault", "vault_path", "DC_BROKER_VAULT", "vault file (default: $XDG_DATA_HOME/dc-broker/vault.db)"
)
VERBOSE = click.option("-v", "--verbose", is_flag=True, help="debug logging")


def read_secret(prompt: str, from_stdin: bool, *, empty: str = "") -> Secret:
    """A secret from the next line of stdin (``from_stdin``) or a hidden prompt, never from argv; a
    usage error when there is neither a terminal to prompt on nor the flag, or the line is empty
    (``empty``: what to do instead, e.g. for a client that has no secret). Enter at the prompt is an
    empty answer, not a repeated prompt."""
    if from_stdin:
        line = sys.stdin.readline().rstrip("\n")
    elif sys.stdin.isatty():
        line = click.prompt(prompt, hide_input=True, default="", show_default=False)
    else:
        raise click.UsageError(f"{prompt} needed: pass it on stdin with the matching --...-stdin flag")
    if not line:
        raise click.UsageError(f"{prompt} is empty" + (f"; {empty}" if empty else ""))
    return Secret(line)
