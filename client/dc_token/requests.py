"""``BrokerAuth`` for requests: bearer tokens from dc-broker on a ``requests.Session`` (``pip install
'dc-broker[requests]'``; requests is optional, and only this module imports it).

    session = requests.Session()
    session.auth = BrokerAuth("acme")
    session.get("https://dc.example.com/dp/api/v1/aiconnections/types")

The same rules as ``dc_token.httpx.BrokerAuth``:

- every request leaves with a token that has at least ``min_ttl`` seconds left (default 30), from
  the in-process cache of a ``TokenClient`` (one socket round trip when the broker has refreshed);
- on a 401 the rejected token is reported (``invalidate``), a fresh one taken and the request sent
  again **once**, on the same connection pool: if the retry is answered 401 too, that response is
  returned; never a loop. The broker forces a refresh for a rejected token at most once per 10
  seconds per profile (``invalidate_interval``), so a second 401 within 10 s gets the same token
  back, and then the 401 is returned without a retry;
- a body that cannot be sent twice (a generator, a non-seekable stream) is not retried: the 401 is
  returned. Bytes, text, form data and seekable files are rewound and sent again;
- other statuses (403 included: a valid token without permission) pass through untouched.
"""

from __future__ import annotations

from typing import Any, Final

import requests
from requests.auth import AuthBase

from dc_token.sync import TokenClient

__all__ = ["RETRY_MIN_TTL", "BrokerAuth"]

#: min_ttl for the token taken after a 401 (any fresh token will do; it was issued a moment ago)
RETRY_MIN_TTL: Final = 1.0
_RETRIED: Final = "_dc_token_retried"
_BODY_POS: Final = "_dc_token_body_pos"


class BrokerAuth(AuthBase):
    """Sets ``Authorization: Bearer <token>`` from the broker's ``profile``; on 401 invalidates and
    retries once. ``client``: the ``TokenClient`` to use (default: one on ``socket_path``, cached)."""

    def __init__(
        self,
        profile: str,
        *,
        min_ttl: float = 30.0,
        scope: str | None = None,
        socket_path: str | None = None,
        client: TokenClient | None = None,
    ) -> None:
        self.profile = profile
        self.min_ttl = min_ttl
        self.scope = scope
        self.client = client or TokenClient(socket_path)

    def __repr__(self) -> str:
        return f"BrokerAuth({self.profile!r})"

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        token = self.client.token(self.profile, min_ttl=self.min_ttl, scope=self.scope)
        request.headers["Authorization"] = f"Bearer {token}"
        body: Any = request.body
        if hasattr(body, "seek") and hasattr(body, "tell"):
            try:
                setattr(request, _BODY_POS, body.tell())
            except OSError:
                setattr(request, _BODY_POS, None)  # not seekable after all: no retry
        request.register_hook("response", self._on_response)  # type: ignore[no-untyped-call]
        return request

    def _on_response(self, response: requests.Response, **kwargs: Any) -> requests.Response:
        request = response.request
        if response.status_code != 401 or getattr(request, _RETRIED, False):
            return response
        sent = request.headers.get("Authorization", "")
        token = sent.removeprefix("Bearer ")
        self.client.invalidate(self.profile, token)
        fresh = self.client.token(self.profile, min_ttl=RETRY_MIN_TTL, scope=self.scope)
        if fresh == token or not _rewind(request):
            return response  # nothing newer (the 10-second rule), or a body we cannot send again
        response.content  # noqa: B018 - read the 401 to the end, so its connection can be reused
        response.close()
        retry = request.copy()
        retry.headers["Authorization"] = f"Bearer {fresh}"
        setattr(retry, _RETRIED, True)
        connection = getattr(response, "connection", None)
        if connection is None:  # not sent through a requests adapter: hand back what we have
            return response
        again: requests.Response = connection.send(retry, **kwargs)
        again.history.append(response)
        again.request = retry
        return again


def _rewind(request: requests.PreparedRequest) -> bool:
    """Whether the body can go out again (rewinding a file body to where it started)."""
    body: Any = request.body  # typed bytes | str, but a file or a generator at run time too
    if body is None or isinstance(body, bytes | str):
        return True
    if hasattr(request, _BODY_POS):
        pos = getattr(request, _BODY_POS)
        if pos is None:
            return False
        body.seek(pos)
        return True
    return False  # a generator or stream: sent once, gone
