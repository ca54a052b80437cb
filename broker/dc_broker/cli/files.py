"""The commands that work on files: ``dc-broker init``, ``add``, ``set``, ``rotate``, ``remove``,
``list``, ``passwd``.

Non-secret settings go to config.toml (``dc_broker.config`` edits it), secrets to the vault
(``dc_broker.vault``). With a daemon running, it holds the vault (one writer), so secrets and changes
go to it over the socket (``dc_broker.cli.talk.ask``) and take effect at once; with none, these
commands open the vault themselves. Config and vault change together or not at all.

Never reads a secret from argv (``read_secret``: a hidden prompt or stdin), never prints one, and
never prints an error itself: it raises the error tree for the boundary (``dc_broker.cli.boundary``).
trio, httpx and the vault are imported inside the commands that use them: every start of
``dc-broker`` (``--help``, each TAB) imports this module.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any

import click

from dc_broker.cli.boundary import CONFIG, PROFILE, SOCKET, VAULT, read_secret
from dc_broker.cli.completion import complete_settings
from dc_broker.cli.talk import BrokerSlow, ask, broker_running
from dc_broker.config import AUTH_METHODS, GRANTS, SECRET_METHODS, SINK_FORMATS, Profile, Sink, profile_settings
from dc_broker.config.load import default_config_path, load_config, sink_path
from dc_broker.errors import ConfigError, UpstreamFault
from dc_broker.secret import Secret
from dc_token.errors import (
    BrokerError,
    CredentialsRejected,
    DcBrokerError,
    InternalError,
    LoginRequired,
    UnknownProfile,
    UnsupportedVersion,
    UpstreamUnavailable,
)

if TYPE_CHECKING:
    from dc_broker.tokens import Credentials
    from dc_broker.vault import Keyring, Vault


def _open_vault(vault_path: str | None) -> Vault:
    from dc_broker.vault import Vault, default_vault_path

    path = vault_path or default_vault_path()
    if not os.path.exists(path):
        raise ConfigError(f"no vault at {path}; create one with `dc-broker init`")
    vault = Vault.open(path, auto_unlock=True)
    if vault.locked:  # prompted, or (stdin not a terminal) the next line of stdin
        from_stdin = not sys.stdin.isatty()
        if from_stdin:
            click.echo(f"the vault {path} is locked: reading its passphrase from stdin (the next line)", err=True)
        vault.unlock(read_secret("Vault passphrase", from_stdin))
    return vault


def _verify(profile: Profile, creds: Credentials, again: str) -> None:
    """Sign in once at the IdP with ``creds`` (nothing is stored): a wrong secret or URL stops here,
    with ``again`` (the command to run once it is fixed) as the advice."""
    import trio

    from dc_broker.idp.transport import IdpTransport
    from dc_broker.sessions.session import Session
    from dc_broker.store import MemoryStore

    async def verify() -> None:
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

    try:
        trio.run(verify)
    except DcBrokerError as exc:
        raise advised(exc, again) from None


def advised(exc: DcBrokerError, advice: str) -> DcBrokerError:
    """``exc`` (same class and exit status) with the advice at the end of its message replaced by
    ``advice``. The broker's messages end in the advice for a running profile (`; run `dc-broker
    login acme``); a command that changed nothing knows better what works: itself, again."""
    message = str(exc)
    cut = message.rfind("; ")
    if cut >= 0 and "`" in message[cut:]:
        message = message[:cut]
    new = copy.copy(exc)
    new.args = (f"{message}; {advice}",)
    if isinstance(new, BrokerError):
        new.message = new.args[0]
    return new


@click.command()
@VAULT
@click.option(
    "--key-source",
    type=click.Choice(["passphrase", "keyfile", "systemd-credential", "keyring"]),
    default="passphrase",
    show_default=True,
    help="what unlocks the vault (keyring: the desktop's Secret Service, needs dc-broker[keyring])",
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
    from dc_broker.vault.keysource import create_keyring_key

    path = os.path.abspath(vault_path or default_vault_path())
    made_key: str | None = None
    made_item: Keyring | None = None
    try:
        source: Any
        passphrase = None
        if key_source == "passphrase":
            source = Passphrase()
            passphrase = read_secret("New vault passphrase", passphrase_stdin)
            if not passphrase_stdin and click.prompt("Repeat it", hide_input=True) != passphrase.reveal():
                raise click.UsageError("the passphrases differ")
        elif key_source == "keyfile":
            key_path = os.path.abspath(key_file or os.path.join(os.path.dirname(path), "vault.key"))
            if not os.path.exists(key_path):
                create_key_file(key_path)
                made_key = key_path
            source = KeyFile(key_path)
        elif key_source == "keyring":
            source = made_item = create_keyring_key(path)
        else:
            source = SystemdCredential(credential)
        Vault.create(path, source, passphrase=passphrase).close()
    except BaseException:
        _forget(made_key, made_item)
        raise
    what = f"keyfile {source.reference}" if key_source == "keyfile" else key_source
    click.echo(f"Created the vault {path} ({what}). Next: `dc-broker add PROFILE ...`")


def _forget(key_path: str | None, item: Keyring | None = None) -> None:
    """A failed init leaves no key file or keyring item of its own making behind."""
    if key_path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(key_path)
    if item is not None:
        from dc_broker.vault import delete_keyring_key

        with contextlib.suppress(DcBrokerError):
            delete_keyring_key(item)


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
    "--auth-method",
    type=click.Choice(AUTH_METHODS),
    help="client authentication (default basic; none for device, browser); private_key_jwt makes a key "
    "pair in the vault and prints the public JWKS to register (docs/keycloak.md)",
)
@click.option(
    "--key-type",
    type=click.Choice(["ec", "rsa"]),
    default="ec",
    show_default=True,
    help="private_key_jwt: EC P-256 (ES256) or RSA 2048 (RS256)",
)
@click.option(
    "--assertion-audience",
    metavar="token_endpoint|issuer|URL",
    help="private_key_jwt, client_secret_jwt: the assertion's aud (default token_endpoint)",
)
@click.option(
    "--client-cert", type=click.Path(dir_okay=False, resolve_path=True), help="tls_client_auth: certificate (PEM)"
)
@click.option(
    "--client-key",
    type=click.Path(dir_okay=False, resolve_path=True),
    help="tls_client_auth: the certificate's key (PEM; default: in the certificate file)",
)
@click.option(
    "--assertion-file",
    type=click.Path(dir_okay=False, resolve_path=True),
    help="client_assertion_file: the JWT another issuer keeps current (Kubernetes, SPIFFE, CI)",
)
@click.option(
    "--assertion-type",
    type=click.Choice(["jwt-bearer", "jwt-spiffe"]),
    help="client_assertion_file: its client_assertion_type (default jwt-bearer; Keycloak's SPIFFE: jwt-spiffe)",
)
@click.option("--issuer", help="issuer URL: endpoints from its discovery document")
@click.option("--token-url", help="the token endpoint, outright")
@click.option("--ca-bundle", type=click.Path(exists=True, dir_okay=False), help="CA bundle for this IdP's TLS")
@click.option(
    "--proxy",
    metavar="URL|direct",
    help="HTTP proxy to the IdP, e.g. http://proxy.corp:3128 (default: the broker's https_proxy, no_proxy)",
)
@click.option("--legacy-paths/--no-legacy-paths", default=True, help="Keycloak <= 16 /auth prefix (default on)")
@click.option("--password-stdin", is_flag=True, help="read the user's password from stdin (first line)")
@click.option("--secret-stdin", is_flag=True, help="read the client secret from stdin (next line)")
@click.option(
    "--allow",
    "allow",
    multiple=True,
    metavar="RULE",
    help="shared broker: who may use it (user:NAME, uid:N, group:NAME, gid:N, unit:NAME.service, "
    'user-unit:USER/NAME.service, exe:/PATH, exe-any-ns:/PATH, exe-sha256:HEX; "A & B" for both); repeatable',
)
@click.option("--no-verify", is_flag=True, help="store without checking the credentials at the IdP")
@click.option(
    "--sink",
    "sinks",
    multiple=True,
    metavar="PATH[:FORMAT]",
    help="a token file the broker keeps current (format token, header, json or env; repeatable)",
)
@click.option("--force", is_flag=True, help="replace an existing profile of that name (checked before it is replaced)")
@click.option(
    "--offline",
    is_flag=True,
    help="an offline login (scope offline_access added): it outlives SSO Session Max; the realm must allow it",
)
@PROFILE
def add(
    config_path: str | None,
    vault_path: str | None,
    socket_path: str | None,
    profile: str,
    password_stdin: bool,
    secret_stdin: bool,
    no_verify: bool,
    force: bool,
    allow: tuple[str, ...],
    key_type: str,
    offline: bool,
    **settings: Any,
) -> None:
    """Add PROFILE: its settings to config.toml, its secrets to the vault (or the running broker).
    Secrets come from hidden prompts, or from stdin with --password-stdin / --secret-stdin (one line
    each, in that order; a locked vault's passphrase is the line after them)."""
    from dc_broker.config.edit import add_profile, config_lock, replace_profile

    path = config_path or default_config_path()
    fields: dict[str, Any] = {k: v for k, v in settings.items() if v is not None and k != "sinks"}
    if settings.get("sinks"):
        fields["sinks"] = sink_options(settings["sinks"])
    if allow:
        fields["allow"] = allow
    if offline:
        fields["scope"] = offline_scope(fields.get("scope"), fields.get("grant", "password"))
    if "auth_method" not in fields:
        fields["auth_method"] = "none" if fields.get("grant") in ("device", "browser") else "basic"
    p = Profile(name=profile, **fields)
    if profile in load_config(path, missing_ok=True).profiles and not force:
        raise _exists(profile, path)
    from dc_broker.tokens import Credentials

    user = f" of user {p.username}" if p.username else ""
    password = read_secret(f"Password{user} (profile {profile})", password_stdin) if p.grant == "password" else None
    secret = None
    if p.auth_method in SECRET_METHODS:
        secret = read_secret(
            f"Client secret of {p.client_id} (profile {profile})",
            secret_stdin,
            empty="a public client has none: add it with --auth-method none",
        )
    keys = None
    if p.auth_method == "private_key_jwt":
        from dc_broker.idp import clientkeys

        keys = clientkeys.KeySet(clientkeys.generate(key_type, now=time.time()))
    creds = Credentials(password=password, client_secret=secret, client_keys=None if keys is None else keys.to_secret())
    again = (
        f"nothing changed: run `dc-broker add --force {profile} ...` again once it is fixed"
        if force
        else f"nothing was added: run `dc-broker add {profile} ...` again once it is fixed"
    )
    # a new key cannot be checked: the IdP has not seen it yet (register its JWKS first)
    if not no_verify and p.grant not in ("device", "browser") and keys is None:
        _verify(p, creds, again)
    running = broker_running(socket_path)
    jwks: Any = None
    with config_lock(path):  # one writer: the config and the vault change together, or not at all
        old = load_config(path, missing_ok=True).profiles.get(profile)
        if old is not None and not force:
            raise _exists(profile, path)
        if running:
            jwks = _add_to_running(path, p, old, socket_path, password, secret, key_type if keys else None)
        elif password or secret or keys:
            with _open_vault(vault_path) as vault:
                stored = vault.credentials(profile) if old is not None else None
                vault.set_credentials(profile, creds)
                try:
                    (replace_profile if old is not None else add_profile)(path, p)
                except BaseException:  # all or nothing: the vault as it was
                    if stored is None:
                        vault.remove(profile)
                    else:
                        vault.set_credentials(profile, stored)
                    raise
        else:
            (replace_profile if old is not None else add_profile)(path, p)
    where = "the running broker" if running else "the vault"
    if not running:
        nxt = "`dc-broker run` (or `systemctl --user start dc-broker`)"
        interactive = p.grant in ("device", "browser")
        nxt += f", then `dc-broker login {profile}`" if interactive else f", then `dc-token {profile}`"
    else:
        nxt = f"`dc-broker login {profile}`" if p.grant in ("device", "browser") else f"`dc-token {profile}`"
    verb = "Replaced" if old is not None else "Added"
    if keys is not None:
        shown = jwks if running else keys.public_jwks()
        click.echo(f"{verb} profile {profile} ({p.describe()}); its private key is in {where}, never shown.")
        click.echo(register_jwks(p, shown))
        click.echo(
            f"Then: `dc-broker keys {profile} --check` (does the IdP accept it?)"
            + ("" if running else f", `dc-broker run`, `dc-token {profile}`")
        )
    else:
        click.echo(f"{verb} profile {profile} ({p.describe()}); secrets are in {where}. Next: {nxt}")
    _note_environment_proxy(p)


def offline_scope(scope: str | None, grant: str) -> str:
    """The scope of an ``--offline`` profile: its scope with ``offline_access`` (and ``openid``,
    which Keycloak needs for an offline token's session), for a user's login only."""
    if grant == "client_credentials":
        raise click.UsageError("--offline is for a user's login (password, device, browser): a client needs none")
    words = (scope or "").split()
    for needed in ("openid", "offline_access"):
        if needed not in words:
            words.append(needed)
    return " ".join(words)


def register_jwks(p: Profile, jwks: Any) -> str:
    """The public JWKS to register at the IdP, and where it goes in Keycloak."""
    return (
        f"Register this public JWKS for client {p.client_id} at the identity provider (Keycloak: Clients -> "
        f'{p.client_id} -> Credentials: Client Authenticator "Signed JWT"; Keys tab: Use JWKS URL off, '
        "Import key -> JSON Web Key Set, or paste it as the JWKS value):\n" + json.dumps(jwks, indent=2)
    )


def _exists(profile: str, path: str) -> ConfigError:
    return ConfigError(
        f"profile {profile!r} already exists in {path}; replace it with `dc-broker add --force {profile} ...`, "
        f"change it with `dc-broker set {profile} KEY=VALUE`, or remove it with `dc-broker remove {profile}`"
    )


def _note_environment_proxy(p: Profile) -> None:
    """A profile without ``proxy`` whose IdP this shell reaches through its https_proxy: a broker
    that systemd starts does not have this shell's environment, so say how to make it the same."""
    from dc_broker.idp import proxies

    if p.proxy is not None:
        return
    via = proxies.route(p.static_token_url() or p.issuer or "", None, proxies.EnvProxies.from_environ(os.environ))
    if via is not None:
        click.echo(
            f"Note: profile {p.name}'s IdP is reached through this shell's proxy {proxies.shown(via)} "
            "(https_proxy); a broker started by systemd does not see this shell's variables: "
            f"`dc-broker set {p.name} proxy={proxies.shown(via)}`, or give the unit the variables "
            '(docs/systemd.md, "Behind an HTTP proxy")',
            err=True,
        )


def _add_to_running(
    path: str,
    p: Profile,
    old: Profile | None,
    socket_path: str | None,
    password: Secret | None,
    secret: Secret | None,
    new_key: str | None = None,
) -> Any:
    """Config first, then the broker reloads it and stores the secrets in its vault (a private_key_jwt
    profile's key is made there, ``new_key``: its public JWKS is returned). The caller holds the
    config lock. If a step fails while the broker cannot hold any of this add's secrets (the reload,
    or a set_secrets it refused: it answered, so nothing was stored), this change alone is undone
    (``_undo``: the profile removed again, or its old settings put back) and the broker reloads that.

    Once the broker may hold some (a set_secrets it answered before, or one it took and did not
    answer: ``BrokerSlow``, Ctrl-C, a lost connection, its own failure), the profile stays as this
    add wrote it: the broker may yet store them, and a secret stored for a profile the config no
    longer has (or, with --force, under the old settings) would be kept where no one sees it. The
    error says so (``_kept``).

    An ``add --force`` that changes whom the login is for (another IdP, client, grant, user or scope:
    ``Profile.login_fingerprint``) first has the broker forget the old login and every secret of it
    (``_forget_old``: ``logout`` with ``forget``, as `remove` asks), before the new settings are
    written: else the reload would start a grant at once with the old secrets under the new settings
    (the old user's password for the new user, at the new server; the old client's secret with the
    new client's id), and ``set_secrets``, which merges, would keep what the new settings do not
    send (the old password after a switch to client credentials). Forgotten secrets cannot be put
    back: an undo then puts back the old settings alone, and the error says so."""
    from dc_broker.config.edit import add_profile, replace_profile
    from dc_broker.config.load import read_config_text

    forgot = old is not None and old.login_fingerprint() != p.login_fingerprint()
    if forgot:  # before anything is written: a broker that cannot forget refuses the whole add
        _forget_old(path, p.name, socket_path)
    before = read_config_text(path)
    (replace_profile if old is not None else add_profile)(path, p)
    written = read_config_text(path)
    steps: list[dict[str, Any]] = []
    secrets = {k: v.reveal() for k, v in (("password", password), ("client_secret", secret)) if v}
    if secrets:
        steps.append(secrets)
    if new_key is not None:
        steps.append({"new_key": new_key})
    done: list[str] = []  # what the broker has stored of this add
    sending: dict[str, Any] | None = None
    try:
        ask(socket_path, "reload")
        jwks = None
        for sending in steps:
            answer = ask(socket_path, "set_secrets", profile=p.name, **sending)
            done.extend(k for k in sending if k != "new_key")
            if "new_key" in sending:
                done.append("key")
                jwks = answer["jwks"]
        return jwks
    except BaseException as exc:
        refused = isinstance(exc, BrokerError) and not isinstance(exc, InternalError)  # answered: nothing stored
        if done or (sending is not None and not refused):
            kept = _kept(path, p, exc, done)
            if kept is exc:
                raise
            raise kept from None
        with contextlib.suppress(DcBrokerError):
            _undo(path, p.name, old, before=before, written=written)
        with contextlib.suppress(DcBrokerError):
            ask(socket_path, "reload")
        if not forgot:
            raise
        note = (
            f"the old settings of profile {p.name} are back in {path}, but not its old secrets: this add changes "
            "whom its login is for, so the broker forgot the old login and every secret of it first; store them "
            f"again (`dc-broker rotate {p.name}`, `dc-broker login {p.name}`) or run this add again"
        )
        noted = _noted(exc, note)
        if noted is exc:
            raise
        raise noted from None


def _forget_old(path: str, name: str, socket_path: str | None) -> None:
    """Have the running broker forget profile ``name``'s login and every secret it holds for it
    (``logout`` with ``forget``: the owner's, as `remove` asks) before an ``add --force`` writes
    settings for another login. A broker from before ``forget`` does a plain logout and says
    nothing of it: the add stops there, nothing written (`UnsupportedVersion`, as `remove` does)."""
    try:
        _forget_at_broker(
            socket_path,
            name,
            f"and this add --force changes whom its login is for, so the old secrets would be sent under the "
            f"new settings: nothing of this add was written to {path}; restart the broker with this dc-broker "
            "(or stop it) and run the add again",
        )
    except UnknownProfile as exc:  # it runs without it: it may hold anything under that name
        raise advised(
            exc,
            f"the running broker has no profile {name} ({path} changed since it last read it): nothing of this "
            "add was written; have the broker read the config (`systemctl --user reload dc-broker`, or SIGHUP), "
            "then run the add again",
        ) from None
    click.echo(
        f"Note: profile {name}'s login is for another identity provider, client, grant, user or scope now: the "
        "running broker ended its old login and forgot its secrets first.",
        err=True,
    )


def _forget_at_broker(socket_path: str | None, name: str, otherwise: str) -> dict[str, Any]:
    """``logout`` with ``forget``: the running broker ends profile ``name``'s login and forgets every
    record it holds for it (`remove`, an ``add --force`` for another login); its answer. A broker
    from before ``forget`` ignores the key and does a plain logout: ``UnsupportedVersion``, its
    message going on with ``otherwise`` (what that means for the command, and what to do)."""
    answer = ask(socket_path, "logout", profile=name, forget=True)
    if answer.get("forgot_profile") is not True:  # a broker from before `forget` ignores it
        raise UnsupportedVersion(
            f"the running broker logged profile {name} out but is too old to forget its secrets (`logout` with "
            f"`forget`), {otherwise}"
        )
    return answer


def _kept(path: str, p: Profile, exc: BaseException, done: list[str]) -> BaseException:
    """``exc`` (same class and exit status) saying that profile ``p`` stays as the add wrote it, since
    the broker holds (``done``) or may yet store its secrets. An interruption goes on as it was,
    after the same words on stderr."""
    if done:
        holds = f"the broker has stored its {' and '.join(w.replace('_', ' ') for w in done)}"
    else:
        holds = "the broker may still store its secrets"
    note = (
        f"profile {p.name} stays in {path} as this add wrote it, since {holds} (taken back, they could stay in "
        f"the vault without it): `dc-broker status {p.name}` shows it; `dc-broker add --force {p.name} ...` "
        f"sets it again, `dc-broker remove {p.name}` takes it away"
    )
    if isinstance(exc, BrokerSlow):  # its advice ("check with `dc-broker status`") is in the note
        return advised(exc, note)
    return _noted(exc, note)


def _noted(exc: BaseException, note: str) -> BaseException:
    """``exc`` (same class and exit status) with ``note`` after its message; an interruption (or any
    other exception not of the error tree) goes on as it was, after the note on stderr."""
    if not isinstance(exc, DcBrokerError):
        click.echo(f"\n{note}.", err=True)
        return exc
    new = copy.copy(exc)
    new.args = (f"{exc}; {note}",)
    if isinstance(new, BrokerError):
        new.message = new.args[0]
    return new


def _undo(path: str, name: str, old: Profile | None, *, before: str | None = None, written: str | None = None) -> None:
    """Take back one ``add`` (the caller holds the config lock): if the file is still what it wrote,
    the file as it was before, byte for byte; if someone changed it since (by hand: an editor takes
    no lock), its profile alone is removed, or (``add --force``) its old settings put back."""
    from dc_broker.config.edit import remove_profile, replace_profile, write_text
    from dc_broker.config.load import read_config_text

    if written is not None and read_config_text(path) == written:
        if before is None:  # the add made the file (at a link's target: the link stays, as it was)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.realpath(path))
        else:
            write_text(path, before)
    elif old is None:
        remove_profile(path, name)
    else:
        replace_profile(path, old)


def sink_options(values: tuple[str, ...]) -> tuple[Sink, ...]:
    """``--sink PATH[:FORMAT]`` values as sinks (mode 0600). A directory that fails the token-file
    rule (``dc_broker.atomic``) is refused now, as the broker would refuse it at every write."""
    from dc_broker import atomic

    out = []
    for value in values:
        path, colon, fmt = value.rpartition(":")
        if not colon or fmt not in SINK_FORMATS:
            path, fmt = value, "token"
        try:
            sink = Sink(path=sink_path(path), format=fmt)
            atomic.check_directory(os.path.dirname(sink.path))
        except atomic.UnsafeDirectory as exc:
            raise ConfigError(f"--sink {value}: {exc}; token files are refused there, since {atomic.RULE}") from None
        except ConfigError as exc:
            raise ConfigError(f"--sink {value}: {exc}") from None
        out.append(sink)
    return tuple(out)


@click.command()
@CONFIG
@VAULT
@SOCKET
@PROFILE
def remove(config_path: str | None, vault_path: str | None, socket_path: str | None, profile: str) -> None:
    """Remove PROFILE from config.toml and forget its secrets and tokens."""
    from dc_broker.config.edit import config_lock, remove_profile

    path = config_path or default_config_path()
    if profile not in load_config(path, missing_ok=False).profiles:
        raise UnknownProfile(f"no profile named {profile!r} in {path}; `dc-broker list` shows the profiles")
    revoked: bool | None = None
    with config_lock(path):
        if broker_running(socket_path):
            # forget: the broker removes every record of the profile from its vault (the client secret
            # and keys a plain logout keeps), while the profile is still configured
            answer = _forget_at_broker(
                socket_path,
                profile,
                f"so {profile} stays in {path}: restart the broker with this dc-broker (or stop it) and run "
                f"`dc-broker remove {profile}` again",
            )
            revoked = bool(answer.get("revoked"))
            remove_profile(path, profile)
            ask(socket_path, "reload")
        else:
            from dc_broker.vault import default_vault_path

            if os.path.exists(vault_path or default_vault_path()):
                with _open_vault(vault_path) as vault:
                    vault.remove(profile)
            remove_profile(path, profile)
    if revoked is None:
        how = " (no broker running: its login was not revoked at the identity provider)"
    else:
        how = (
            "; its login was revoked at the identity provider" if revoked else " (the IdP did not confirm a revocation)"
        )
    click.echo(f"Removed profile {profile}{how}.")


@click.command(name="list")
@CONFIG
@click.option("--json", "as_json", is_flag=True, help="print the profiles as JSON (their settings; never secrets)")
@click.option("--names", is_flag=True, help="print only the names, one a line (for scripts and completion)")
def list_profiles(config_path: str | None, as_json: bool, names: bool) -> None:
    """List the profiles in config.toml (no broker needed)."""
    path = config_path or default_config_path()
    config = load_config(path, missing_ok=as_json or names)
    if as_json:
        doc = [profile_settings(p) for _, p in sorted(config.profiles.items())]
        click.echo(json.dumps({"config": path, "profiles": doc}, indent=2))
        return
    if names:
        for name in sorted(config.profiles):
            click.echo(name)
        return
    if not config.profiles:
        click.echo(f"No profiles in {path}; add one with `dc-broker add`.")
        return
    width = max(len(n) for n in config.profiles)
    for name, p in sorted(config.profiles.items()):
        click.echo(f"{name.ljust(width)}  {p.grant:<18}  {p.describe()}")


@click.command()
@VAULT
@click.option(
    "--passphrase-stdin",
    "--stdin",
    "from_stdin",
    is_flag=True,
    help="read the old and the new passphrase from stdin (two lines)",
)
def passwd(vault_path: str | None, from_stdin: bool) -> None:
    """Change the vault passphrase (rewraps the data key; stop the broker first)."""
    from dc_broker.vault import Vault, default_vault_path

    path = vault_path or default_vault_path()
    if not os.path.exists(path):
        raise ConfigError(f"no vault at {path}; create one with `dc-broker init`")
    old = read_secret("Current passphrase", from_stdin)
    new = read_secret("New passphrase", from_stdin)
    with Vault.open(path) as vault:
        vault.change_passphrase(old, new)
    click.echo("Passphrase changed.")


@click.command(name="set")
@CONFIG
@VAULT
@SOCKET
@PROFILE
@click.argument("assignments", nargs=-1, required=True, metavar="KEY=VALUE...", shell_complete=complete_settings)
def set_(
    config_path: str | None, vault_path: str | None, socket_path: str | None, profile: str, assignments: tuple[str, ...]
) -> None:
    """Change PROFILE's settings in config.toml, e.g. `dc-broker set acme scope="openid email"`.

    KEY= unsets a key; allow and admin take comma-separated lists. Keys: server, tenant, issuer,
    token_url, legacy_paths, client_id, grant, username, auth_method, assertion_audience, client_cert,
    client_key, assertion_file, assertion_type, scope, ca_bundle, proxy, allow, admin.
    Other lines and comments stay as they are; a running broker reloads the profile at once. Secrets
    are not settings: `dc-broker rotate` replaces a stored password or client secret; token files
    ([[profiles.NAME.sinks]]) are tables: `dc-broker add --force NAME ... --sink PATH`. A new
    username drops the stored password, a new client_id the client secret and keys (the old
    user's and client's): with no broker running, from the vault, before the config is written."""
    from dc_broker.config.edit import as_written, config_lock, parse_assignment, set_profile_values, with_values

    path = config_path or default_config_path()
    changes = dict(parse_assignment(a) for a in assignments)
    dropped: list[str] = []
    with config_lock(path):
        old = load_config(path, missing_ok=False).profiles.get(profile)
        running = broker_running(socket_path)
        if old is not None and not running:  # a running broker drops them itself (Session.reconfigure)
            dropped = _drop_stale(path, vault_path, old, with_values(old, changes, path))
        updated = set_profile_values(path, profile, changes)
        if running:
            ask(socket_path, "reload")
    shown = ", ".join(
        f"{k} = {as_written(getattr(updated, k))}" if changes[k] is not None else f"{k} unset" for k in sorted(changes)
    )
    click.echo(f"Updated profile {profile}: {shown}." + (_when_it_applies(old, updated) if running else ""))
    if dropped:
        click.echo(
            f"Note: dropped profile {profile}'s stored {' and '.join(f.replace('_', ' ') for f in dropped)} from "
            f"the vault: it was the old {'user' if 'password' in dropped else 'client'}'s. Store the new one with "
            f"`dc-broker rotate {profile}`.",
            err=True,
        )


def _drop_stale(path: str, vault_path: str | None, old: Profile, new: Profile) -> list[str]:
    """With no broker running, remove from the vault what ``new`` makes the old user's or client's
    (``Profile.stale_secrets``) before the config says ``new``: the broker cannot tell at its next
    start whose a stored secret was. A locked vault asks for its passphrase (prompt, or stdin); a
    set that cannot open it is refused and writes nothing. Returns the fields dropped."""
    from dc_broker.vault import default_vault_path

    stale = old.stale_secrets(new)
    if not stale or not os.path.exists(vault_path or default_vault_path()):
        return []
    try:
        vault = _open_vault(vault_path)
    except DcBrokerError as exc:
        raise _noted(
            exc,
            f"{path} is unchanged: a new username or client_id makes profile {old.name}'s stored secrets the old "
            "one's, and this set removes them from the vault first; give the vault's passphrase, or start the "
            "broker and run the set again (it drops them itself)",
        ) from None
    with vault:
        creds = vault.credentials(old.name)
        held = creds.held(stale)
        if held:
            vault.set_credentials(old.name, creds.without(held))
    return held


def _when_it_applies(old: Profile | None, new: Profile) -> str:
    """When a running broker's tokens follow the change. Who may use the profile and its token files
    apply at once. A login setting (scope, user, client, IdP...) makes the broker sign in again with
    the stored password or client secret (``Session.reconfigure``): its next token has them. A device
    or browser login has nothing stored to sign in with: a person logs in again."""
    if old is None or new.same_login(old):
        return " The running broker has reloaded it: it applies now."
    if new.grant in ("device", "browser"):
        return (
            " The running broker has reloaded it; a login setting applies once you log in again: "
            f"`dc-broker login {new.name}`."
        )
    stale = old.stale_secrets(new)
    if stale:
        what = "password" if "password" in stale else "client secret and keys"
        return (
            f" The running broker has reloaded it and dropped the stored {what}, if any (the old one's): store "
            f"the new one with `dc-broker rotate {new.name}`."
        )
    return " The running broker has reloaded it: its next token is got with these settings."


@click.command()
@CONFIG
@VAULT
@SOCKET
@click.option("--password", "rotate_password", is_flag=True, help="replace the user's password")
@click.option("--client-secret", "rotate_secret", is_flag=True, help="replace the client secret")
@click.option("--password-stdin", is_flag=True, help="read the new password from stdin (first line)")
@click.option("--secret-stdin", is_flag=True, help="read the new client secret from stdin (next line)")
@click.option("--no-verify", is_flag=True, help="store without checking the new credentials at the IdP")
@click.option(
    "--key",
    "rotate_key",
    is_flag=True,
    help="private_key_jwt: make the next key (the current one still signs) and print both public keys",
)
@click.option(
    "--activate",
    is_flag=True,
    help="private_key_jwt: sign with the next key from now on, once the IdP accepts it; the old key is dropped",
)
@click.option("--key-type", type=click.Choice(["ec", "rsa"]), default="ec", show_default=True, help="with --key")
@PROFILE
def rotate(
    config_path: str | None,
    vault_path: str | None,
    socket_path: str | None,
    rotate_password: bool,
    rotate_secret: bool,
    password_stdin: bool,
    secret_stdin: bool,
    no_verify: bool,
    rotate_key: bool,
    activate: bool,
    key_type: str,
    profile: str,
) -> None:
    """Replace PROFILE's stored password and/or client secret without remove + add, or rotate its key.

    With neither flag: the password for a password profile, the client secret otherwise (the key of
    a private_key_jwt profile). The new credentials are checked at the IdP (with the other, kept one)
    before the old ones are dropped: a wrong new password changes nothing.

    A key rotates in two steps with no failed request between them: --key makes the next key and
    prints the public JWKS with both keys (the current key still signs); register it at the IdP,
    then --key --activate checks that the IdP accepts an assertion signed with the next key and only
    then signs with it, dropping the old one."""
    path = config_path or default_config_path()
    p = load_config(path, missing_ok=False).profiles.get(profile)
    if p is None:
        raise UnknownProfile(f"no profile named {profile!r} in {path}; `dc-broker list` shows the profiles")
    if rotate_key or activate or (p.auth_method == "private_key_jwt" and not (rotate_password or password_stdin)):
        if rotate_password or rotate_secret or password_stdin or secret_stdin:
            raise click.UsageError("--key rotates the key alone; rotate a password or secret in another command")
        _rotate_key(p, vault_path, socket_path, None if activate else key_type, activate, not no_verify)
        return
    which = _what_to_rotate(p, rotate_password or password_stdin, rotate_secret or secret_stdin)
    new: dict[str, Secret] = {}
    if "password" in which:
        new["password"] = read_secret(f"New password of user {p.username} (profile {profile})", password_stdin)
    if "client_secret" in which:
        new["client_secret"] = read_secret(f"New client secret of {p.client_id} (profile {profile})", secret_stdin)
    flags = " ".join(f"--{k.replace('_', '-')}" for k in which)
    again = f"nothing changed: run `dc-broker rotate {profile} {flags}` again with the right one"
    # an IdP that is down refused nothing: no "right one", and no `command`, so that the error's own
    # hint follows (retry shortly), as dc-token and `dc-broker login` say it
    later = "nothing changed (--no-verify stores it without the check)"
    running = broker_running(socket_path)
    if running:
        revealed: dict[str, Any] = {k: v.reveal() for k, v in new.items()}
        try:
            ask(socket_path, "set_secrets", profile=profile, verify=not no_verify, **revealed)
        except (CredentialsRejected, LoginRequired, UpstreamUnavailable) as exc:
            raise advised(exc, later if isinstance(exc, UpstreamUnavailable) else again) from None
    else:
        with _open_vault(vault_path) as vault:
            merged = dataclasses.replace(vault.credentials(profile), **new)
            if not no_verify:
                _verify(p, merged, again)
            vault.set_credentials(profile, merged)
    what = " and ".join(k.replace("_", " ") for k in which)
    checked = "stored without a check" if no_verify else "checked at the identity provider"
    where = "the running broker uses it now" if running else "stored in the vault"
    click.echo(f"Rotated the {what} of profile {profile} ({checked}); {where}.")


def _rotate_key(
    p: Profile, vault_path: str | None, socket_path: str | None, new_key: str | None, activate: bool, verify: bool
) -> None:
    """`rotate --key` (``new_key``) or `rotate --key --activate`, in the running broker or the vault."""
    name = p.name
    if p.auth_method != "private_key_jwt":
        raise ConfigError(
            f"profile {name!r} authenticates with {p.auth_method}, not a key of its own (auth_method private_key_jwt)"
        )
    again = f"nothing changed: register the JWKS `dc-broker keys {name} --jwks` prints, then run this again"
    if broker_running(socket_path):
        try:
            done = ask(socket_path, "set_secrets", profile=name, new_key=new_key, activate_key=activate, verify=verify)
        except (CredentialsRejected, UpstreamUnavailable) as exc:
            raise advised(exc, again) from None
        jwks = done["jwks"]
    else:
        from dc_broker.idp import clientkeys

        with _open_vault(vault_path) as vault:
            current = vault.credentials(name)
            if activate and verify:
                _check_client(p, current, again, next_key=True)
            creds, keys = clientkeys.changed(current, new_key=new_key, activate=activate, now=time.time())
            vault.set_credentials(name, creds)
        jwks = keys.public_jwks()
    kids = [k["kid"] for k in jwks["keys"]]
    if activate:
        checked = "accepted by the identity provider" if verify else "not checked at the identity provider"
        click.echo(f"Profile {name} now signs with key {kids[0]} ({checked}); the old key is gone.")
        click.echo("Remove the old key at the identity provider: its JWKS is now just\n" + json.dumps(jwks, indent=2))
    else:
        click.echo(f"Made key {kids[-1]} for profile {name}; it still signs with key {kids[0]} until activated.")
        click.echo(register_jwks(p, jwks))
        click.echo(f"Then: `dc-broker rotate {name} --key --activate`.")


def _check_client(p: Profile, creds: Credentials, again: str, *, next_key: bool = False) -> None:
    """Does the IdP accept the client as ``creds`` authenticate it (``next_key``: the next key)?"""
    import trio

    from dc_broker.idp.transport import IdpTransport
    from dc_broker.sessions.session import Session
    from dc_broker.store import MemoryStore

    async def check() -> None:
        transport = IdpTransport()
        try:
            await Session(p, MemoryStore({p.name: creds}), transport).check_client(next_key=next_key)
        except UpstreamFault as exc:
            raise UpstreamUnavailable(f"could not check profile {p.name!r} at {p.describe()}: {exc}") from None
        finally:
            await transport.aclose()

    try:
        trio.run(check)
    except DcBrokerError as exc:
        raise advised(exc, again) from None


@click.command()
@CONFIG
@VAULT
@SOCKET
@click.option("--jwks", "as_jwks", is_flag=True, help="print only the public JWKS (what the IdP registers)")
@click.option("--check", is_flag=True, help="ask the IdP whether it accepts the client as it authenticates now")
@PROFILE
def keys(
    config_path: str | None, vault_path: str | None, socket_path: str | None, as_jwks: bool, check: bool, profile: str
) -> None:
    """Show PROFILE's client keys (private_key_jwt): each kid and algorithm, which one signs and which is
    next; with --jwks the public JWKS. Public keys only: anyone who may see the profile may see them.

    --check asks the IdP (one request that spends nothing) whether it accepts the client as it
    authenticates now (a key, a certificate, an assertion file); with a running broker a profile
    the IdP refused then tries again at once."""
    path = config_path or default_config_path()
    p = load_config(path, missing_ok=False).profiles.get(profile)
    if p is None:
        raise UnknownProfile(f"no profile named {profile!r} in {path}; `dc-broker list` shows the profiles")
    running = broker_running(socket_path)
    if check:
        again = f"fix it at the identity provider, then run `dc-broker keys {profile} --check` again"
        if running:
            try:
                ask(socket_path, "set_secrets", profile=profile, verify=True)
            except (CredentialsRejected, LoginRequired, UpstreamUnavailable) as exc:
                raise advised(exc, again) from None
        else:
            with _open_vault(vault_path) as vault:
                creds = vault.credentials(profile)
            _check_client(p, creds, again)
        click.echo(f"The identity provider accepts client {p.client_id} of profile {profile} ({p.auth_method}).")
        return
    if p.auth_method != "private_key_jwt":
        raise ConfigError(f"profile {profile!r} has no keys of its own (auth_method {p.auth_method})")
    if running:
        row = ask(socket_path, "status", profile=profile)["profiles"][0]
        shown = row.get("client_auth") or {}
        rows, jwks = shown.get("keys"), shown.get("jwks")
        if rows is None:
            raise LoginRequired("the vault is locked; run `dc-broker unlock`")
    else:
        from dc_broker.idp import clientkeys

        with _open_vault(vault_path) as vault:
            found = clientkeys.key_set_of(vault.credentials(profile).client_keys)
        jwks = found.public_jwks() if found is not None else None
        rows = []
        if found is not None:
            for state, k in (("active", found.active), ("next", found.next)):
                if k is not None:
                    rows.append({"kid": k.kid, "alg": k.alg, "state": state, "created_at": k.created_at})
    if not rows or jwks is None:
        raise LoginRequired(f"profile {profile!r} has no key; make one with `dc-broker rotate {profile} --key`")
    if as_jwks:
        click.echo(json.dumps(jwks, indent=2))
        return
    for row in rows:
        made = time.strftime("%Y-%m-%d %H:%M", time.localtime(row["created_at"]))
        what = "signs" if row["state"] == "active" else "next: `rotate --key --activate` makes it sign"
        click.echo(f"{row['kid']}  {row['alg']}  made {made}  {what}")


def _what_to_rotate(p: Profile, password: bool, secret: bool) -> list[str]:
    if not password and not secret:  # the profile's own primary credential
        password, secret = p.grant == "password", p.grant != "password"
    which = []
    if password:
        if p.grant != "password":
            raise ConfigError(f"profile {p.name!r} (grant {p.grant}) has no stored password to rotate")
        which.append("password")
    if secret:
        if p.auth_method not in SECRET_METHODS:
            raise ConfigError(f"profile {p.name!r} has no client secret (auth_method {p.auth_method})")
        which.append("client_secret")
    return which


#: what this module adds to the `dc-broker` group
COMMANDS = (init, add, set_, rotate, keys, remove, list_profiles, passwd)
