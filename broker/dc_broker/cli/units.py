"""``dc-broker systemd install``: the unit files, and writing them where systemd looks (a command
that works on files, like ``dc_broker.cli.files``, but on systemd's, not dc-broker's own).

Owns the text of the four units (user socket + service, system socket + service) and the sysusers.d
line for the system broker's dedicated user. The files in the repository's ``systemd/`` directory
are these templates rendered with ``ExecStart=/usr/bin/dc-broker``; a test keeps them identical, so
there is one source of truth and the installed units carry the real path of this installation.

It writes files and prints the next command; it never runs ``systemctl`` itself (the admin decides
when to enable a service) and never writes a secret: the vault key reaches the system service as
a systemd credential (``LoadCredentialEncrypted=``), decrypted by systemd into a private tmpfs.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import click

#: where the shipped copies in systemd/ point; installed units get the real path
DEFAULT_EXEC: Final = "/usr/bin/dc-broker"
SYSTEM_USER: Final = "dc-broker"

USER_SOCKET: Final = """\
[Unit]
Description=dc-broker token broker socket (per user)
Documentation=https://github.com/dataclarity/dc-broker/blob/main/docs/systemd.md

[Socket]
ListenStream=%t/dc-broker/broker.sock
SocketMode=0600
DirectoryMode=0700
RemoveOnStop=yes

[Install]
WantedBy=sockets.target
"""

USER_SERVICE: Final = """\
[Unit]
Description=dc-broker token broker (per user)
Documentation=https://github.com/dataclarity/dc-broker/blob/main/docs/systemd.md
Requires=dc-broker.socket
After=dc-broker.socket

[Service]
Type=notify
ExecStart={exec_start} run
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=2
WatchdogSec=30
TimeoutStopSec=30
UMask=0077
NoNewPrivileges=yes
LockPersonality=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM

[Install]
WantedBy=default.target
Also=dc-broker.socket
"""

SYSTEM_SOCKET: Final = """\
[Unit]
Description=dc-broker shared token broker socket
Documentation=https://github.com/dataclarity/dc-broker/blob/main/docs/systemd.md

[Socket]
ListenStream=/run/dc-broker/broker.sock
SocketUser=dc-broker
SocketGroup=dc-broker
SocketMode=0660
DirectoryMode=0755
RemoveOnStop=yes

[Install]
WantedBy=sockets.target
"""

SYSTEM_SERVICE: Final = """\
[Unit]
Description=dc-broker shared token broker
Documentation=https://github.com/dataclarity/dc-broker/blob/main/docs/systemd.md
Requires=dc-broker.socket
After=dc-broker.socket network-online.target
Wants=network-online.target

[Service]
Type=notify
ExecStart={exec_start} run --system
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=2
WatchdogSec=30
TimeoutStopSec=30

User=dc-broker
Group=dc-broker
UMask=0077
# /run/dc-broker also holds the .socket unit's socket: keep it across restarts
RuntimeDirectory=dc-broker
RuntimeDirectoryMode=0755
RuntimeDirectoryPreserve=yes
StateDirectory=dc-broker
StateDirectoryMode=0700
ConfigurationDirectory=dc-broker
ConfigurationDirectoryMode=0755
Environment=DC_BROKER_CONFIG=%E/dc-broker/config.toml
Environment=DC_BROKER_VAULT=%S/dc-broker/vault.db
# the vault key: `systemd-creds encrypt --name=vault-key KEYFILE /etc/dc-broker/vault-key.cred`
# (add --with-key=host where there is no TPM2 and /var/lib/systemd is a tmpfs)
# (or LoadCredential=vault-key:/path/to/plain-keyfile); the broker reads $CREDENTIALS_DIRECTORY/vault-key
LoadCredentialEncrypted=vault-key:/etc/dc-broker/vault-key.cred

# hardening: every setting is in force when tests/systemd/ runs this unit under a booted systemd, and
# the broker works with all of them; docs/systemd.md says why (`systemd-analyze security`: 1.4)
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
DevicePolicy=closed
PrivateMounts=yes
PrivateIPC=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=default
ProcSubset=pid
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
RemoveIPC=yes
KeyringMode=private
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM

[Install]
WantedBy=multi-user.target
Also=dc-broker.socket
"""

SYSUSERS: Final = 'u dc-broker - "dc-broker shared token broker" /var/lib/dc-broker\n'

#: file name -> template, per mode
USER_UNITS: Final = {"dc-broker.socket": USER_SOCKET, "dc-broker.service": USER_SERVICE}
SYSTEM_UNITS: Final = {"dc-broker.socket": SYSTEM_SOCKET, "dc-broker.service": SYSTEM_SERVICE}


def render(units: Mapping[str, str], exec_start: str) -> dict[str, str]:
    """The unit texts with ``{exec_start}`` filled in (a path with spaces is quoted for systemd)."""
    quoted = f'"{exec_start}"' if any(c.isspace() for c in exec_start) else exec_start
    return {name: text.replace("{exec_start}", quoted) for name, text in units.items()}


def find_executable() -> str:
    """The absolute path of this installation's ``dc-broker`` script."""
    beside = Path(sys.executable).parent / "dc-broker"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside.absolute())
    argv0 = Path(sys.argv[0])
    if argv0.name == "dc-broker" and argv0.is_file():
        return str(argv0.resolve())
    found = shutil.which("dc-broker")
    if found is None:
        raise click.ClickException("cannot find the dc-broker executable; pass --exec /path/to/dc-broker")
    return str(Path(found).absolute())


def user_unit_dir() -> Path:
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(config) / "systemd" / "user"


def write_units(dest: Path, units: Mapping[str, str]) -> list[Path]:
    """Each unit file written whole, mode 0644, with dc-broker's one writer (``dc_broker.atomic``):
    systemd, or a ``daemon-reload`` at any moment, reads the old file or the new one, never a part;
    a link at a unit's path (or at a temporary file's) is neither followed nor replaced."""
    from dc_broker import atomic

    dest.mkdir(parents=True, exist_ok=True)  # as the umask says: a packager's DESTDIR keeps its modes
    written = []
    for name, text in units.items():
        path = dest / name
        try:
            atomic.write(str(path), text.encode(), mode=0o644)
        except OSError as exc:
            raise click.ClickException(f"cannot write {path}: {exc.strerror or exc}") from None
        written.append(path)
    return written


@click.group("systemd")
def systemd_group() -> None:
    """Install the systemd units (socket-activated, Type=notify, hardened)."""


def _checkout_of(exe: str) -> Path | None:
    """The git work tree that holds ``exe``'s virtualenv (``/src/dc-broker/.venv/bin/dc-broker``), if any."""
    venv = Path(exe).parent.parent
    for parent in (venv, *venv.parents):
        if (parent / ".git").exists():
            return parent
    return None


def _interpreter(exe: str) -> str | None:
    """The interpreter a console script runs with (its ``#!`` line), symlinks resolved."""
    try:
        with open(exe, "rb") as f:
            first = f.readline(4096)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].decode("utf-8", "replace").split()
    return os.path.realpath(words[0]) if words else None


def _hidden_from_others(path: str) -> str | None:
    """The first directory on ``path`` that another user cannot enter, or the file itself if it
    cannot be read and run: what the system unit's own user (not root, not you) would meet."""
    real = Path(os.path.realpath(path))
    for parent in reversed(real.parents):
        try:
            if not os.stat(parent).st_mode & 0o001:
                return str(parent)
        except OSError:
            return str(parent)
    try:
        mode = os.stat(real).st_mode
    except OSError:
        return str(real)
    return None if mode & 0o005 == 0o005 else str(real)


