"""Fault injection for tests: what the network and a sick IdP can do to the token endpoint.

Faults apply to the token endpoint only, or to every endpoint with ``all_endpoints = True``. For
each request, in this order:

1. ``latency`` seconds of ``trio.sleep`` (so it runs instantly under trio's autojump clock);
2. ``hang``: the request never answers until ``hang`` is set False / ``clear()`` or it is cancelled;
3. ``fail_next(count, status=503, retry_after=...)``: the next ``count`` requests get that status;
4. ``malformed(kind, count)``: the next ``count`` requests get a broken body, by kind:
   ``html`` (an nginx-style HTML error page), ``truncated`` (JSON cut mid-way), ``no_access_token``
   (JSON without ``access_token``), ``empty`` (empty body); all status 200 unless ``status=`` (e.g. 502).

Standing modes (they stay until ``clear()``), for how other OAuth servers answer:

* ``refusal_body``: how a 400/401/403 OAuth error is rendered: ``json`` (Keycloak's
  ``{"error", "error_description"}``, the default), ``empty`` (glewlwyd) or ``html`` (a proxy's page);
* ``echo_description``: an OAuth error's ``error_description`` echoes the request body (password
  included), with control characters and 70 KB of padding, as a careless server might;
* ``expires_in``: the raw JSON text sent as ``expires_in`` in every token response (``"NaN"``,
  ``"1e999"``, ``"1e18"``, ``"0"``, ``"-5"``), or ``"absent"`` to leave it out;
* ``drip``: token responses are sent one byte every ``drip`` seconds (a server that never times out);
* ``late``: token responses are finished ``late`` seconds after the IdP did the work (a rotation
  included): the head at once, the body then (an answer slowed on its way back, a proxy buffering).

"Connection refused" is not a fault here: stop the server (cancel ``serve()``) instead.

Requests are counted in ``DevIdP.stats`` before faults apply, so a failed attempt still counts.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final, Literal

import trio
from starlette.responses import Response, StreamingResponse

MalformedKind = Literal["html", "truncated", "no_access_token", "empty"]
MALFORMED_KINDS: Final = ("html", "truncated", "no_access_token", "empty")
RefusalBody = Literal["json", "empty", "html"]
REFUSAL_BODIES: Final = ("json", "empty", "html")
#: how much an echoing error_description pads itself with
ECHO_PADDING: Final = 70_000

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
        self.refusal_body: RefusalBody = "json"
        self.echo_description = False
        self.expires_in: str | None = None
        self.drip: float = 0.0
        self.late: float = 0.0

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
        self.refusal_body = "json"
        self.echo_description = False
        self.expires_in = None
        self.drip = 0.0
        self.late = 0.0
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


def refusal_response(status: int, body: dict[str, str], request_body: bytes, faults: Faults) -> Response:
    """An OAuth error as the standing modes say it is rendered."""
    if faults.echo_description:
        echoed = request_body.decode("utf-8", "replace")
        body = {**body, "error_description": f"{body.get('error_description', '')}\x00\x1b[31m for {echoed} "}
        body["error_description"] += "x" * ECHO_PADDING
    headers = {"Cache-Control": "no-store", "Pragma": "no-cache"}
    if status in (400, 401, 403) and faults.refusal_body == "empty":
        return Response(b"", status, headers, media_type="application/json")
    if status in (400, 401, 403) and faults.refusal_body == "html":
        reason = _reason(status)
        page = f"<html><head><title>{status} {reason}</title></head><body><h1>{reason}</h1></body></html>"
        return Response(page, status, headers, media_type="text/html")
    return Response(json.dumps(body), status, headers, media_type="application/json")


def token_response(data: dict[str, object], faults: Faults) -> Response:
    """A successful token response, with the ``expires_in``, ``drip`` and ``late`` modes applied."""
    raw = faults.expires_in
    if raw is None:
        text = json.dumps(data)
    else:
        rest = json.dumps({k: v for k, v in data.items() if k != "expires_in"})
        text = rest if raw == "absent" else rest[:-1] + f', "expires_in": {raw}}}'
    headers = {"Cache-Control": "no-store", "Pragma": "no-cache"}
    if faults.drip > 0:
        return StreamingResponse(_dripped(text.encode(), faults.drip), 200, headers, media_type="application/json")
    if faults.late > 0:
        return StreamingResponse(_late(text.encode(), faults.late), 200, headers, media_type="application/json")
    return Response(text, 200, headers, media_type="application/json")


async def _late(body: bytes, after: float) -> AsyncIterator[bytes]:
    await trio.sleep(after)
    yield body


async def _dripped(body: bytes, every: float) -> AsyncIterator[bytes]:
    for i in range(len(body)):
        yield body[i : i + 1]
        await trio.sleep(every)
