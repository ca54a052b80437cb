"""``dc-broker``: the daemon's command line (click). Expected failures print one ``Error:`` line and
exit non-zero without a traceback.

    dc-broker run      serve the profiles in config.toml on the user socket
    dc-broker dev      dev IdP + demo API + a broker with a ready `demo` profile, in one process
    dc-broker status   ask the running broker what it holds
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import tomllib
from collections.abc import Awaitable, Callable
from typing import Any

import click
import trio

from dc_broker.completion import completion
from dc_broker.config import Config, Profile, load_config
from dc_broker.daemon import BrokerSettings, run_broker, until_signalled
from dc_broker.errors import ConfigError
from dc_broker.hardening import harden
from dc_broker.options import CONFIG, PROFILE, SOCKET, VAULT, ErrorBoundary, Failed, profile_argument
from dc_broker.secret import Secret
from dc_broker.store import MemoryStore, SecretStore
from dc_broker.tokens import Credentials
from dc_token.errors import BrokerError, BrokerUnavailable, DcBrokerError
from dc_token.paths import default_socket_path
from dc_token.version import version

log = logging.getLogger("dc_broker")


#: what the dev IdP needs beyond the daemon: the `dev` extra (import name -> distribution)
DEV_EXTRA = {"hypercorn": "hypercorn", "starlette": "starlette", "jwt": "PyJWT"}


def require_dev_extra(command: str) -> None:
    """Say which command installs the dev IdP's packages when this install lacks them."""
    from importlib.util import find_spec

    missing = [dist for module, dist in DEV_EXTRA.items() if find_spec(module) is None]
    if missing:
        raise click.ClickException(
            f"`{command}` runs the dev IdP, which needs {', '.join(missing)}: not installed here. Install the "
            f"dev extra with `{sys.executable} -m pip install 'dc-broker[dev]'` "
            "(pipx: `pipx install --force 'dc-broker[dev]'`)"
        )


def _setup_logging(verbose: bool) -> None:
    from dc_broker.logs import setup_logging

    setup_logging(verbose)  # journal priority prefixes under systemd, plain lines elsewhere


def _trio_run(fn: Callable[..., Awaitable[None]], *args: Any) -> None:
    """trio.run, with our expected errors (possibly inside nursery exception groups) as one clean line."""
    try:
        trio.run(fn, *args)
    except DcBrokerError as exc:
        raise Failed(exc) from None
    except BaseExceptionGroup as group:
        expected = group.subgroup(DcBrokerError)
        if expected is None:
            raise
        leaf: BaseException = expected
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        assert isinstance(leaf, DcBrokerError)
        raise Failed(leaf) from None


@click.group(cls=ErrorBoundary, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version(), prog_name="dc-broker", message="%(prog)s %(version)s")
def cli() -> None:
    """dc-broker: keeps bearer tokens for Keycloak-protected APIs fresh and serves them to local programs."""


def _read_secrets_stdin(profiles: dict[str, Profile]) -> MemoryStore:
    raw = sys.stdin.buffer.read()
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"secrets on stdin are not valid TOML: {exc}") from None
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


@cli.command()
@CONFIG
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(dir_okay=False),
    envvar="DC_BROKER_SOCKET",
    help="socket to listen on (default: $XDG_RUNTIME_DIR/dc-broker/broker.sock)",
)
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
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
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
    from dc_token.paths import SYSTEM_SOCKET

    _setup_logging(verbose)
    config = load_config(config_path, missing_ok=config_path is None)
    store = _read_secrets_stdin(config.profiles) if secrets_stdin else _open_store(vault_path)
    path = socket_path or config.socket or (SYSTEM_SOCKET if system else default_socket_path())
    hardened = harden()
    log.debug("hardening: %s", hardened)
    _trio_run(_run_until_signal, config, store, path, system)


def _open_store(vault_path: str | None) -> SecretStore:
    """The vault (locked when its key is a passphrase), or memory only when there is no vault yet."""
    from dc_broker.vault import Vault, default_vault_path

    path = vault_path or default_vault_path()
    if not os.path.exists(path):
        log.warning("no vault at %s: secrets live in memory only; create one with `dc-broker init`", path)
        return MemoryStore()
    vault = Vault.open(path, auto_unlock=True)
    if vault.locked:
        log.info("vault %s is locked; `dc-broker unlock` opens it", path)
    return vault


async def _run_until_signal(config: Config, store: SecretStore, path: str, system: bool) -> None:
    settings = BrokerSettings(path, system=system, service=True, config_path=config.path, daemon=config.daemon)
    await run_broker(config.profiles, store, settings)


def demo_profiles(base_url: str) -> tuple[dict[str, Profile], MemoryStore]:
    """The profiles `dc-broker dev` serves, against the dev IdP's demo realm."""
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


@cli.command()
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(dir_okay=False),
    envvar="DC_BROKER_SOCKET",
    help="socket for the broker (default: a fresh private temp directory)",
)
@click.option("--port", default=0, show_default=True, help="TCP port for the dev IdP on 127.0.0.1 (0 = any free port)")
@click.option("--access-lifespan", default=1800.0, show_default=True, help="access token lifetime in seconds")
@click.option("--rotate", is_flag=True, help="rotate refresh tokens (Keycloak's 'Revoke Refresh Token')")
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
def dev(socket_path: str | None, port: int, access_lifespan: float, rotate: bool, verbose: bool) -> None:
    """Run the dev IdP, the demo API and a broker with a ready `demo` profile, until Ctrl-C."""
    require_dev_extra("dc-broker dev")
    _setup_logging(verbose)
    if socket_path is None:
        import tempfile

        socket_path = os.path.join(tempfile.mkdtemp(prefix="dc-broker-dev-"), "broker.sock")
    harden()
    _trio_run(_dev, socket_path, port, access_lifespan, rotate)


