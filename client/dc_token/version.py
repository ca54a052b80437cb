"""The one version string: the installed distribution's metadata (pyproject.toml is its only source).

Read on demand, not at import: ``importlib.metadata`` (with zipfile and csv) costs dc-token a few
milliseconds of start-up and the daemon as much, so only ``--version``, ``hello`` and ``status`` pay
for it, once per process.
"""

from __future__ import annotations

DISTRIBUTION = "dc-broker"
_read: list[str] = []  # the version once read (a process reads the metadata at most once)


def version() -> str:
    """dc-broker's version, e.g. ``0.2.0``; ``0+unknown`` when run from files that were never installed."""
    if not _read:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as _version

        try:
            _read.append(_version(DISTRIBUTION))
        except PackageNotFoundError:
            _read.append("0+unknown")
    return _read[0]
