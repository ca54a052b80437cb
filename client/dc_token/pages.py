"""Status pages: the broker answers ``status`` a frame at a time (``broker.next`` is the cursor, sent
back as ``after``); these put the pages back together. Pure: results in, one result out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def merge_status(pages: Sequence[dict[str, Any]], limit: int | None = None) -> dict[str, Any]:
    """One status result from its pages: the first page's ``broker`` (its counts cover every profile)
    with every page's profiles, at most ``limit`` of them; ``truncated`` counts the rest and
    ``next`` is where to go on from (None when nothing was left out)."""
    profiles = [p for page in pages for p in page["profiles"]]
    if limit is not None:
        profiles = profiles[:limit]
    broker = dict(pages[0]["broker"])
    total = int(broker.get("profiles", len(profiles)))
    broker["truncated"] = max(0, total - len(profiles))
    broker["next"] = profiles[-1]["profile"] if broker["truncated"] and profiles else None
    return {"broker": broker, "profiles": profiles}


def collect_status(ask: Callable[..., dict[str, Any]], limit: int | None = None) -> dict[str, Any]:
    """Follow the cursor with ``ask(after=...)`` until every profile (at most ``limit``) is in."""
    pages = [ask()]
    while pages[-1]["broker"].get("next") and (limit is None or sum(len(p["profiles"]) for p in pages) < limit):
        pages.append(ask(after=pages[-1]["broker"]["next"]))
    return merge_status(pages, limit)
