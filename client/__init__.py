"""dc-broker's thin client side: the wire protocol, the error tree, a blocking client and dc-token.

Importing this package stays light: no trio, httpx or click. ``TokenClient`` and the errors are
re-exported lazily so that ``import client.cli`` pays only for what dc-token uses.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # importing typing costs dc-token ~2 ms of start-up; annotations only
    from typing import Any

    from client.errors import *  # noqa: F403
    from client.sync import TokenClient

__all__ = ["TokenClient"]


def __getattr__(name: str) -> Any:
    if name == "TokenClient":
        from client.sync import TokenClient

        return TokenClient
    from client import errors

    try:
        return getattr(errors, name)
    except AttributeError:
        raise AttributeError(f"module 'client' has no attribute {name!r}") from None
