"""The commands that run things in the foreground until a signal: ``dc-broker run`` (the daemon),
``dc-broker dev`` (the dev IdP, the demo API and a broker, in one process) and ``dc-broker proxy``
(the authenticating HTTP proxy, ``dc_broker.proxy``).

Owns how each is started from the command line: logging, process hardening, where secrets come from
(``--secrets-stdin``, the vault, or memory only), the dev IdP's demo profiles, and the proxy's
checks before it binds. What runs is not here: the daemon is ``dc_broker.daemon.run_broker``, the
proxy ``dc_broker.proxy.serve.run_proxy``, the dev IdP ``dc_broker.devserver``. Errors are raised, also
from inside ``trio.run`` and its nurseries, and printed by the boundary (``dc_broker.cli.boundary``).
trio, the daemon and the vault are imported inside the commands: every start of ``dc-broker``
(``--help``, each TAB) imports this module.
"""

from __future__ import annotations

import logging
import os
import sys
import tomllib
from typing import TYPE_CHECKING

import click

from dc_broker.cli.boundary import CONFIG, PROFILE, SOCKET, VAULT, VERBOSE, socket_option
from dc_broker.config import Config, Profile
from dc_broker.config.load import load_config
from dc_broker.errors import ConfigError
from dc_broker.secret import Secret
from dc_token.paths import default_socket_path

if TYPE_CHECKING:
    from dc_broker.store import MemoryStore, SecretStore

log = logging.getLogger("dc_broker")


#: what the dev IdP needs beyond the daemon: the `dev` extra (import name -> distribution)
DEV_EXTRA = {"hypercorn": "hypercorn", "starlette": "starlette"}


def require_dev_extra(command: str) -> None:
    """Say which command installs the dev IdP's packages when this install lacks them (exit 2), in
    the form that fits how dc-broker was installed: pipx keeps its own venv (``pipx inject``; a
    ``pipx install --force 'dc-broker[dev]'`` would fetch dc-broker from the index, not the wheel the
    user installed from), anything else gets pip of this very interpreter."""
    import importlib

    missing = []
    for module, dist in DEV_EXTRA.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(dist)
    if not missing:
        return
    if _pipx_venv() is not None:
        how = f"`pipx inject dc-broker {' '.join(missing)}`"
    else:
        how = f"`{sys.executable} -m pip install {' '.join(missing)}` (what `pip install 'dc-broker[dev]'` adds)"
    error = click.ClickException(
        f"`{command}` runs the dev IdP, which needs {', '.join(missing)}: not installed with this dc-broker. "
        f"Add them with {how}"
    )
    error.exit_code = 2  # type: ignore[misc]  # a usage problem of this install, as click exits for one
    raise error


def _pipx_venv() -> str | None:
    """This interpreter's venv when pipx made it (``.../pipx/venvs/NAME``), else None."""
    parts = os.path.normpath(sys.prefix).split(os.sep)
    return sys.prefix if len(parts) >= 3 and parts[-3:-1] == ["pipx", "venvs"] else None


def _setup_logging(verbose: bool, log_format: str = "text") -> None:
    from dc_broker.logs import setup_logging

    setup_logging(verbose, log_format=log_format)  # journal fields under systemd, plain lines or JSON elsewhere


def _read_secrets_stdin(profiles: dict[str, Profile]) -> MemoryStore:
    raw = sys.stdin.buffer.read()
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"secrets on stdin are not valid TOML: {exc}") from None
    from dc_broker.store import MemoryStore
    from dc_broker.tokens import Credentials

    store = MemoryStore()
    for name, table in data.items():
        if name not in profiles:
            raise ConfigError(f"secrets on stdin name profile {name!r}, which the config does not define")
        if not isinstance(table, dict) or set(table) - {"password", "client_secret", "refresh_token"}:
            raise ConfigError(f"secrets for {name!r} must be a table of password / client_secret / refresh_token")
        store.set_credentials(
            name,
            Credentials(**{k: Secret(str(v)) for k, v in table.items()}),
        )
    return store


