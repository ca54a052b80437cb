"""The management commands: ``dc-broker init/add/remove/list/logout/unlock/lock/passwd``.

Non-secret settings go to config.toml (``dc_broker.config``), secrets to the vault (``dc_broker.vault``).
With a daemon running, it holds the vault (one writer), so secrets and changes go to it over the
socket (``dc_broker.control``) and take effect at once; with none, these commands open the vault
themselves. Secrets come from a hidden prompt or stdin, never from argv.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

import click
import trio

from dc_broker import control
from dc_broker.config import (
    AUTH_METHODS,
    GRANTS,
    SINK_FORMATS,
    Profile,
    Sink,
    add_profile,
    default_config_path,
    load_config,
    remove_profile,
    sink_path,
)
from dc_broker.oidc import IdpTransport
from dc_broker.options import CONFIG, SOCKET, VAULT
from dc_broker.secret import Secret
from dc_broker.sessions import Session
from dc_broker.store import Credentials, MemoryStore
from dc_token.errors import BrokerUnavailable, ConfigError, DcBrokerError, UpstreamFault, UpstreamUnavailable


class Failed(click.ClickException):
    """An expected failure: one `Error:` line (plus what to do), the error's own exit status."""

    def __init__(self, exc: DcBrokerError) -> None:
        hint = f"\n  {exc.hint}" if exc.hint and "`" not in str(exc) else ""
        super().__init__(f"{exc}{hint}")
        self.exit_code = exc.exit_code or 1  # type: ignore[misc]


def _daemon(socket_path: str | None) -> bool:
    try:
        control.request("hello", socket_path)
    except BrokerUnavailable:
        return False
    return True


def _read_secret(prompt: str, from_stdin: bool) -> Secret:
    if from_stdin:
        line = sys.stdin.readline().rstrip("\n")
    elif sys.stdin.isatty():
        line = click.prompt(prompt, hide_input=True)
    else:
        raise click.UsageError(f"{prompt.lower()} needed: pass it on stdin with the matching --...-stdin flag")
    if not line:
        raise click.UsageError(f"{prompt.lower()} is empty")
    return Secret(line)


def _open_vault(vault_path: str | None) -> Any:
    from dc_broker.vault import Vault, default_vault_path

    path = vault_path or default_vault_path()
    if not os.path.exists(path):
        raise ConfigError(f"no vault at {path}; create one with `dc-broker init`")
    vault = Vault.open(path, auto_unlock=True)
    if vault.locked:  # prompted, or (stdin not a terminal) the next line of stdin
        vault.unlock(_read_secret("Vault passphrase", not sys.stdin.isatty()))
    return vault


async def _verify(profile: Profile, creds: Credentials) -> None:
    transport = IdpTransport()
    try:
        await Session(profile, MemoryStore({profile.name: creds}), transport).verify()
    except UpstreamFault as exc:
        raise UpstreamUnavailable(
            f"could not verify profile {profile.name!r} at {profile.describe()}: {exc}; "
            "check the URL, or store it anyway with --no-verify"
        ) from None
    finally:
        await transport.aclose()


@click.command()
@VAULT
@click.option(
    "--key-source",
    type=click.Choice(["passphrase", "keyfile", "systemd-credential"]),
    default="passphrase",
    show_default=True,
    help="what unlocks the vault",
)
@click.option(
    "--key-file",
    type=click.Path(dir_okay=False),
    help="keyfile: its path, created 0600 if missing (default: vault.key beside the vault)",
)
@click.option("--credential", default="vault-key", show_default=True, help="systemd-credential: the credential name")
@click.option("--passphrase-stdin", is_flag=True, help="read the new passphrase from stdin instead of a prompt")
def init(
    vault_path: str | None, key_source: str, key_file: str | None, credential: str, passphrase_stdin: bool
) -> None:
    """Create the encrypted vault that holds passwords, client secrets and refresh tokens.

    A keyfile vault with no --key-file keeps its key as vault.key in the vault's own 0700 directory:
    the vault then opens with no prompt, and the pair is as safe as that directory. Keep the key
    elsewhere (another disk, a file your backups skip) to make a copied vault.db useless alone."""
    from dc_broker.vault import KeyFile, Passphrase, SystemdCredential, Vault, create_key_file, default_vault_path
    from dc_broker.vault.files import check_private_dir

    path = os.path.abspath(vault_path or default_vault_path())
    made_key: str | None = None
    try:
        source: Any
        passphrase = None
        if key_source == "passphrase":
            source = Passphrase()
            passphrase = _read_secret("New vault passphrase", passphrase_stdin)
            if not passphrase_stdin and click.prompt("Repeat it", hide_input=True) != passphrase.reveal():
                raise click.UsageError("the passphrases differ")
        elif key_source == "keyfile":
            key_path = os.path.abspath(key_file or os.path.join(os.path.dirname(path), "vault.key"))
            if not os.path.exists(key_path):
                check_private_dir(os.path.dirname(key_path), create=True)
                create_key_file(key_path)
                made_key = key_path
            source = KeyFile(key_path)
        else:
            source = SystemdCredential(credential)
        Vault.create(path, source, passphrase=passphrase).close()
    except DcBrokerError as exc:
        _forget(made_key)
        raise Failed(exc) from None
    except BaseException:
        _forget(made_key)
        raise
    what = f"keyfile {source.reference}" if key_source == "keyfile" else key_source
    click.echo(f"Created the vault {path} ({what}). Next: `dc-broker add PROFILE ...`")


