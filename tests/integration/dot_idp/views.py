"""The protected resource: DOT checks the bearer token (401 + WWW-Authenticate: Bearer without one)."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, JsonResponse
from oauth2_provider.views import ProtectedResourceMetadataView


class Hello(ProtectedResourceMetadataView):
    resource_metadata_url = "http://127.0.0.1/.well-known/oauth-protected-resource"

    def get(self, request: HttpRequest, *args: Any, **kwargs: Any) -> JsonResponse:
        owner = getattr(request, "resource_owner", None)
        return JsonResponse({"hello": owner.get_username() if owner is not None else None})
