"""A real systemd for the tests: the host's own OS booted as a throwaway container (systemd-nspawn).

Owns booting one container, running commands in it, installing the project's wheel into it, and
leaving nothing behind: the nspawn process, its processes, its cgroups. It is a test tool, not a
security boundary (root inside keeps CAP_SYS_ADMIN). The facts it is built on (no host systemd, so
``machinectl``/``-M`` do not work and ``nsenter`` does; cgroups made by hand; firstboot and PAM) are
in ../shared/systemd-nspawn.md and docs/systemd.md.

    wheelhouse = build_wheelhouse(tmp)          # the project's wheel + its dependencies, once
    with Machine.boot("dcb-user", wheelhouse) as m:
        m.install()                             # venv in /opt/dc-broker, wheel[dev] from the wheelhouse
        m.run("systemctl", "is-system-running")
        m.run("dc-token", "demo", user="alice")

``skip_reason()`` says why nspawn cannot run here at all (not root, no systemd-nspawn, no writable
cgroup hierarchy); under ``CI=true`` the tests fail instead of skipping, so CI never passes by
skipping them. Never used for anything but tests and bench/coldstart.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from tests.e2e import wait_for

ROOT = Path(__file__).resolve().parents[2]
CGROUP_HIERARCHIES = ("/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified")
#: host files the container needs: PAM for user@.service and runuser, NSS for dynamic users
HOST_ETC = ("/etc/pam.d", "/etc/security", "/etc/login.defs", "/etc/nsswitch.conf", "/etc/alternatives")
VENV = "/opt/dc-broker"
WHEELHOUSE = "/opt/wheelhouse"
PATH = f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: the interpreter the container's venv is made from: the host's /usr is the container's /usr
SYSTEM_PYTHON = "/usr/bin/python3"

#: what the booted systemd says about itself (``systemctl --version``, first line); set at boot
booted_versions: list[str] = []
#: figures the tests measured, printed in pytest's terminal summary (e.g. the exposure score)
report: list[str] = []
#: host units that cannot work in the container: with --private-network there is only lo, which
#: networkd never calls online, so wait-online would hold network-online.target (and with it the
#: system unit's first start, After=network-online.target) for its 2 min timeout
MASKS = ("systemd-networkd-wait-online.service",)
#: the units whose failure is ours to judge: the project's and what runs it (a user's manager, the
#: dev IdP this harness starts). Any other failed unit is the host image's business: a web server
#: someone installed, avahi pulled in by a browser package. It is reported, never a boot error.
OURS = re.compile(r"^(dc-broker.*|dev-idp-.*|user@\d+\.service|user-runtime-dir@\d+\.service)$")
#: the unit ``boot(unrelated_failure=True)`` makes fail at boot, inside the container only
UNRELATED = "dcb-unrelated-failure.service"
UNRELATED_UNIT = """[Unit]
Description=A unit that is not dc-broker's and fails at boot (the test harness's stand-in for a broken host unit)

[Service]
Type=oneshot
ExecStart=/bin/false
"""


class BootError(RuntimeError):
    """The container did not come up; the message carries its console output."""


def skip_reason() -> str | None:
    """Why a container cannot be booted here at all, or None when it can."""
    if sys.platform != "linux":
        return "systemd-nspawn needs Linux"
    if os.geteuid() != 0:
        return "systemd-nspawn needs root (run the systemd tests as root, as CI does)"
    if shutil.which("systemd-nspawn") is None:
        return "systemd-nspawn is not installed (apt-get install systemd-container; .ci/run does)"
    if shutil.which("nsenter") is None:
        return "nsenter is not installed (util-linux)"
    if os.path.exists("/run/systemd/system"):
        return "the host runs systemd itself; this harness is for hosts without it (use systemd-run --scope there)"
    for hierarchy in CGROUP_HIERARCHIES:
        if not os.access(hierarchy, os.W_OK):
            return f"{hierarchy} is not a writable cgroup hierarchy; nspawn cannot make its cgroups"
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"{SYSTEM_PYTHON} is missing: the container's venv is made from the host's /usr"
    version = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import sys, venv; print(sys.version_info >= (3, 11))"], capture_output=True, text=True
    )
    if version.stdout.strip() != "True":
        return f"{SYSTEM_PYTHON} is not Python 3.11+ with the venv module (python3-venv)"
    return None


def build_wheelhouse(dest: Path) -> Path:
    """The project's wheel (``python -m build --wheel``) and every dependency, [dev] included, as
    wheels in ``dest``: the container has no network, it installs from here with ``--no-index``."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--installer", "pip", "--outdir", str(dest), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = dest.glob("dc_broker-*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", str(dest), f"{wheel}[dev]"],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return dest


