"""dc-broker's thin client side: the wire protocol, the error tree, the clients and dc-token.

    from dc_token import TokenClient                  # blocking, thread-safe, cached
    from dc_token import AsyncTokenClient             # trio or asyncio (anyio)
    from dc_token.httpx import BrokerAuth             # httpx.Auth, sync and async

Importing this package stays light: no trio, httpx, anyio or click. Every public name is re-exported
lazily, so ``import dc_token.cli`` pays only for what dc-token uses. The errors are the names of
``dc_token.errors`` (``from dc_token import LoginRequired`` works).
"""

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy treats the name the same)
if TYPE_CHECKING:
    from dc_token.aio import AsyncTokenClient
    from dc_token.cache import Token
    from dc_token.errors import *  # noqa: F403
    from dc_token.sync import TokenClient

__all__ = ["AsyncTokenClient", "Token", "TokenClient"]

_LAZY = {"TokenClient": "dc_token.sync", "Token": "dc_token.cache", "AsyncTokenClient": "dc_token.aio"}


def __getattr__(name: str) -> object:
    import sys

    where = _LAZY.get(name, "dc_token.errors")
    __import__(where)  # importlib.import_module would import importlib (and warnings) first
    module = sys.modules[where]
    try:
        return getattr(module, name)
    except AttributeError:
        raise AttributeError(f"module 'dc_token' has no attribute {name!r}") from None