async def _dev(socket_path: str, port: int, access_lifespan: float, rotate: bool) -> None:
    from dc_broker import devserver

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


def _fmt_seconds(value: Any) -> str:
    if value is None:
        return "-"
    value = float(value)
    if value < 0:
        return "expired"
    minutes, seconds = divmod(int(value), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


@cli.command()
@SOCKET
@click.option("--json", "as_json", is_flag=True, help="print the broker's status as JSON")
@profile_argument(required=False)
def status(socket_path: str | None, as_json: bool, profile: str | None) -> None:
    """Show the profiles the running broker holds: state, expiry, last refresh, last error."""
    from dc_token.sync import TokenClient

    try:
        with TokenClient(socket_path) as broker:
            result = broker.status(profile)
    except (BrokerError, BrokerUnavailable) as exc:
        raise Failed(exc, profile) from None
    if as_json:
        click.echo(json.dumps(result, indent=2, sort_keys=True))
        return
    info = result["broker"]
    click.echo(f"broker {info['version']} pid {info['pid']} on {info['socket']}, up {_fmt_seconds(info['uptime'])}")
    rows = [("PROFILE", "STATE", "EXPIRES IN", "LAST REFRESH", "LAST ERROR")]
    for p in result["profiles"]:
        last = time.strftime("%H:%M:%S", time.localtime(p["last_refresh"])) if p.get("last_refresh") else "-"
        rows.append((p["profile"], p["state"], _fmt_seconds(p.get("expires_in")), last, p.get("last_error") or ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        click.echo("  ".join(c.ljust(widths[i]) for i, c in enumerate(r[:4])) + "  " + r[4])
    if info.get("truncated"):
        counts = ", ".join(f"{n} {state}" for state, n in sorted(info.get("states", {}).items()))
        click.echo(f"... and {info['truncated']} more ({counts} in all); `dc-broker status PROFILE` shows one")


@cli.command()
@SOCKET
@click.option("--password-stdin", is_flag=True, help="read the password from stdin instead of a hidden prompt")
@click.option("--no-browser", is_flag=True, help="browser login: print the URL instead of opening a browser")
@PROFILE
def login(socket_path: str | None, password_stdin: bool, no_browser: bool, profile: str) -> None:
    """Log PROFILE in: a password prompt for password profiles, a browser for browser profiles (the
    authorization code flow; with --no-browser, e.g. over ssh, the URL is printed), else the device flow
    (a URL and a code to enter in a browser anywhere). This command waits until you have logged in."""
    from dc_broker.manage import ask, ask_stream

    try:
        grant = ask(socket_path, "status", profile=profile)["profiles"][0]["grant"]
        if grant == "client_credentials":
            click.echo(
                f"Profile {profile} uses client credentials: the broker signs in with its stored client secret, "
                "so there is nothing to log in."
            )
            return
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
                    expires = _fmt_seconds(result.get("expires_in"))
                    click.echo(f"Logged in: profile {profile} has a token for {expires}.")
                    return
                if "authorization_url" in result:
                    _show_authorization_url(profile, result, open_browser=not no_browser)
                else:
                    uri = result.get("verification_uri_complete") or result["verification_uri"]
                    click.echo(
                        f"To log in profile {profile}, open\n\n    {uri}\n\nand enter the code "
                        f"{result['user_code']} (valid {_fmt_seconds(result.get('expires_in'))}). Waiting...",
                    )
                countdown.start(result.get("expires_in"))
        finally:
            countdown.stop()
    except DcBrokerError as exc:
        raise Failed(exc, profile) from None
    except KeyboardInterrupt:  # Ctrl-C while waiting: the broker drops the login when the stream closes
        click.echo(f"Login of profile {profile} cancelled.", err=True)
        sys.exit(130)


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
        import threading

        self._stop = threading.Event()
        end = time.monotonic() + float(seconds)
        self._thread = threading.Thread(target=self._run, args=(end, self._stop), daemon=True)
        self._thread.start()

    def _run(self, end: float, stop: Any) -> None:
        while not stop.is_set():
            left = end - time.monotonic()
            if left <= 0:
                break
            self.stream.write(f"\r  {_fmt_seconds(left)} left to log in (Ctrl-C cancels)   ")
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
        f"{lead}\n\n    {url}\n\nin a browser on this machine (valid {_fmt_seconds(result.get('expires_in'))}). "
        "Waiting..."
    )


from dc_broker.manage import COMMANDS  # noqa: E402 - registered beside the other commands

for _command in COMMANDS:
    cli.add_command(_command)

from dc_broker.systemd_install import systemd_group  # noqa: E402 - registered beside the other commands

cli.add_command(systemd_group)
cli.add_command(completion)

from dc_broker.proxy import proxy_command  # noqa: E402 - registered beside the other commands

cli.add_command(proxy_command)


def main() -> None:
    """click's own error handling, except that Ctrl-C exits 130 (the shell's convention), not 1."""
    try:
        cli.main(prog_name="dc-broker", standalone_mode=False)
    except click.exceptions.Abort as exc:
        interrupted = isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt)
        click.echo("\nInterrupted." if interrupted else "Aborted.", err=True)
        sys.exit(130 if interrupted else 1)
    except KeyboardInterrupt:
        click.echo("\nInterrupted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