def _forget(key_path: str | None) -> None:
    """A failed init leaves no key file of its own making behind."""
    if key_path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(key_path)


@click.command()
@CONFIG
@VAULT
@SOCKET
@click.option("--server", help="Keycloak base URL, e.g. https://dc.example.com")
@click.option("--tenant", help="the realm (tenant)")
@click.option("--client-id", required=True, help="the OAuth client id")
@click.option("--grant", type=click.Choice(GRANTS), default="password", show_default=True, help="how to log in")
@click.option("--username", help="password grant: the user")
@click.option("--scope", help="scope to ask for")
@click.option(
    "--auth-method", type=click.Choice(AUTH_METHODS), help="client authentication (default basic, none for device)"
)
@click.option("--issuer", help="issuer URL: endpoints from its discovery document")
@click.option("--token-url", help="the token endpoint, outright")
@click.option("--ca-bundle", type=click.Path(exists=True, dir_okay=False), help="CA bundle for this IdP's TLS")
@click.option("--legacy-paths/--no-legacy-paths", default=True, help="Keycloak <= 16 /auth prefix (default on)")
@click.option("--password-stdin", is_flag=True, help="read the user's password from stdin (first line)")
@click.option("--secret-stdin", is_flag=True, help="read the client secret from stdin (next line)")
@click.option("--no-verify", is_flag=True, help="store without checking the credentials at the IdP")
@click.option(
    "--sink",
    "sinks",
    multiple=True,
    metavar="PATH[:FORMAT]",
    help="a token file the broker keeps current (format token, header, json or env; repeatable)",
)
@click.argument("profile")
def add(
    config_path: str | None,
    vault_path: str | None,
    socket_path: str | None,
    profile: str,
    password_stdin: bool,
    secret_stdin: bool,
    no_verify: bool,
    **settings: Any,
) -> None:
    """Add PROFILE: its settings to config.toml, its secrets to the vault (or the running broker)."""
    path = config_path or default_config_path()
    fields: dict[str, Any] = {k: v for k, v in settings.items() if v is not None and k != "sinks"}
    if settings.get("sinks"):
        fields["sinks"] = sink_options(settings["sinks"])
    if "auth_method" not in fields:
        fields["auth_method"] = "none" if fields.get("grant") == "device" else "basic"
    try:
        p = Profile(name=profile, **fields)
        if profile in load_config(path, missing_ok=True).profiles:
            raise ConfigError(
                f"profile {profile!r} already exists in {path}; remove it first with `dc-broker remove {profile}`"
            )
        password = _read_secret("Password", password_stdin) if p.grant == "password" else None
        secret = _read_secret("Client secret", secret_stdin) if p.auth_method != "none" else None
        creds = Credentials(password=password, client_secret=secret)
        if not no_verify and p.grant != "device":
            trio.run(_verify, p, creds)
        running = _daemon(socket_path)
        if running:
            add_profile(path, p)
            control.request("reload", socket_path)
            secrets = {k: v.reveal() for k, v in (("password", password), ("client_secret", secret)) if v}
            if secrets:
                control.request("set_secrets", socket_path, profile=profile, **secrets)
        else:
            if password or secret:
                with _open_vault(vault_path) as vault:
                    vault.set_credentials(profile, creds)
            add_profile(path, p)
    except DcBrokerError as exc:
        raise Failed(exc) from None
    where = "the running broker" if running else "the vault"
    if not running:
        nxt = "`dc-broker run` (or `systemctl --user start dc-broker`)"
        nxt += f", then `dc-broker login {profile}`" if p.grant == "device" else f", then `dc-token {profile}`"
    else:
        nxt = f"`dc-broker login {profile}`" if p.grant == "device" else f"`dc-token {profile}`"
    click.echo(f"Added profile {profile} ({p.describe()}); secrets are in {where}. Next: {nxt}")


