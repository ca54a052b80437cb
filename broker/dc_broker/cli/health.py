"""The commands an operator or a monitor runs: ``dc-broker metrics``, ``check`` and ``doctor``.

- ``metrics`` prints the broker's Prometheus exposition (the ``metrics`` op): for a node exporter's
  textfile collector or a timer (docs/operations.md).
- ``check [PROFILE...] [--min-ttl S]`` exits 0 when each profile (all it may see, by default) can
  serve a token with S seconds left (``observe.health``), else 1 with one ``FAIL`` line per profile
  (and when there is no profile to check); for ``ExecStartPost=``, timers, cron and container probes.
- ``doctor`` checks a setup end to end, one line each, ``ok`` or ``FAIL`` with the fix, and exits 1
  on any failure: the config, the socket (whose, its mode), the broker, the vault, each profile,
  each profile's IdP (discovery served, the clock against its ``Date``), the systemd units. With no
  broker running it says so and checks the files; as a consumer of someone else's broker it checks
  only what a consumer may see. Each IdP is asked the way the broker asks it: the profile's CA bundle,
  its proxy as ``dc_broker.idp.proxies.route`` chooses it; a CA bundle that does not load, a proxy
  that does not answer, is that profile's ``FAIL`` line. Whatever a config that loads holds, doctor
  ends with its summary line, never a traceback.

Never prints a secret: the checks read names, modes, states and what the IdP's public discovery
document says.
"""

from __future__ import annotations

import contextlib
import email.utils
import os
import shlex
import ssl
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from dc_broker.cli.boundary import CONFIG, SOCKET, VAULT
from dc_broker.observe.health import problem, seconds
from dc_token.errors import BrokerDenied, BrokerUnavailable, DcBrokerError
from dc_token.paths import SYSTEM_SOCKET, default_socket_path
from dc_token.sync import TokenClient

#: the IdP's Date may differ from our clock by this much before doctor calls the clock wrong
CLOCK_SKEW = 5.0
#: how long doctor waits for each IdP
IDP_TIMEOUT = 5.0

MIN_TTL = click.option(
    "--min-ttl",
    type=click.FloatRange(0, 86400),
    default=60.0,
    show_default=True,
    help="seconds a profile must be able to serve a token for",
)


class Unhealthy(click.ClickException):
    """A check that failed: its lines are printed already; exit status 1, no further message."""

    exit_code = 1

    def show(self, file: Any = None) -> None:
        pass


@click.command()
@SOCKET
def metrics(socket_path: str | None) -> None:
    """Print the broker's metrics in the Prometheus text format (for a textfile collector or a timer)."""
    with TokenClient(socket_path, cache=False) as broker:
        text = broker.request("metrics")["text"]
    click.echo(text, nl=False)


@click.command()
@SOCKET
@MIN_TTL
@click.argument("profiles", nargs=-1, metavar="[PROFILE]...")
def check(socket_path: str | None, min_ttl: float, profiles: tuple[str, ...]) -> None:
    """Exit 0 when each PROFILE (default: every profile you may see) can serve a token with at least
    --min-ttl seconds left; otherwise print one FAIL line per failing profile and exit 1."""
    with TokenClient(socket_path, cache=False) as broker:
        result = broker.status_all()
    verdicts = judge(result["profiles"], profiles, min_ttl)
    if not verdicts:
        click.echo(f"FAIL: {NOTHING_TO_CHECK}")
        raise Unhealthy("")
    failed = False
    for name, why in verdicts:
        if why is not None:
            failed = True
            click.echo(f"FAIL {name}: {why}")
    if failed:
        raise Unhealthy("")
    click.echo(f"ok: {len(verdicts)} profile(s) can serve a token with at least {seconds(min_ttl)} left")


#: check's line when the broker shows no profile (a check that checked nothing must not pass)
NOTHING_TO_CHECK = "no profile to check (the config has none, or none you may use); add one with `dc-broker add`"


def judge(entries: list[dict[str, Any]], names: Iterable[str], min_ttl: float) -> list[tuple[str, str | None]]:
    """(profile, why it fails or None) for each named profile (every entry when none is named)."""
    by_name = {e["profile"]: e for e in entries}
    wanted = list(names) or list(by_name)
    now = time.time()  # the broker's last_refresh is on the wall clock of this machine
    out: list[tuple[str, str | None]] = []
    for name in wanted:
        entry = by_name.get(name)
        if entry is None:
            out.append((name, "not a profile this broker shows you (`dc-broker status` lists them)"))
        else:
            out.append((name, problem(entry, min_ttl, now=now)))
    return out


