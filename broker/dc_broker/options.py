"""What every dc-broker command shares: the click options that find the socket, config and vault,
and the one error boundary (``Failed``, ``ErrorBoundary``) that turns the error tree into an
``Error:`` line, the hint for what to do (``dc_token.errors.hint_for``, the same table dc-token
uses) and the error's own exit status. No command prints an expected failure any other way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from dc_token.errors import DcBrokerError, hint_for


class Failed(click.ClickException):
    """An expected failure: one `Error:` line (plus what to do), the error's own exit status."""

    def __init__(self, exc: DcBrokerError, profile: str | None = None) -> None:
        hint = f"\n  {text}" if (text := hint_for(exc, profile)) else ""
        super().__init__(f"{exc}{hint}")
        self.exit_code = exc.exit_code or 1  # type: ignore[misc]


class ErrorBoundary(click.Group):
    """A group whose commands may simply raise the error tree: any ``DcBrokerError`` that leaves a
    command becomes ``Failed``, its hint naming the command's PROFILE argument when it has one
    (``PROFILE`` remembers it in the context's shared ``meta``)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DcBrokerError as exc:
            raise Failed(exc, ctx.meta.get(_PROFILE_KEY)) from None


_PROFILE_KEY = "dc_broker.profile"


def _remember_profile(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if isinstance(value, str):
        ctx.meta[_PROFILE_KEY] = value
    return value


_F = TypeVar("_F", bound=Callable[..., Any])


def profile_argument(*, required: bool = True) -> Callable[[_F], _F]:
    """The PROFILE argument: completes profile names, and is what an error's hint names."""
    from dc_broker.completion import complete_profiles

    return click.argument("profile", required=required, shell_complete=complete_profiles, callback=_remember_profile)


PROFILE = profile_argument()
SOCKET = click.option(
    "--socket",
    "socket_path",
    type=click.Path(dir_okay=False),
    envvar="DC_BROKER_SOCKET",
    help="broker socket (default: $XDG_RUNTIME_DIR/dc-broker/broker.sock)",
)
CONFIG = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    envvar="DC_BROKER_CONFIG",
    help="config file (default: $XDG_CONFIG_HOME/dc-broker/config.toml)",
)
VAULT = click.option(
    "--vault",
    "vault_path",
    type=click.Path(dir_okay=False),
    envvar="DC_BROKER_VAULT",
    help="vault file (default: $XDG_DATA_HOME/dc-broker/vault.db)",
)