def check_exec(exe: str, mode: str) -> None:
    """Refuse an ExecStart= that would break: a checkout's venv, or (system) files the unit's user cannot read."""
    checkout = _checkout_of(exe)
    if checkout is not None:
        how = (
            "pipx install . (or pip install --user .)"
            if mode == "user"
            else "sudo python3 -m venv /opt/dc-broker && sudo /opt/dc-broker/bin/pip install ."
        )
        raise click.ClickException(
            f"{exe} lives in the git checkout {checkout}: the unit would run whatever that checkout holds "
            f"and break when it moves. Install dc-broker for real first ({how}) and run that installation's "
            "`dc-broker systemd install`, or pass --exec PATH (--allow-checkout to use this one anyway)"
        )
    if mode != "system":
        return
    for what, path in (("dc-broker", exe), ("its Python interpreter", _interpreter(exe))):
        if path is None:
            continue
        if path.startswith(("/home/", "/root/")):
            raise click.ClickException(
                f"{what} is {path}, under a home directory, which the system unit hides (ProtectHome=yes). "
                "Install dc-broker outside any home: sudo python3 -m venv /opt/dc-broker && "
                "sudo /opt/dc-broker/bin/pip install dc-broker (use /usr/bin/python3 for the venv)"
            )
        hidden = _hidden_from_others(path)
        if hidden is not None:
            raise click.ClickException(
                f"{what} is {path}, but the system unit's user ({SYSTEM_USER}) cannot reach {hidden}. "
                f"Install dc-broker where every user can read it (e.g. /opt/dc-broker, root-owned, mode 755), "
                f"or make {hidden} readable (chmod o+rx)"
            )


def sysusers_dir_for(dest: Path) -> Path | None:
    """Where systemd-sysusers looks, beside a unit directory: ``/etc/systemd/system`` -> ``/etc/sysusers.d``,
    ``DESTDIR/usr/lib/systemd/system`` -> ``DESTDIR/usr/lib/sysusers.d``. None for any other directory."""
    if dest.name == "system" and dest.parent.name == "systemd":
        return dest.parent.parent / "sysusers.d"
    return None


@systemd_group.command("install")
@click.option("--user", "mode", flag_value="user", default=True, help="per-user units (default)")
@click.option("--system", "mode", flag_value="system", help="the shared broker, run as the dc-broker user")
@click.option(
    "--dest",
    type=click.Path(file_okay=False),
    help="directory to write to (default: ~/.config/systemd/user, or /etc/systemd/system with --system)",
)
@click.option(
    "--sysusers-dir",
    type=click.Path(file_okay=False),
    help="--system: where the sysusers.d file goes (default: /etc/sysusers.d, or the sysusers.d beside --dest)",
)
@click.option("--exec", "exec_start", help="path of dc-broker for ExecStart= (default: this installation's)")
@click.option("--allow-checkout", is_flag=True, help="allow an ExecStart= inside a git checkout (development only)")
def install(
    mode: str, dest: str | None, sysusers_dir: str | None, exec_start: str | None, allow_checkout: bool
) -> None:
    """Write dc-broker.socket and dc-broker.service (ExecStart= this installation's dc-broker), and
    print the command that starts them. Refuses a dc-broker the unit could not run: one in a git
    checkout's venv, or (--system) one under a home directory or unreadable to other users."""
    exe = exec_start or find_executable()
    if not os.path.isabs(exe):
        raise click.ClickException(f"--exec must be an absolute path, not {exe!r}")
    if not allow_checkout:
        check_exec(exe, mode)
    if mode == "system":
        target = Path(dest or "/etc/systemd/system")
        users_dir = Path(sysusers_dir) if sysusers_dir else sysusers_dir_for(target)
        if users_dir is None:
            raise click.ClickException(
                f"--dest {target} is not a systemd/system directory, so the sysusers.d file has no obvious "
                "place; pass --sysusers-dir DIR (systemd-sysusers reads /etc/sysusers.d and /usr/lib/sysusers.d)"
            )
        written = write_units(target, render(SYSTEM_UNITS, exe))
        written += write_units(users_dir, {"dc-broker.conf": SYSUSERS})
        for path in written:
            click.echo(f"wrote {path}")
        click.echo(
            "next: systemd-sysusers && systemctl daemon-reload && systemctl enable --now dc-broker.socket\n"
            "(put profiles in /etc/dc-broker/config.toml and the vault key credential in "
            "/etc/dc-broker/vault-key.cred first; see docs/systemd.md)"
        )
        return
    target = Path(dest) if dest else user_unit_dir()
    for path in write_units(target, render(USER_UNITS, exe)):
        click.echo(f"wrote {path}")
    click.echo("next: systemctl --user daemon-reload && systemctl --user enable --now dc-broker.socket")


#: what this module adds to the `dc-broker` group
COMMANDS = (systemd_group,)