def _cgroup_dirs(name: str) -> list[Path]:
    return [Path(h) / f"nspawn-{name}" for h in CGROUP_HIERARCHIES]


def _remove_cgroups(name: str) -> list[str]:
    """rmdir the container's cgroups depth first; returns what could not be removed."""
    left = []
    for top in _cgroup_dirs(name):
        if not top.exists():
            continue
        for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda w: -w[0].count("/")):
            try:
                os.rmdir(dirpath)
            except OSError as exc:
                left.append(f"{dirpath}: {exc.strerror}")
    return left


def _cgroup_pids(name: str) -> set[int]:
    pids: set[int] = set()
    for top in _cgroup_dirs(name):
        for procs in top.rglob("cgroup.procs") if top.exists() else ():
            with contextlib.suppress(OSError):
                pids.update(int(p) for p in procs.read_text().split())
    return pids


class Machine:
    """One booted container. ``run`` executes a command inside it (as root or as a user)."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], leader: int, console: Path) -> None:
        self.name = name
        self.proc = proc
        self.leader = leader
        self.console = console
        self.version = ""

    # ------------------------------------------------------------ lifetime

    @classmethod
    @contextlib.contextmanager
    def boot(
        cls,
        name: str,
        wheelhouse: Path,
        workdir: Path,
        *,
        masks: Sequence[str] = (),
        timeout: float = 60,
        unrelated_failure: bool = False,
    ) -> Iterator[Machine]:
        """Boot, wait until the boot has finished (``is-system-running --wait``: running, or degraded
        by units that are not ours, which are reported and ignored), yield; power off and clean up
        after. ``unrelated_failure``: a unit that is not dc-broker's fails at boot, inside the
        container (its file is bound in read-only and wanted from the kernel command line)."""
        for top in _cgroup_dirs(name):
            top.mkdir(exist_ok=True)
        console = workdir / f"{name}.console"
        args = ["systemd-nspawn", "-q", "-D", "/", "--volatile=yes", "-b", "-M", name]
        args += ["--register=no", "--keep-unit", "--console=read-only", "--private-network"]
        args += [f"--bind-ro={p}" for p in HOST_ETC if os.path.exists(p)]
        args += [f"--bind-ro={wheelhouse}:{WHEELHOUSE}", f"--bind-ro={ROOT / 'tests' / 'systemd'}:/opt/dc-tests"]
        cmdline = ["systemd.firstboot=off", *(f"systemd.mask={m}" for m in (*MASKS, *masks))]
        if unrelated_failure:
            unit = workdir / UNRELATED
            unit.write_text(UNRELATED_UNIT)
            args += [f"--bind-ro={unit}:/etc/systemd/system/{UNRELATED}"]
            cmdline += [f"systemd.wants={UNRELATED}"]
        args += ["--", *cmdline]

        def enter_cgroups() -> None:  # in the child, before exec: nspawn needs cgroups of its own
            for top in _cgroup_dirs(name):
                (top / "cgroup.procs").write_text(str(os.getpid()))

        ours = (name, str(wheelhouse), str(ROOT / "tests" / "systemd"))
        mounts_before = _mounts(ours)
        try:
            with console.open("wb") as out:
                proc = subprocess.Popen(
                    args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, preexec_fn=enter_cgroups
                )
        except BaseException:
            _remove_cgroups(name)
            raise
        try:
            leader = _wait_for(lambda: _container_init(proc.pid), timeout, proc, console, "the container's systemd")
            _wait_for(
                lambda: os.path.exists(f"/proc/{leader}/root/run/systemd/private") or None,
                timeout,
                proc,
                console,
                "the container's manager socket",
            )
            machine = cls(name, proc, leader, console)
            state = machine.run("systemctl", "is-system-running", "--wait", check=False, timeout=timeout).stdout.strip()
            failed = machine.failed_units()
            ours = [u for u in failed if OURS.match(u)]
            if state not in ("running", "degraded") or ours:
                raise BootError(f"container {name} is {state!r} after boot; {machine.describe_failures(failed)}")
            if failed:
                report.append(
                    f"container {name} booted {state}: units not dc-broker's failed, ignored: {', '.join(failed)}"
                )
            machine.version = machine.run("systemctl", "--version").stdout.splitlines()[0]
            booted_versions.append(machine.version)
            yield machine
        finally:
            _power_off(proc, name)
            left = _remove_cgroups(name)
            if left:
                raise AssertionError(f"container {name} left cgroups behind: {left}")
            if _mounts(ours) != mounts_before:
                raise AssertionError(f"container {name} left mounts on the host: {_mounts(ours) - mounts_before}")

    # ------------------------------------------------------------ commands inside

    def command(
        self, *cmd: str, user: str | None = None, env: dict[str, str] | None = None, cwd: str | None = None
    ) -> list[str]:
        """The host argv that runs ``cmd`` inside the container: nsenter into every namespace of its
        PID 1, a clean environment, and for ``user`` runuser with that user's runtime dir (so
        ``systemctl --user`` reaches the lingering user manager)."""
        base = {"PATH": PATH, "LANG": "C.UTF-8"}
        if user is None:
            base.update(HOME="/root")
            prefix: list[str] = []
        else:
            uid = self.uid(user)
            base.update(HOME=f"/home/{user}", USER=user, XDG_RUNTIME_DIR=f"/run/user/{uid}")
            prefix = ["runuser", "-u", user, "--"]
        base.update(env or {})
        wd = ["--wdns=" + (cwd or base["HOME"])] if cwd or user else []
        return [
            "nsenter",
            "-t",
            str(self.leader),
            "-a",
            *wd,
            *prefix,
            "env",
            "-i",
            *(f"{k}={v}" for k, v in base.items()),
            *cmd,
        ]

    def run(
        self,
        *cmd: str,
        user: str | None = None,
        input: str | None = None,
        env: dict[str, str] | None = None,
        check: bool = True,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            self.command(*cmd, user=user, env=env),
            input=input if input is not None else "",
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            who = f" as {user}" if user else ""
            failed = [u for u in self.failed_units() if OURS.match(u)]
            why = f"\n{self.describe_failures(failed)}" if failed else ""
            raise AssertionError(f"{list(cmd)}{who} exited {done.returncode}:\n{done.stdout}\n{done.stderr}{why}")
        return done

    def sh(self, script: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-ec", script, **kw)  # type: ignore[arg-type]

    def failed_units(self) -> list[str]:
        """The names of the container's failed units, now."""
        out = self.run("systemctl", "list-units", "--failed", "--plain", "--no-legend", check=False).stdout
        return [line.split()[0] for line in out.splitlines() if line.strip()]

    def describe_failures(self, units: Sequence[str] | None = None, *, user: str | None = None) -> str:
        """Which units failed, and each one's status and last journal lines: what a failing test says."""
        units = self.failed_units() if units is None else units
        if not units:
            return "no unit failed"
        parts = [f"failed units: {', '.join(units)}"]
        for unit in units:
            status = self.run("systemctl", "status", "--no-pager", "-n", "15", unit, check=False)
            parts.append(f"--- {unit}\n{status.stdout.strip()}")
        return "\n".join(parts)

    def uid(self, user: str) -> int:
        out = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", "id", "-u", user], capture_output=True, text=True, check=True
        )
        return int(out.stdout)

    def write(self, path: str, text: str, *, mode: int = 0o644, owner: str | None = None) -> None:
        """Write a file inside the container (through its root, as root; then chown)."""
        host = Path(f"/proc/{self.leader}/root{path}")
        host.parent.mkdir(parents=True, exist_ok=True)
        host.write_text(text)
        host.chmod(mode)
        if owner:
            self.run("chown", owner, path)

    def read(self, path: str) -> str:
        return Path(f"/proc/{self.leader}/root{path}").read_text()

    def wait_until(self, what: str, probe: Callable[[], object], timeout: float = 30, every: float = 0.1) -> object:
        """Poll ``probe`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
        return wait_for(probe, timeout, what, every=every)

    # ------------------------------------------------------------ the project inside

    def install(self) -> None:
        """The README's install: a venv in /opt/dc-broker from the system python, the wheel with the
        dev extra (the dev IdP runs in here too), from the wheelhouse only."""
        self.run(SYSTEM_PYTHON, "-m", "venv", VENV, timeout=120)
        self.run(
            f"{VENV}/bin/python",
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--disable-pip-version-check",
            "--find-links",
            WHEELHOUSE,
            "dc-broker[dev]",
            timeout=300,
        )

    def add_user(self, name: str, *, groups: Sequence[str] = (), linger: bool = True) -> int:
        """A login user with a home; with ``linger`` its user manager runs (user@UID.service)."""
        cmd = ["useradd", "-m", "-s", "/bin/sh"]
        if groups:
            cmd += ["-G", ",".join(groups)]
        self.run(*cmd, name)
        uid = self.uid(name)
        if linger:
            self.run("loginctl", "enable-linger", name)
            self.wait_until(
                f"{name}'s user manager",
                lambda: (
                    self.run("systemctl", "is-active", f"user@{uid}.service", check=False).stdout.strip() == "active"
                    and os.path.exists(f"/proc/{self.leader}/root/run/user/{uid}/systemd/private")
                ),
            )
        return uid

    def show(self, unit: str, prop: str, *, user: str | None = None) -> str:
        scope = ["--user"] if user else []
        return self.run("systemctl", *scope, "show", "-p", prop, "--value", unit, user=user).stdout.strip()

    def start_idp(self, port: int = 18080, *options: str) -> str:
        """The dev IdP + demo API, a plain process of the installed venv (a transient unit, so the
        container's systemd reaps it at poweroff), with devserver ``options``. Returns its base URL."""
        self.run(
            "systemd-run",
            f"--unit=dev-idp-{port}",
            "--collect",
            f"{VENV}/bin/python",
            "-m",
            "dc_broker.devserver",
            "--port",
            str(port),
            *options,
        )
        base = f"http://127.0.0.1:{port}"
        probe = f"import urllib.request; urllib.request.urlopen('{base}/realms/demo/.well-known/openid-configuration')"
        self.wait_until(
            "the dev IdP", lambda: self.run(f"{VENV}/bin/python", "-c", probe, check=False).returncode == 0, 60, 0.2
        )
        return base


def _mounts(words: Sequence[str]) -> set[str]:
    """The host's mount table lines that name this container or what it binds (other agents on the
    same machine may mount things of their own meanwhile: those are not ours to judge)."""
    with open("/proc/self/mountinfo") as f:
        return {line for line in f if any(w in line for w in words)}


def _container_init(nspawn_pid: int) -> int | None:
    """The container's PID 1 (as a host pid): the child of nspawn that runs systemd."""
    try:
        children = Path(f"/proc/{nspawn_pid}/task/{nspawn_pid}/children").read_text().split()
    except OSError:
        return None
    for child in children:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                return int(child)
    return None


def _wait_for(
    probe: Callable[[], int | bool | None], timeout: float, proc: subprocess.Popen[bytes], console: Path, what: str
) -> int:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return int(value)
        if proc.poll() is not None:
            raise BootError(f"systemd-nspawn exited {proc.returncode} before {what} came up:\n{_tail(console)}")
        if time.monotonic() > deadline:
            raise BootError(f"{what} did not come up in {timeout:g} s:\n{_tail(console)}")
        time.sleep(0.02)


def _tail(console: Path, lines: int = 40) -> str:
    try:
        return "\n".join(console.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no console output)"


def _power_off(proc: subprocess.Popen[bytes], name: str) -> None:
    """SIGTERM to nspawn = an orderly poweroff of the container; SIGKILL what is left after 30 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    deadline = time.monotonic() + 10
    while pids := _cgroup_pids(name):  # processes of the container still alive (all ours by construction)
        if time.monotonic() > deadline + 10:
            return  # unkillable (D state): _remove_cgroups then names what is left
        if time.monotonic() > deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def exposure(text: str) -> float:
    """The number in ``systemd-analyze security``'s 'Overall exposure level for X: 1.4 OK' line."""
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", text)
    if m is None:
        raise AssertionError(f"no exposure level in:\n{text[-2000:]}")
    return float(m.group(1))