# ---------------------------------------------------------------- doctor


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    failures: int = 0

    def ok(self, what: str, detail: str) -> None:
        click.echo(f"ok    {what}: {detail}")

    def fail(self, what: str, why: str, fix: str | None) -> None:
        """A failed check; ``fix`` None: ``why`` says what to do already."""
        self.failures += 1
        click.echo(f"FAIL  {what}: {why}")
        if fix is not None:
            click.echo(f"      fix: {fix}")


@click.command()
@CONFIG
@SOCKET
@VAULT
@MIN_TTL
def doctor(config_path: str | None, socket_path: str | None, vault_path: str | None, min_ttl: float) -> None:
    """Check the setup end to end (config, socket, broker, vault, profiles, identity providers, the
    clock, systemd units): one line each, ok or FAIL with the fix; exit 1 on any failure."""
    report = Report()
    config = _config(report, config_path)
    path = socket_path or (config.socket if config is not None else None) or default_socket_path()
    owner = _socket(report, path)
    consumer = owner is not None and owner != os.getuid() and os.getuid() != 0
    hello = _broker(report, path) if owner is not None else None
    status: dict[str, Any] | None = None
    if hello is not None:
        with TokenClient(path, cache=False) as broker:
            status = broker.status_all()
    if consumer:
        report.ok("access", f"you use the broker of uid {owner}: its config, vault and IdPs are for its owner to check")
    else:
        _vault(report, status, vault_path)
    if status is not None:
        for name, why in judge(status["profiles"], (), min_ttl):
            if why is None:
                report.ok(f"profile {name}", f"can serve a token with at least {seconds(min_ttl)} left")
            else:
                report.fail(f"profile {name}", why, _profile_fix(name, why))
    if config is not None and not consumer:
        _idps(report, config.profiles.values())
        _units(report, system=path == SYSTEM_SOCKET)
    click.echo(f"doctor: {report.failures} problem(s)" if report.failures else "doctor: no problems found")
    if report.failures:
        raise Unhealthy("")


def _profile_fix(name: str, why: str) -> str | None:
    """The fix line for a profile's ``FAIL``; None when ``why`` (check's line) names it already."""
    if why.startswith("locked"):
        return _unless_said(why, "dc-broker unlock", "`dc-broker unlock`")
    if why.startswith(("login_required", "its login ends")):
        return _unless_said(why, f"dc-broker login {name}", f"`dc-broker login {name}`")
    if why.startswith("rejected"):
        return _unless_said(
            why,
            "dc-broker rotate",
            f"store the right credentials: `dc-broker rotate {name}` (the message above says which)",
        )
    if why.startswith(("unavailable", "stale")):
        return "see the identity provider check below; the broker keeps retrying by itself"
    if why.startswith(("its tokens last", "its token has")):
        return None  # the line says both ways out
    return f"`dc-broker status {name}` and the broker's log (`journalctl -u dc-broker`)"


def _unless_said(why: str, command: str, fix: str) -> str | None:
    return None if command in why else fix


def _config(report: Report, config_path: str | None) -> Any:
    from dc_broker.config.load import load_config
    from dc_broker.errors import ConfigError

    try:
        config = load_config(config_path, missing_ok=config_path is None)
    except PermissionError as exc:
        report.ok("config", f"{exc.filename} is not readable by you (a consumer of a shared broker?); not checked")
        return None
    except ConfigError as exc:
        if config_path is not None and not os.path.exists(config_path):
            report.fail(
                "config",
                f"{config_path} does not exist",
                f"create it with `dc-broker add --config {config_path} PROFILE ...`, or pass the right --config",
            )
        else:
            report.fail("config", str(exc).splitlines()[0], "correct the file at the line the message names")
        return None
    where = config.path or "(none: no config file yet)"
    report.ok("config", f"{where}: {len(config.profiles)} profile(s)")
    return config


