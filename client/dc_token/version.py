"""The one version string: the installed distribution's metadata (pyproject.toml is its only source).

Read on demand, not at import: ``importlib.metadata`` costs dc-token a few milliseconds of start-up,
so only ``--version``, ``hello`` and ``status`` pay for it.
"""

from __future__ import annotations

DISTRIBUTION = "dc-broker"


def version() -> str:
    """dc-broker's version, e.g. ``0.2.0``; ``0+unknown`` when run from files that were never installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _version

    try:
        return _version(DISTRIBUTION)
    except PackageNotFoundError:
        return "0+unknown"