@click.command()
@CONFIG
@socket_option(help="socket to listen on (default: $XDG_RUNTIME_DIR/dc-broker/broker.sock)")
@click.option(
    "--secrets-stdin",
    is_flag=True,
    help="read profile secrets as TOML ([NAME] password=/client_secret=) from stdin; kept in memory only",
)
@click.option(
    "--system",
    is_flag=True,
    help="the shared system broker: default socket /run/dc-broker/broker.sock, mode 0660 (the system unit)",
)
@VERBOSE
@VAULT
def run(
    config_path: str | None,
    socket_path: str | None,
    secrets_stdin: bool,
    system: bool,
    verbose: bool,
    vault_path: str | None,
) -> None:
    """Run the broker in the foreground. SIGTERM/SIGINT answer what is in flight and stop; SIGHUP
    reloads the config. Under systemd: socket activation, Type=notify readiness and the watchdog."""
    import trio

    from dc_broker.hardening import harden
    from dc_token.paths import SYSTEM_SOCKET

    _setup_logging(verbose)
    config = load_config(config_path, missing_ok=config_path is None)
    if config.daemon.log_format != "text":
        _setup_logging(verbose, config.daemon.log_format)
    path = socket_path or config.socket or (SYSTEM_SOCKET if system else default_socket_path())
    _refuse_a_second_broker(path)
    store = _read_secrets_stdin(config.profiles) if secrets_stdin else _open_store(vault_path)
    hardened = harden()
    log.debug("hardening: %s", hardened)
    trio.run(_run_until_signal, config, store, path, system)


def _refuse_a_second_broker(path: str) -> None:
    """A broker already answers on ``path``: say so, where, and what to do, before the vault's lock
    says only that the vault is open elsewhere. Not when systemd passed us the socket: that socket
    is ours, nobody accepts on it yet, and asking it would wait out the whole timeout (a socket-
    activated start took 5 s instead of 0.2)."""
    from dc_broker import systemd
    from dc_broker.cli.talk import ask
    from dc_token.errors import DcBrokerError

    if systemd.listen_fd_count(os.environ, os.getpid()):
        return
    try:
        hello = ask(path, "hello", timeout=5.0)
    except DcBrokerError:
        return  # nobody answers: ours to serve (the socket's own lock settles a race)
    raise ConfigError(
        f"a dc-broker already runs on {path} (pid {hello.get('pid', '?')}, version {hello.get('version', '?')}): "
        "use it (`dc-broker status`), or stop it first (`systemctl --user stop dc-broker`, or end that pid)"
    )


def _open_store(vault_path: str | None) -> SecretStore:
    """The vault (locked when its key is a passphrase, or a keyring that cannot give the key yet), or
    memory only when there is no vault yet."""
    from dc_broker.errors import KeyUnavailable
    from dc_broker.store import MemoryStore
    from dc_broker.vault import Vault, default_vault_path

    path = vault_path or default_vault_path()
    if not os.path.exists(path):
        log.warning("no vault at %s: secrets live in memory only; create one with `dc-broker init`", path)
        return MemoryStore()
    vault = Vault.open(path)
    if vault.key_source.needs_passphrase:
        log.info("vault %s is locked; `dc-broker unlock` opens it", path)
        return vault
    try:
        vault.unlock()
    except KeyUnavailable as exc:  # a keyring not unlocked yet: serve, locked, until it is
        log.warning("vault %s stays locked for now: %s; then run `dc-broker unlock`", path, exc)
    except BaseException:
        vault.close()
        raise
    return vault


async def _run_until_signal(config: Config, store: SecretStore, path: str, system: bool) -> None:
    from dc_broker.daemon import BrokerSettings, run_broker

    settings = BrokerSettings(path, system=system, service=True, config_path=config.path, daemon=config.daemon)
    await run_broker(config.profiles, store, settings)


def demo_profiles(base_url: str) -> tuple[dict[str, Profile], MemoryStore]:
    """The profiles `dc-broker dev` serves, against the dev IdP's demo realm."""
    from dc_broker.store import MemoryStore
    from dc_broker.tokens import Credentials

    profiles = {
        "demo": Profile(
            name="demo", server=base_url, tenant="demo", client_id="dc-cli", grant="password", username="demo"
        ),
        "demo-service": Profile(
            name="demo-service",
            server=base_url,
            tenant="demo",
            client_id="dc-service",
            grant="client_credentials",
        ),
        "demo-device": Profile(
            name="demo-device",
            server=base_url,
            tenant="demo",
            client_id="dc-public",
            grant="device",
            auth_method="none",
        ),
    }
    store = MemoryStore(
        {
            "demo": Credentials(password=Secret("demo"), client_secret=Secret("dc-cli-secret")),
            "demo-service": Credentials(client_secret=Secret("dc-service-secret")),
        }
    )
    return profiles, store