def _socket(report: Report, path: str) -> int | None:
    """Check the socket file and its directory; the socket's owner uid, or None without one."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        report.fail(
            "broker",
            f"not running (no socket at {path}); the files are checked below",
            "start it: `systemctl --user start dc-broker` (or `dc-broker run`)",
        )
        return None
    except PermissionError:
        report.fail(
            "socket", f"{path} cannot be reached (permission denied)", "ask the broker's administrator for access"
        )
        return None
    if not stat.S_ISSOCK(st.st_mode):
        report.fail("socket", f"{path} is not a socket", f"remove it and start the broker: `rm {path}`")
        return None
    mode = stat.S_IMODE(st.st_mode)
    directory = os.path.dirname(path) or "."
    dmode = stat.S_IMODE(os.stat(directory).st_mode)
    if mode & 0o007:
        report.fail(
            "socket",
            f"{path} is mode {mode:04o}: any local user may connect to it",
            f"`chmod 600 {path}` (a restarted broker makes it 0600, or 0660 for the shared broker's group)",
        )
    elif dmode & 0o002 and not dmode & stat.S_ISVTX:
        report.fail(
            "socket",
            f"its directory {directory} is mode {dmode:04o}: anyone may replace the socket",
            f"`chmod 700 {directory}`",
        )
    else:
        report.ok("socket", f"{path} mode {mode:04o}, owned by uid {st.st_uid}")
    return st.st_uid


def _broker(report: Report, path: str) -> dict[str, Any] | None:
    try:
        with TokenClient(path, cache=False, timeout=10.0) as broker:
            hello = broker.request("hello")
    except BrokerDenied as exc:  # a BrokerUnavailable, but running: starting it is no fix
        report.fail("broker", str(exc), exc.hint)  # dc-token's advice for its exit status 9
        return None
    except BrokerUnavailable as exc:
        report.fail(
            "broker",
            str(exc),
            "start it: `systemctl --user start dc-broker` (or `dc-broker run`); the files are checked below",
        )
        return None
    except DcBrokerError as exc:
        report.fail("broker", str(exc), "see the broker's log (`journalctl -u dc-broker`)")
        return None
    report.ok("broker", f"dc-broker {hello.get('version', '?')} answers on {path}")
    return hello


def _vault(report: Report, status: dict[str, Any] | None, vault_path: str | None) -> None:
    if status is not None:
        state = status["broker"].get("vault")
        if state == "locked":
            report.fail("vault", "locked: no token is served", "`dc-broker unlock`")
        else:
            report.ok("vault", f"{state or 'open'}")
        return
    from dc_broker.errors import ConfigError
    from dc_broker.vault import Vault, default_vault_path

    path = vault_path or default_vault_path()
    if not os.path.exists(path):
        report.ok("vault", f"none at {path}: the broker keeps secrets in memory only (`dc-broker init` makes one)")
        return
    try:
        vault = Vault.open(path)
    except ConfigError as exc:
        report.fail("vault", str(exc), "see the message; `dc-broker init --force` starts a new vault (secrets lost)")
        return
    try:
        kind = vault.key_source.kind.value
    finally:
        vault.close()
    report.ok("vault", f"{path} opens (key: {kind})")


#: what an IdP check found: None (it answers), or why not and whose fix applies ("idp", "ca", "proxy")
Found = tuple[str, str] | None


def _idps(report: Report, profiles: Iterable[Any]) -> None:
    """Ask each profile's IdP for its discovery document the way the broker asks it: through the
    route ``proxies.route`` picks (the profile's proxy, ``direct``, or the environment's), with the
    profile's CA bundle. One line per profile; profiles that share all three share one request."""
    from dc_broker.errors import ConfigError
    from dc_broker.idp import proxies

    try:
        env: proxies.EnvProxies | None = proxies.EnvProxies.from_environ(os.environ)
        env_problem = ""
    except ConfigError as exc:  # a proxy variable that is no proxy URL: the message says what to do
        env, env_problem = None, str(exc)
    seen: dict[tuple[str, str | None, str | None], Found] = {}
    skews: list[float] = []
    for profile in profiles:
        base = profile.endpoint_base() or profile.issuer
        url = base.rstrip("/") + "/.well-known/openid-configuration" if base else profile.token_url
        what = f"idp {profile.name}"
        if env is None and profile.proxy is None:
            report.fail(what, env_problem, None)
            continue
        via = proxies.route(url, profile.proxy, env or proxies.EnvProxies())
        key = (url, profile.ca_bundle, via)
        if key not in seen:
            seen[key] = _ask(url, base, profile.ca_bundle, via, skews)
        found = seen[key]
        if found is None:
            report.ok(what, f"discovery served by {base}" if base else f"{url} answers")
        else:
            why, kind = found
            report.fail(what, why, _idp_fix(profile, kind))
    if skews:
        worst = max(skews, key=abs)
        if abs(worst) > CLOCK_SKEW:
            report.fail(
                "clock",
                f"{abs(worst):.0f} s {'behind' if worst > 0 else 'ahead of'} the identity provider's",
                "keep the clock in step (`timedatectl set-ntp true`, or chrony/ntpd)",
            )
        else:
            report.ok("clock", f"in step with the identity provider (within {CLOCK_SKEW:g} s)")