def sink_options(values: tuple[str, ...]) -> tuple[Sink, ...]:
    """``--sink PATH[:FORMAT]`` values as sinks (mode 0600); the config check of the file refuses a
    directory others may write, as for a hand-written one."""
    out = []
    for value in values:
        path, colon, fmt = value.rpartition(":")
        if not colon or fmt not in SINK_FORMATS:
            path, fmt = value, "token"
        try:
            out.append(Sink(path=sink_path(path), format=fmt))
        except ConfigError as exc:
            raise ConfigError(f"--sink {value}: {exc}") from None
    return tuple(out)


@click.command()
@CONFIG
@VAULT
@SOCKET
@click.argument("profile")
def remove(config_path: str | None, vault_path: str | None, socket_path: str | None, profile: str) -> None:
    """Remove PROFILE from config.toml and forget its secrets and tokens."""
    path = config_path or default_config_path()
    try:
        if profile not in load_config(path, missing_ok=False).profiles:
            raise ConfigError(f"no profile named {profile!r} in {path}; `dc-broker list` shows the profiles")
        if _daemon(socket_path):
            control.request("logout", socket_path, profile=profile)
            remove_profile(path, profile)
            control.request("reload", socket_path)
        else:
            from dc_broker.vault import default_vault_path

            if os.path.exists(vault_path or default_vault_path()):
                with _open_vault(vault_path) as vault:
                    vault.remove(profile)
            remove_profile(path, profile)
    except DcBrokerError as exc:
        raise Failed(exc) from None
    click.echo(f"Removed profile {profile}.")


@click.command(name="list")
@CONFIG
def list_profiles(config_path: str | None) -> None:
    """List the profiles in config.toml (no broker needed)."""
    path = config_path or default_config_path()
    try:
        config = load_config(path, missing_ok=False)
    except DcBrokerError as exc:
        raise Failed(exc) from None
    if not config.profiles:
        click.echo(f"No profiles in {path}; add one with `dc-broker add`.")
        return
    width = max(len(n) for n in config.profiles)
    for name, p in sorted(config.profiles.items()):
        click.echo(f"{name.ljust(width)}  {p.grant:<18}  {p.describe()}")


@click.command()
@SOCKET
@click.argument("profile")
def logout(socket_path: str | None, profile: str) -> None:
    """Revoke PROFILE's login at the IdP and forget its secrets (the profile stays configured)."""
    try:
        result = control.request("logout", socket_path, profile=profile)
    except DcBrokerError as exc:
        raise Failed(exc) from None
    how = (
        "revoked at the identity provider"
        if result.get("revoked")
        else "forgotten (the IdP did not confirm a revocation)"
    )
    click.echo(f"Logged out of profile {profile}: login {how}, secrets forgotten.")


@click.command()
@SOCKET
@click.option("--passphrase-stdin", is_flag=True, help="read the passphrase from stdin instead of a prompt")
def unlock(socket_path: str | None, passphrase_stdin: bool) -> None:
    """Unlock the running broker's vault, so it can serve tokens."""
    try:
        passphrase = _read_secret("Vault passphrase", passphrase_stdin)
        result = control.request("unlock", socket_path, passphrase=passphrase.reveal())
    except DcBrokerError as exc:
        raise Failed(exc) from None
    click.echo(f"Unlocked: serving {result.get('profiles', 0)} profile(s).")


@click.command()
@SOCKET
def lock(socket_path: str | None) -> None:
    """Lock the running broker's vault: keys and tokens leave its memory until `dc-broker unlock`."""
    try:
        control.request("lock", socket_path)
    except DcBrokerError as exc:
        raise Failed(exc) from None
    click.echo("Locked.")


@click.command()
@VAULT
@click.option("--stdin", "from_stdin", is_flag=True, help="read the old and the new passphrase from stdin (two lines)")
def passwd(vault_path: str | None, from_stdin: bool) -> None:
    """Change the vault passphrase (rewraps the data key; stop the broker first)."""
    from dc_broker.vault import Vault, default_vault_path

    path = vault_path or default_vault_path()
    try:
        if not os.path.exists(path):
            raise ConfigError(f"no vault at {path}; create one with `dc-broker init`")
        old = _read_secret("Current passphrase", from_stdin)
        new = _read_secret("New passphrase", from_stdin)
        with Vault.open(path) as vault:
            vault.change_passphrase(old, new)
    except DcBrokerError as exc:
        raise Failed(exc) from None
    click.echo("Passphrase changed.")


COMMANDS = (init, add, remove, list_profiles, logout, unlock, lock, passwd)
