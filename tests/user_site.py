"""The project as another user can run it: a world-readable copy of ``dc_broker``, ``dc_token`` and
the runtime dependencies' files (the ``dc-broker`` distribution's requirements, no extras), for
``/usr/bin/python3`` under ``setpriv``.

Test users cannot read the project's venv (its interpreter and site-packages may sit below root's
0700 home), and tests/test_shared.py's callers stay stdlib-only for that reason. A test that must
run ``dc-broker add`` or ``dc-token exec`` itself as another user uses this copy instead (about
30 MB, made once per test module)."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import sysconfig
import tempfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = "/usr/bin/python3"


def _runtime_files() -> list[Path]:
    """Every file of the distributions ``dc-broker`` needs at run time (its requirements, recursively,
    without extras), as installed in this interpreter's site-packages."""
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    seen: set[str] = set()
    todo, found = ["dc-broker"], []
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # a backport this interpreter does not need (exceptiongroup)
        for requirement in dist.requires or []:
            if "extra ==" not in requirement:
                todo.append(re.split(r"[ ;<>=!\[~(]", requirement, maxsplit=1)[0])
        if key == "dc-broker":
            continue  # an editable install: its sources are copied from the tree
        for file in dist.files or []:
            path = Path(str(file.locate())).resolve()
            if path.is_file() and path.is_relative_to(site) and "__pycache__" not in path.parts:
                found.append(path.relative_to(site))
    return found


def make_user_site() -> str:
    """A new world-readable directory holding the copy; the caller removes it (``shutil.rmtree``)."""
    target = Path(tempfile.mkdtemp(prefix="dcb-site-", dir="/tmp"))
    site = Path(sysconfig.get_paths()["purelib"])
    for rel in _runtime_files():
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(site / rel, dest)
    for package in (ROOT / "broker" / "dc_broker", ROOT / "client" / "dc_token"):
        shutil.copytree(package, target / package.name, ignore=shutil.ignore_patterns("__pycache__"))
    for folder, _dirs, files in os.walk(target):
        os.chmod(folder, 0o755)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o644)
    return str(target)


def as_user(user: str, site: str, program: str, *args: str) -> list[str]:
    """The argv that runs ``program`` (``dc-broker`` or ``dc-token``) from ``site`` as ``user``
    (with its groups), through setpriv."""
    main = {"dc-broker": "dc_broker.cli", "dc-token": "dc_token.quick"}[program]  # as the launcher runs it
    code = f"import sys; sys.path.insert(0, {site!r}); sys.argv[0] = {program!r}; from {main} import main; sys.exit(main())"
    return ["setpriv", "--reuid", user, "--regid", user, "--init-groups", PYTHON, "-c", code, *args]


def user_env(extra: dict[str, str] | None = None, keep: Sequence[str] = ("PATH", "LANG")) -> dict[str, str]:
    """A small environment for a test user's process (nothing of root's but ``keep``)."""
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return {**env, **(extra or {})}
