"""The product as a user installs it: sdist and wheel built from a clean copy of the tree, the wheel in
a fresh venv outside the checkout, every command run from a directory that is not the checkout.

One build and one venv per module (marker ``install``; ``make install-test`` runs these alone):

* the wheel holds every subpackage and data file, and nothing at a generic top-level name;
* without the ``dev`` extra: no hypercorn/starlette, ``dc-broker dev`` names the command that
  installs them, and a real ``init`` / ``add`` / ``run`` / ``dc-token`` works against the dev IdP;
* with ``[dev]``: ``dc-broker dev`` + ``dc-token demo`` + the demo API accepts the token;
* ``pipx install`` of the wheel gives working commands.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import stop, wait_for_socket

pytestmark = pytest.mark.install

ROOT = Path(__file__).resolve().parent.parent
DEV_ONLY = {"hypercorn", "starlette"}


def _clean_copy(dest: Path) -> Path:
    """The tracked and not-ignored files of the checkout (what a fresh clone with these edits holds)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for raw in filter(None, listed):
        rel = raw.decode()
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def _env(home: Path, **extra: str) -> dict[str, str]:
    """A user's environment: nothing of this checkout's venv, its own XDG dirs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DC_BROKER_", "VIRTUAL_ENV", "PYTHON"))}
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_DATA_HOME=str(home / ".local" / "share"),
        XDG_RUNTIME_DIR=str(home / "run"),
        PATH=os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(str(ROOT))),
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        **extra,
    )
    (home / "run").mkdir(mode=0o700, parents=True, exist_ok=True)
    return env


def _run(cmd: list[str], env: dict[str, str], cwd: Path, stdin: str = "", timeout: float = 300) -> str:
    done = subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


class Dist:
    def __init__(self, wheel: Path, sdist: Path, version: str) -> None:
        self.wheel, self.sdist, self.version = wheel, sdist, version


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    tree = _clean_copy(tmp_path_factory.mktemp("tree"))
    out = tmp_path_factory.mktemp("dist")
    # sdist first, then the wheel from the sdist: `python -m build`'s default proves the sdist is whole
    subprocess.run(
        [sys.executable, "-m", "build", "--installer", "pip", "--outdir", str(out), str(tree)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    version = wheel.name.split("-")[1]
    return Dist(wheel, sdist, version)


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory, dist: Dist) -> Iterator[tuple[Path, dict[str, str]]]:
    """A fresh venv (outside the checkout) with the wheel and no extras, and a home to run it in."""
    base = tmp_path_factory.mktemp("user")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    home = base / "home"
    home.mkdir()
    env = _env(home)
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(dist.wheel)], env, home)
    yield venv, env


def test_wheel_holds_every_package_and_no_generic_top_level_name(dist: Dist) -> None:
    wheel = zipfile.ZipFile(dist.wheel)
    names = wheel.namelist()
    top = {n.split("/")[0] for n in names}
    data = f"dc_broker-{dist.version}.data"
    assert top == {"dc_broker", "dc_token", f"dc_broker-{dist.version}.dist-info", data}, top
    # dc-token is its launcher script (installed as is, executable), not an entry point
    assert [n for n in names if n.startswith(data)] == [f"{data}/scripts/dc-token"]
    assert wheel.getinfo(f"{data}/scripts/dc-token").external_attr >> 16 & 0o111
    assert "dc-token" not in wheel.read(f"dc_broker-{dist.version}.dist-info/entry_points.txt").decode()
    for required in (
        "dc_broker/vault/core.py",
        "dc_broker/devidp/grants.py",
        "dc_broker/py.typed",
        "dc_token/py.typed",
        "dc_token/cli.py",
        "dc_token/quick.py",  # the launcher runs it
    ):
        assert required in names, required
    # every package in the source tree is in the wheel
    for init in (ROOT / "broker").rglob("__init__.py"):
        assert str(init.relative_to(ROOT / "broker")) in names
    with tarfile.open(dist.sdist) as sdist:
        members = {m.name.split("/", 1)[1] for m in sdist.getmembers() if "/" in m.name}
    for required in ("pyproject.toml", "README.md", "broker/dc_broker/vault/core.py", "systemd/user/dc-broker.service"):
        assert required in members, required


def test_no_dev_extra_means_no_dev_packages(user: tuple[Path, dict[str, str]]) -> None:
    venv, env = user
    listed = json.loads(_run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"], env, venv))
    installed = {p["name"].lower() for p in listed}
    assert not installed & DEV_ONLY, installed & DEV_ONLY
    assert {"trio", "httpx", "msgpack", "cryptography", "click", "anyio"} <= installed
    site = next((venv / "lib").glob("python3*/site-packages"))
    assert not (site / "broker").exists() and not (site / "client").exists()
    assert (site / "dc_broker").is_dir() and (site / "dc_token").is_dir()


def test_versions_come_from_the_metadata(user: tuple[Path, dict[str, str]], dist: Dist) -> None:
    venv, env = user
    home = Path(env["HOME"])
    assert _run([str(venv / "bin" / "dc-broker"), "--version"], env, home).strip() == f"dc-broker {dist.version}"
    assert _run([str(venv / "bin" / "dc-token"), "--version"], env, home).strip() == f"dc-token {dist.version}"
    assert "Usage" in _run([str(venv / "bin" / "dc-broker"), "--help"], env, home)


def test_dc_token_starts_python_without_site_on_its_own_packages(user: tuple[Path, dict[str, str]], dist: Dist) -> None:
    venv, env = user
    home = Path(env["HOME"])
    traced = subprocess.run(
        ["sh", "-x", str(venv / "bin" / "dc-token"), "--version"], capture_output=True, text=True, env=env, cwd=home
    )
    assert traced.stdout.strip() == f"dc-token {dist.version}", traced.stderr
    [exec_line] = [line for line in traced.stderr.splitlines() if line.startswith("+ exec ")]
    site = next((venv / "lib").glob("python3*/site-packages"))
    assert exec_line.split()[2:4] == [str(venv / "bin" / "python"), "-S"], exec_line
    assert str(site.relative_to(venv)) in exec_line
    # linked alone from elsewhere (README: /usr/local/bin/dc-token -> /opt/dc-broker/bin/dc-token)
    elsewhere = home / "bin"
    elsewhere.mkdir(exist_ok=True)
    (elsewhere / "dc-token").unlink(missing_ok=True)
    (elsewhere / "dc-token").symlink_to(venv / "bin" / "dc-token")
    assert _run([str(elsewhere / "dc-token"), "--version"], env, home).strip() == f"dc-token {dist.version}"


def test_dev_without_the_extra_names_the_install_command(user: tuple[Path, dict[str, str]]) -> None:
    venv, env = user
    done = subprocess.run(
        [str(venv / "bin" / "dc-broker"), "dev"], capture_output=True, text=True, env=env, cwd=env["HOME"], timeout=60
    )
    assert done.returncode == 2  # a usage problem of this install, not a failure of dc-broker
    assert done.stderr == (
        "Error: `dc-broker dev` runs the dev IdP, which needs hypercorn, starlette: not installed with this "
        f"dc-broker. Add them with `{venv}/bin/python -m pip install hypercorn starlette` (what "
        "`pip install 'dc-broker[dev]'` adds)\n"
    )


def _api_status(url: str, token: str) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return int(resp.status)


def test_init_add_run_token_from_the_wheel(user: tuple[Path, dict[str, str]], idp: str) -> None:
    venv, env = user
    home = Path(env["HOME"])
    bin_ = venv / "bin"
    out = _run([str(bin_ / "dc-broker"), "init", "--key-source", "keyfile"], env, home)
    assert "Created the vault" in out
    add = [str(bin_ / "dc-broker"), "add", "acme", "--server", idp, "--tenant", "demo", "--client-id", "dc-cli"]
    add += ["--username", "demo", "--password-stdin", "--secret-stdin"]
    out = _run(add, env, home, stdin="demo\ndc-cli-secret\n")
    assert "Added profile acme" in out and "dc-broker run" in out
    broker = subprocess.Popen(
        [str(bin_ / "dc-broker"), "run"], env=env, cwd=home, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for_socket(str(home / "run" / "dc-broker" / "broker.sock"), broker)
        token = _run([str(bin_ / "dc-token"), "acme"], env, home).strip()
        assert token.count(".") == 2
        assert _api_status(f"{idp}/dp/api/v1/aiconnections/types", token) == 200
    finally:
        assert stop(broker) == 0


def test_dev_extra_gives_the_demo(user: tuple[Path, dict[str, str]], dist: Dist, tmp_path: Path) -> None:
    venv, env = user
    home = Path(env["HOME"])
    bin_ = venv / "bin"
    _run([str(bin_ / "python"), "-m", "pip", "install", "-q", f"{dist.wheel}[dev]"], env, home)
    sock = str(tmp_path / "dev.sock")
    dev = subprocess.Popen(
        [str(bin_ / "dc-broker"), "dev", "--socket", sock],
        env={**env, "PYTHONUNBUFFERED": "1"},
        cwd=home,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_socket(sock, dev)
        assert dev.stdout is not None
        api = ""
        deadline = time.monotonic() + 20
        while not api and time.monotonic() < deadline:
            m = re.search(r"demo API:\s+(\S+)", dev.stdout.readline())
            api = m.group(1) if m else ""
        assert api
        token = _run([str(bin_ / "dc-token"), "demo"], {**env, "DC_BROKER_SOCKET": sock}, home).strip()
        assert _api_status(api, token) == 200
        # the modules really come from the venv, not from a checkout
        where = _run([str(bin_ / "python"), "-c", "import dc_broker, dc_token; print(dc_broker.__file__)"], env, home)
        assert where.startswith(str(venv)), where
    finally:
        stop(dev)


def test_pipx_install(dist: Dist, tmp_path: Path) -> None:
    pipx = shutil.which("pipx", path=str(Path(sys.executable).parent))
    if pipx is None:
        pytest.skip("pipx is not installed in this venv (it is in the test extra)")
    home = tmp_path / "home"
    home.mkdir()
    env = _env(home, PIPX_HOME=str(tmp_path / "pipx"), PIPX_BIN_DIR=str(tmp_path / "bin"))
    _run([pipx, "install", str(dist.wheel)], env, home)
    out = _run([str(tmp_path / "bin" / "dc-token"), "--version"], env, home)
    assert out.strip() == f"dc-token {dist.version}"
    assert "Usage" in _run([str(tmp_path / "bin" / "dc-broker"), "--help"], env, home)