def _ask(url: str, base: str | None, ca_bundle: str | None, via: str | None, skews: list[float]) -> Found:
    """One IdP check: the client built as the broker builds it (``idp.transport``), then one GET.
    Nothing it meets ends doctor: a CA bundle that does not load, a proxy or an IdP that does not
    answer, anything else httpx raises, is a reason."""
    import httpx

    from dc_broker.idp import proxies

    try:
        verify: ssl.SSLContext | bool = True if ca_bundle is None else ssl.create_default_context(cafile=ca_bundle)
    except OSError as exc:  # ssl.SSLError included
        return f"ca_bundle {ca_bundle}: {_unreadable(exc)}", "ca"
    through = "" if via is None else f" through the proxy {proxies.shown(via)}"
    kind = "idp" if via is None else "proxy"
    try:
        with httpx.Client(verify=verify, timeout=IDP_TIMEOUT, proxy=via, trust_env=False) as client:
            resp = client.get(url)
    except httpx.TimeoutException:
        return f"{url}{through}: no answer in {IDP_TIMEOUT:g} s", kind
    except httpx.ProxyError as exc:  # the proxy answered, and refused: its words, without credentials
        return f"cannot reach {url}{through}: the proxy refused: {proxies.scrub(str(exc), via)}", "proxy"
    except httpx.HTTPError as exc:
        return f"cannot reach {url}{through}: {_reason(exc)}", kind
    except Exception as exc:  # doctor reports what it meets, it does not crash
        return f"cannot ask {url}{through}: {type(exc).__name__}: {proxies.scrub(str(exc), via)}", kind
    date = resp.headers.get("Date")
    if date:
        with contextlib.suppress(TypeError, ValueError):
            skews.append(email.utils.parsedate_to_datetime(date).timestamp() - time.time())
    if not base:
        return None
    if resp.status_code != 200:
        return f"{url} answers HTTP {resp.status_code}, not the discovery document", "idp"
    try:
        doc = resp.json()
    except ValueError:
        doc = None
    return None if isinstance(doc, dict) and "token_endpoint" in doc else (f"{url} is not a discovery document", "idp")


def _unreadable(exc: OSError) -> str:
    """Why a CA bundle does not load, as a person reads it."""
    if isinstance(exc, ssl.SSLError):
        if exc.reason == "NO_CERTIFICATE_OR_CRL_FOUND":
            return "no PEM certificate in it"
        return f"its certificates cannot be read ({exc.reason or exc.strerror or exc})"
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    text = exc.strerror or str(exc)
    return text[:1].lower() + text[1:]


def _reason(exc: Exception) -> str:
    import httpx

    if isinstance(exc, httpx.ConnectError):
        return "connection refused or host unreachable"
    return type(exc).__name__


def _idp_fix(profile: Any, kind: str = "idp") -> str:
    name = profile.name
    if kind == "ca":
        return (
            f"`dc-broker set {name} ca_bundle=PATH` with the PEM file of the CA that signed the identity provider's "
            f"certificate, or `dc-broker set {name} ca_bundle=` for the system's CAs"
        )
    if kind == "proxy":
        where = "" if profile.proxy is not None else " (https_proxy, all_proxy and no_proxy choose it)"
        return (
            f"check that the proxy is up and its address right{where}, or set the profile's: "
            f"`dc-broker set {name} proxy=URL` (proxy=direct for none)"
        )
    return (
        f"check that the identity provider is up and the profile's URL is right (`dc-broker set {name} "
        "server=...`); behind a proxy, set https_proxy or the profile's proxy"
    )


def _units(report: Report, *, system: bool) -> None:
    """The units of this broker: the system unit for the shared broker's socket, else the user's."""
    from dc_broker.cli.units import user_unit_dir

    unit = Path("/etc/systemd/system") if system else user_unit_dir()
    found = [p for p in (unit / "dc-broker.service",) if p.exists()]
    if not found:
        report.ok("systemd", "no dc-broker unit installed (`dc-broker systemd install` makes one)")
        return
    for unit in found:
        command = _exec_start(unit)
        exe = _program(command)
        if not exe or not os.access(exe, os.X_OK):
            report.fail(
                "systemd",
                f"{unit} runs {exe or 'nothing'}, which is not an executable",
                "`dc-broker systemd install` again (with --system for the shared broker)",
            )
        else:
            report.ok("systemd", f"{unit} runs {command}")


def _program(command: str) -> str:
    """The program an ``ExecStart=`` command runs: its first word, unquoted as systemd unquotes it
    (``systemd install`` quotes a path with a space); "" for none or unbalanced quotes."""
    try:
        words = shlex.split(command)
    except ValueError:
        return ""
    return words[0] if words else ""


def _exec_start(unit: Path) -> str:
    for line in unit.read_text().splitlines():
        if line.startswith("ExecStart="):
            return line.removeprefix("ExecStart=").lstrip("-@:+!")
    return ""


COMMANDS = (metrics, check, doctor)
