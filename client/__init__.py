"""dc-broker's thin client side: the wire protocol, the error tree, the clients and dc-token.

    from client import TokenClient                  # blocking, thread-safe, cached
    from client import AsyncTokenClient             # trio or asyncio (anyio)
    from client.httpx import BrokerAuth             # httpx.Auth, sync and async

Importing this package stays light: no trio, httpx, anyio or click. Every public name is re-exported
lazily, so ``import client.cli`` pays only for what dc-token uses. The errors are the names of
``client.errors`` (``from client import LoginRequired`` works).
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy treats the name the same)
if TYPE_CHECKING:
    from client.aio import AsyncTokenClient
    from client.errors import *  # noqa: F403
    from client.sync import Token, TokenClient

__all__ = ["AsyncTokenClient", "Token", "TokenClient"]

_LAZY = {"TokenClient": "client.sync", "Token": "client.sync", "AsyncTokenClient": "client.aio"}


def __getattr__(name: str) -> object:
    from importlib import import_module

    module = import_module(_LAZY.get(name, "client.errors"))
    try:
        return getattr(module, name)
    except AttributeError:
        raise AttributeError(f"module 'client' has no attribute {name!r}") from None