@click.command()
@socket_option(help="socket for the broker (default: a fresh private temp directory)")
@click.option("--port", default=0, show_default=True, help="TCP port for the dev IdP on 127.0.0.1 (0 = any free port)")
@click.option("--access-lifespan", default=1800.0, show_default=True, help="access token lifetime in seconds")
@click.option("--rotate", is_flag=True, help="rotate refresh tokens (Keycloak's 'Revoke Refresh Token')")
@VERBOSE
def dev(socket_path: str | None, port: int, access_lifespan: float, rotate: bool, verbose: bool) -> None:
    """Run the dev IdP, the demo API and a broker with a ready `demo` profile, until Ctrl-C."""
    import trio

    from dc_broker.hardening import harden

    require_dev_extra("dc-broker dev")
    _setup_logging(verbose)
    if socket_path is None:
        import tempfile

        socket_path = os.path.join(tempfile.mkdtemp(prefix="dc-broker-dev-"), "broker.sock")
    harden()
    trio.run(_dev, socket_path, port, access_lifespan, rotate)


async def _dev(socket_path: str, port: int, access_lifespan: float, rotate: bool) -> None:
    import trio

    from dc_broker import devserver
    from dc_broker.daemon import BrokerSettings, run_broker, until_signalled

    idp = devserver.DevIdP([devserver.demo_realm(access_lifespan=access_lifespan, rotate_refresh_tokens=rotate)])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(until_signalled, nursery.cancel_scope)
        base_url = await nursery.start(lambda task_status: devserver.serve(idp, port=port, task_status=task_status))
        profiles, store = demo_profiles(base_url)
        settings = BrokerSettings(socket_path, private_dir=False)  # --socket may name a shared directory
        await nursery.start(lambda task_status: run_broker(profiles, store, settings, task_status=task_status))
        api = f"{base_url}/dp/api/v1/aiconnections/types"
        print(
            f"dc-broker dev is running.\n"
            f"  dev IdP:   {base_url}/realms/demo  (users demo/demo, viewer/viewer)\n"
            f"  demo API:  {api}\n"
            f"  profiles:  demo (password grant), demo-service (client_credentials),\n"
            f"             demo-device (device login: `dc-broker login demo-device`)\n\n"
            f"In another shell:\n"
            f"  export DC_BROKER_SOCKET={socket_path}\n"
            f"  dc-token demo\n"
            f'  curl -H "Authorization: Bearer $(dc-token demo)" {api}\n'
            f"  dc-broker status\n\n"
            f"Ctrl-C stops everything.",
            flush=True,
        )


@click.command(name="proxy")
@CONFIG
@SOCKET
@click.option("--upstream", required=True, help="the API's base URL, e.g. https://dc.example.com")
@click.option(
    "--listen",
    default="127.0.0.1:8765",
    show_default=True,
    help="loopback HOST:PORT, or unix:PATH (a 0600 socket)",
)
@click.option(
    "--ca-bundle",
    type=click.Path(exists=True, dir_okay=False),
    help="CA bundle for the upstream's TLS (default: the profile's ca_bundle, else the system's CAs)",
)
@click.option(
    "--allow-origin",
    "origins",
    multiple=True,
    metavar="ORIGIN",
    help="a web origin (https://app.example.com) whose pages may use the proxy (repeatable)",
)
@VERBOSE
@PROFILE
def proxy(
    config_path: str | None,
    socket_path: str | None,
    upstream: str,
    listen: str,
    ca_bundle: str | None,
    origins: tuple[str, ...],
    verbose: bool,
    profile: str,
) -> None:
    """Serve PROFILE's API on a local address with the token added: point any HTTP client at
    http://127.0.0.1:8765/... . Only your own user may use it; browsers are refused. The upstream is
    reached the way the profile's IdP is: through its proxy, else https_proxy (no_proxy)."""
    import trio

    from dc_broker.daemon import until_signalled
    from dc_broker.idp import proxies
    from dc_broker.proxy.rules import Listen
    from dc_broker.proxy.serve import run_proxy
    from dc_broker.proxy.upstream import check_upstream, tls_context

    _setup_logging(verbose)
    where = Listen.parse(listen)
    check_upstream(upstream)
    configured = load_config(config_path, missing_ok=True).profiles.get(profile)
    if ca_bundle is None:
        ca_bundle = configured.ca_bundle if configured is not None else None
    tls_context(ca_bundle)
    setting = configured.proxy if configured is not None else None
    via = proxies.route(upstream, setting, proxies.EnvProxies.from_environ(os.environ))
    route = "" if via is None else f" via proxy {proxies.shown(via)}"

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(until_signalled, nursery.cancel_scope)
            address = await nursery.start(
                lambda task_status: run_proxy(
                    profile,
                    upstream,
                    where,
                    socket_path=socket_path,
                    ca_bundle=ca_bundle,
                    via=via,
                    allowed_origins=origins,
                    task_status=task_status,
                )
            )
            print(f"dc-broker proxy: http://{address} -> {upstream}{route} (profile {profile})", flush=True)

    trio.run(main)


#: what this module adds to the `dc-broker` group
COMMANDS = (run, dev, proxy)
