"""The click options every dc-broker command that finds the socket, config or vault shares."""

from __future__ import annotations

import click

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
