"""Fault injection for tests: what the network and a sick IdP can do to the token endpoint.

Faults apply to the token endpoint only, or to every endpoint with ``all_endpoints = True``. For
each request, in this order:

1. ``latency`` seconds of ``trio.sleep`` (so it runs instantly under trio's autojump clock);
2. ``hang``: the request never answers until ``hang`` is set False / ``clear()`` or it is cancelled;
3. ``fail_next(count, status=503, retry_after=...)``: the next ``count`` requests get that status;
4. ``malformed(kind, count)``: the next ``count`` requests get a broken body, by kind:
   ``html`` (an nginx-style HTML error page), ``truncated`` (JSON cut mid-way), ``no_access_token``
   (JSON without ``access_token``), ``empty`` (empty body); all status 200 unless ``status=`` (e.g. 502).

"Connection refused" is not a fault here: stop the server (cancel ``serve()``) instead.

Requests are counted in ``DevIdP.stats`` before faults apply, so a failed attempt still counts.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final, Literal

import trio
from starlette.responses import Response

MalformedKind = Literal["html", "truncated", "no_access_token", "empty"]
MALFORMED_KINDS: Final = ("html", "truncated", "no_access_token", "empty")

_HTML_PAGE: Final = (
    "<html><head><title>502 Bad Gateway</title></head>"
    "<body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>\n"
)
_TOKENISH: Final = json.dumps(
    {
        "access_token": "eyJhbGciOiJSUzI1NiIsInR5cCIgOiAiSldUIn0.eyJleHAiOjE3MDAwMDAwMDB9.c2ln",
        "expires_in": 1800,
        "refresh_expires_in": 1800,
        "refresh_token": "truncated-refresh-token",
        "token_type": "Bearer",
    }
)


@dataclass(frozen=True)
class _Failure:
    status: int
    retry_after: float | None
    body: str
    content_type: str


@dataclass(frozen=True)
class _Malformed:
    kind: MalformedKind
    status: int


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class Faults:
    """Mutable fault settings; see the module docstring for the order they apply in."""

    def __init__(self) -> None:
        self.latency: float = 0.0
        self.all_endpoints: bool = False
        self._failures: deque[_Failure] = deque()
        self._malformed: deque[_Malformed] = deque()
        self._release: trio.Event | None = None

    # -- hang ---------------------------------------------------------------------------------
    @property
    def hang(self) -> bool:
        return self._release is not None

    @hang.setter
    def hang(self, value: bool) -> None:
        if value and self._release is None:
            self._release = trio.Event()
        elif not value and self._release is not None:
            self._release.set()
            self._release = None

    # -- queued faults --------------------------------------------------------------------------
    def fail_next(
        self,
        count: int = 1,
        *,
        status: int = 503,
        retry_after: float | None = None,
        body: str | None = None,
        content_type: str = "text/plain",
    ) -> None:
        """The next ``count`` requests answer ``status`` (with ``Retry-After`` if given)."""
        failure = _Failure(status, retry_after, _reason(status) if body is None else body, content_type)
        self._failures.extend([failure] * count)

    def malformed(self, kind: MalformedKind, count: int = 1, *, status: int = 200) -> None:
        """The next ``count`` requests answer a broken body of ``kind``."""
        if kind not in MALFORMED_KINDS:
            raise ValueError(f"unknown malformed kind {kind!r}; one of {MALFORMED_KINDS}")
        self._malformed.extend([_Malformed(kind, status)] * count)

    def clear(self) -> None:
        """No faults at all; releases hung requests."""
        self.latency = 0.0
        self.all_endpoints = False
        self.hang = False
        self._failures.clear()
        self._malformed.clear()

    @property
    def pending(self) -> int:
        """Queued one-shot faults not yet delivered."""
        return len(self._failures) + len(self._malformed)

    # -- applying ------------------------------------------------------------------------------
    async def apply(self, *, token_endpoint: bool) -> Response | None:
        """Run the faults for one request: a Response to send instead of the real one, or None."""
        if not token_endpoint and not self.all_endpoints:
            return None
        if self.latency > 0:
            await trio.sleep(self.latency)
        while self._release is not None:
            await self._release.wait()
        if self._failures:
            failure = self._failures.popleft()
            headers = {} if failure.retry_after is None else {"Retry-After": _retry_after(failure.retry_after)}
            return Response(failure.body, failure.status, headers, media_type=failure.content_type)
        if self._malformed:
            return _malformed_response(self._malformed.popleft())
        return None


def _retry_after(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else str(seconds)


def _malformed_response(fault: _Malformed) -> Response:
    bodies: dict[MalformedKind, tuple[str, str]] = {
        "html": (_HTML_PAGE, "text/html"),
        "truncated": (_TOKENISH[: len(_TOKENISH) // 2], "application/json"),
        "no_access_token": (json.dumps({"token_type": "Bearer", "expires_in": 1800}), "application/json"),
        "empty": ("", "application/json"),
    }
    body, media_type = bodies[fault.kind]
    return Response(body, fault.status, {"Cache-Control": "no-store"}, media_type=media_type)
