"""Keycloak's legacy layout (``/auth/realms/<tenant>/protocol/openid-connect/...``) onto DOT's views.

Only the one tenant exists; any other realm path is Django's plain 404, as an unknown realm is a 404 in Keycloak.
"""

from __future__ import annotations

from django.urls import path
from oauth2_provider.views import RevokeTokenView, TokenView

from tests.integration.dot_idp import HELLO_PATH, revoke_path, token_path
from tests.integration.dot_idp.views import Hello

urlpatterns = [
    path(token_path().lstrip("/"), TokenView.as_view(), name="token"),
    path(revoke_path().lstrip("/"), RevokeTokenView.as_view(), name="revoke"),
    path(HELLO_PATH.lstrip("/"), Hello.as_view(), name="hello"),
]
