"""``dc-broker``: the daemon's command line (click), assembled here from the modules that own each job.

    dc_broker.cli.boundary    the shared options and the one error boundary (error tree -> message, hint,
                              exit status); no commands
    dc_broker.cli.talk        commands that talk to the running daemon: status, login, logout, unlock, lock
    dc_broker.cli.files       commands that work on the config and the vault: init, add, set, rotate,
                              remove, list, passwd
    dc_broker.cli.run         commands that run things until a signal: run, dev, proxy
    dc_broker.cli.units       dc-broker systemd install: the unit files
    dc_broker.cli.completion  dc-broker completion SHELL, and completing PROFILE arguments

This module only builds the group and runs it (``main``, the ``dc-broker`` entry point). Imports go
one way: it imports the job modules, they import ``boundary`` (and ``files`` imports ``talk``'s
``ask``), none imports this module. Every start (``--help``, each TAB) imports all of them, so they
import trio, httpx, the daemon and the vault only inside the commands that use them.
"""

from __future__ import annotations

import click

from dc_broker.cli import completion, files, health, run, talk, units
from dc_broker.cli.boundary import ErrorBoundary
from dc_broker.cli.boundary import main as _run_group
from dc_token.version import version

__all__ = ["cli", "main"]


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """``--version``: the package metadata is read here, when asked, not at every start (it costs
    ``importlib.metadata`` and its zipfile and csv imports)."""
    if value and not ctx.resilient_parsing:
        click.echo(f"dc-broker {version()}")
        ctx.exit()


@click.group(cls=ErrorBoundary, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    is_eager=True,
    expose_value=False,
    callback=_print_version,
    help="Show the version and exit.",
)
def cli() -> None:
    """dc-broker: keeps bearer tokens for Keycloak-protected APIs fresh and serves them to local programs."""


for _module in (run, talk, health, files, units, completion):
    for _command in _module.COMMANDS:
        cli.add_command(_command)


def main() -> None:
    """The ``dc-broker`` entry point."""
    _run_group(cli, "dc-broker")
