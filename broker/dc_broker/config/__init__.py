"""The config: what a profile is, how config.toml becomes one, and how commands edit the file.

    dc_broker.config          PURE  the values (re-exported from ``values``): Profile, Sink,
                                    DaemonSettings, Config, the key tables derived from their fields
    dc_broker.config.values   PURE  the same, where they are defined; no file, no environment
    dc_broker.config.load           config.toml -> Config: reading, TOML errors and bad values named
                                    by file, line and key; the XDG paths; sink paths expanded
    dc_broker.config.edit           the commands' edits (add, set, add --force, remove) through
                                    tomlkit, which keeps comments and formatting; under one lock
                                    (``config_lock``); written with ``dc_broker.atomic``

Importing this package imports only ``values``: the pure modules (``sessions.flows``, ``idp.oidc``)
read profiles from here without reaching a file. Only the commands that edit import ``edit`` (and
with it tomlkit), inside the command.

A config file looks like this (every key: ``dc_broker.config.values.PROFILE_KEYS``)::

    [daemon]
    socket = "/run/user/1000/dc-broker/broker.sock"   # optional

    [profiles.acme]
    server = "https://dc.example.com"    # or issuer = ".../realms/acme", or token_url = "..."
    tenant = "acme"
    client_id = "dc-cli"
    grant = "password"                   # password | client_credentials | device | browser
    username = "alice"
    auth_method = "basic"                # basic | post | none | private_key_jwt | client_secret_jwt
                                         # | tls_client_auth | client_assertion_file (docs/keycloak.md)
    scope = "openid"
    ca_bundle = "/etc/ssl/certs/acme.pem"
    proxy = "http://proxy.corp:3128"     # or "direct"; unset: https_proxy / no_proxy (dc_broker.idp.proxies)

    [[profiles.acme.sinks]]              # token files the broker keeps current (dc_broker.sinks)
    path = "~/.local/state/dc-broker/acme.token"
    format = "token"                     # token | header | json | env
    mode = "0600"                        # at most 0660; group = "analytics" for a shared file
"""

from dc_broker.config.values import (
    ASSERTION_AUDIENCES,
    AUTH_METHODS,
    DAEMON_KEYS,
    GRANTS,
    PROFILE_KEYS,
    SECRET_METHODS,
    SETTABLE_KEYS,
    SINK_FORMATS,
    SINK_KEYS,
    BadValue,
    Config,
    DaemonSettings,
    Profile,
    Sink,
    check_url,
    profile_settings,
)

__all__ = [
    "ASSERTION_AUDIENCES",
    "AUTH_METHODS",
    "DAEMON_KEYS",
    "GRANTS",
    "PROFILE_KEYS",
    "SECRET_METHODS",
    "SETTABLE_KEYS",
    "SINK_FORMATS",
    "SINK_KEYS",
    "BadValue",
    "Config",
    "DaemonSettings",
    "Profile",
    "Sink",
    "check_url",
    "profile_settings",
]
