"""The HTTP face of the dev IdP: a Starlette app with Keycloak's OIDC routes and the demo API.

Every realm route exists under both prefixes, ``/auth/realms/{realm}/...`` (Keycloak <= 16, RH-SSO)
and ``/realms/{realm}/...`` (Quarkus); the issuer follows the prefix and Host header actually used.
This module only translates: form bodies in (``urllib.parse.parse_qsl``, no python-multipart),
``grants`` does the logic, ``OAuthProblem`` becomes a JSON error response in ``_problem``.
Faults (``state.faults``) run before any handler; the token endpoint counts requests first.

The demo API accepts an access token from any realm of this IdP that is signed by its key, not
expired by ``state.clock``, not revoked, whose session is alive, and that carries the realm role
``state.api_role``: 401 otherwise (``WWW-Authenticate: Bearer error="invalid_token"`` when a token was
sent), 403 without the role.

Routes (``{base}`` = ``[/auth]/realms/{realm}``):

    GET  {base}/.well-known/openid-configuration      GET  {base}/protocol/openid-connect/certs
    POST {base}/protocol/openid-connect/token         POST {base}/protocol/openid-connect/token/introspect
    POST {base}/protocol/openid-connect/auth/device   GET/POST {base}/device  (verification page)
    POST {base}/protocol/openid-connect/logout        POST {base}/protocol/openid-connect/revoke
    GET/POST {base}/protocol/openid-connect/auth       (authorization code + PKCE: the login page)
    GET  {base}                                        GET  /dp/api/v1/aiconnections/types  (demo API)
    GET  /_dev/stats                                   (counters for tests: token requests by grant, reuse)
    POST /_dev/logout-all                              (an administrator's "log out all sessions", for tests)
    POST /_dev/realms/{realm}/clients                  (dev admin: create or change a client: its
                                                        authenticator, JWKS, subject DN, federated subject,
                                                        and the settings that refuse: grants, DPoP, offline)
    POST /_dev/realms/{realm}/trusted-issuers          (dev admin: an issuer federated clients may use)
"""

from __future__ import annotations

import html
from collections.abc import Awaitable, Callable
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from dc_broker.devidp import authcode, clientauth, grants
from dc_broker.devidp.clientauth import PEER_CERTIFICATE
from dc_broker.devidp.faults import Faults, refusal_response, token_response
from dc_broker.devidp.grants import OAuthProblem, TokenRequest
from dc_broker.devidp.realm import DevClient, DevRealm
from dc_broker.devidp.state import IdPState

NO_STORE: Final = {"Cache-Control": "no-store", "Pragma": "no-cache"}
#: the browser's SSO session (Keycloak's KEYCLOAK_SESSION): the login page is skipped while it lives
SSO_COOKIE: Final = "KEYCLOAK_SESSION"
_LOCAL: Final = frozenset({"127.0.0.1", "::1", "localhost"})
AUTH_METHODS_SUPPORTED: Final = [
    "client_secret_basic",
    "client_secret_post",
    "private_key_jwt",
    "client_secret_jwt",
    "tls_client_auth",
]
#: what the dev admin API may set on a client (POST /_dev/realms/{realm}/clients)
_CLIENT_FIELDS: Final = (
    "secret",
    "auth",
    "jwks",
    "subject_dn",
    "federated_issuer",
    "federated_subject",
    "service_account_roles",
    "direct_grants",
    "device_grant",
    "service_account_enabled",
    "offline_allowed",
    "dpop",
)
OIDC: Final = "protocol/openid-connect"
CONNECTION_TYPES: Final = [
    {"id": "openai", "name": "OpenAI", "auth": "api_key"},
    {"id": "azure-openai", "name": "Azure OpenAI", "auth": "api_key"},
    {"id": "anthropic", "name": "Anthropic", "auth": "api_key"},
    {"id": "ollama", "name": "Ollama", "auth": "none"},
]

Handler = Callable[[Request], Awaitable[Response]]


def _problem(problem: OAuthProblem, faults: Faults | None = None, request_body: bytes = b"") -> Response:
    if faults is not None:
        return refusal_response(problem.status, problem.body(), request_body, faults)
    return JSONResponse(problem.body(), problem.status, headers=NO_STORE)


def _no_realm() -> JSONResponse:
    return JSONResponse({"error": "Realm does not exist"}, 404)


def _check_realm(request: Request, realm: DevRealm) -> None:
    """Keycloak's checks before any grant: the realm is enabled; https where "Require SSL" wants it."""
    if not realm.enabled:
        raise OAuthProblem(403, "access_denied", "Realm not enabled")
    if request.url.scheme != "https":
        host = request.client.host if request.client else ""
        if realm.ssl_required == "all" or host not in _LOCAL:
            raise OAuthProblem(403, "invalid_request", "HTTPS required")


def issuer_for(request: Request, realm: str) -> str:
    prefix = "/auth" if request.url.path.startswith("/auth/") else ""
    host = request.headers.get("host") or request.url.netloc
    return f"{request.url.scheme}://{host}{prefix}/realms/{realm}"


async def _read_form(request: Request) -> tuple[dict[str, str], bool]:
    """The form fields (last one wins) and whether any field was sent twice."""
    pairs = parse_qsl((await request.body()).decode("utf-8", "replace"), keep_blank_values=True)
    form = dict(pairs)
    return form, len(form) != len(pairs)


class Endpoints:
    """Route handlers bound to one ``IdPState``."""

    def __init__(self, state: IdPState) -> None:
        self.state = state

    def routes(self) -> list[Route]:
        per_realm: list[tuple[str, Handler, list[str]]] = [
            ("", self.realm_info, ["GET"]),
            ("/.well-known/openid-configuration", self.discovery, ["GET"]),
            (f"/{OIDC}/certs", self.certs, ["GET"]),
            (f"/{OIDC}/token", self.token, ["POST"]),
            (f"/{OIDC}/token/introspect", self.form_endpoint("introspect", self._introspect), ["POST"]),
            (f"/{OIDC}/auth/device", self.form_endpoint("device", self._device_authorization), ["POST"]),
            (f"/{OIDC}/logout", self.form_endpoint("logout", self._logout), ["POST"]),
            (f"/{OIDC}/revoke", self.form_endpoint("revoke", self._revoke), ["POST"]),
            ("/device", self.verification_page, ["GET", "POST"]),
            (f"/{OIDC}/auth", self.authorization_page, ["GET", "POST"]),
        ]
        routes = [
            Route(f"{prefix}/realms/{{realm}}{path}", handler, methods=methods)
            for prefix in ("/auth", "")
            for path, handler, methods in per_realm
        ]
        routes.append(Route("/dp/api/v1/aiconnections/types", self.demo_api, methods=["GET"]))
        routes.append(Route("/_dev/stats", self.dev_stats, methods=["GET"]))
        routes.append(Route("/_dev/logout-all", self.dev_logout_all, methods=["POST"]))
        routes.append(Route("/_dev/realms/{realm}/clients", self.dev_client, methods=["POST"]))
        routes.append(Route("/_dev/realms/{realm}/trusted-issuers", self.dev_trusted_issuer, methods=["POST"]))
        return routes

    # -- shared plumbing -----------------------------------------------------------------------
    async def _guard(self, name: str) -> Response | None:
        self.state.stats.requests[name] += 1
        return await self.state.faults.apply(token_endpoint=False)

    def _realm(self, request: Request) -> DevRealm | None:
        return self.state.realms.get(request.path_params["realm"])

    async def _guarded_realm(self, name: str, request: Request) -> DevRealm | Response:
        """Count the request, apply any configured fault, find the realm: the realm, or the answer
        (the fault, or Keycloak's 404 for an unknown realm) to send instead."""
        faulted = await self._guard(name)
        if faulted is not None:
            return faulted
        realm = self._realm(request)
        return _no_realm() if realm is None else realm

    async def _token_request(self, request: Request, realm: DevRealm) -> TokenRequest:
        form, duplicated = await _read_form(request)
        _check_realm(request, realm)
        if duplicated:
            raise OAuthProblem(400, "invalid_request", "duplicated parameter")
        authorization = request.headers.get("authorization")
        return TokenRequest(
            realm,
            issuer_for(request, realm.name),
            form,
            authorization,
            PEER_CERTIFICATE.get(),
            dpop=request.headers.get("dpop"),
        )

    def form_endpoint(self, name: str, logic: Callable[[TokenRequest], Response]) -> Handler:
        """A client-authenticated, form-encoded POST endpoint: faults, realm, form, problem mapping."""

        async def endpoint(request: Request) -> Response:
            realm = await self._guarded_realm(name, request)
            if isinstance(realm, Response):
                return realm
            try:
                return logic(await self._token_request(request, realm))
            except OAuthProblem as problem:
                return _problem(problem)

        return endpoint

    # -- discovery -------------------------------------------------------------------------------
    async def realm_info(self, request: Request) -> Response:
        realm = await self._guarded_realm("realm", request)
        if isinstance(realm, Response):
            return realm
        iss = issuer_for(request, realm.name)
        return JSONResponse(
            {"realm": realm.name, "token-service": f"{iss}/{OIDC}", "account-service": f"{iss}/account"}
            | {"tokens-not-before": 0}
        )

    async def discovery(self, request: Request) -> Response:
        realm = await self._guarded_realm("discovery", request)
        if isinstance(realm, Response):
            return realm
        iss = issuer_for(request, realm.name)
        doc: dict[str, Any] = {
            "issuer": iss,
            "authorization_endpoint": f"{iss}/{OIDC}/auth",
            "token_endpoint": f"{iss}/{OIDC}/token",
            "introspection_endpoint": f"{iss}/{OIDC}/token/introspect",
            "end_session_endpoint": f"{iss}/{OIDC}/logout",
            "jwks_uri": f"{iss}/{OIDC}/certs",
            "device_authorization_endpoint": f"{iss}/{OIDC}/auth/device",
            "revocation_endpoint": f"{iss}/{OIDC}/revoke",
            "grant_types_supported": list(grants.GRANTS),
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "token_endpoint_auth_methods_supported": AUTH_METHODS_SUPPORTED,
            "revocation_endpoint_auth_methods_supported": AUTH_METHODS_SUPPORTED,
            "token_endpoint_auth_signing_alg_values_supported": ["RS256", "ES256", "HS256"],
            "scopes_supported": sorted(grants.OPTIONAL_SCOPES | set(grants.DEFAULT_SCOPES)),
        }
        return JSONResponse(doc)

    async def certs(self, request: Request) -> Response:
        realm = await self._guarded_realm("certs", request)
        if isinstance(realm, Response):
            return realm
        return JSONResponse(self.state.key.jwks())

    # -- token endpoint ----------------------------------------------------------------------------
    async def token(self, request: Request) -> Response:
        state = self.state
        state.stats.requests["token"] += 1
        form, duplicated = await _read_form(request)
        authorization = request.headers.get("authorization")
        realm_name = request.path_params["realm"]
        client_id = grants.claimed_client_id(form, authorization)
        state.stats.token_requests[(realm_name, client_id, form.get("grant_type", ""))] += 1
        faulted = await state.faults.apply(token_endpoint=True)
        if faulted is not None:
            return faulted
        realm = self._realm(request)
        if realm is None:
            return _no_realm()
        try:
            _check_realm(request, realm)
            if duplicated:
                raise OAuthProblem(400, "invalid_request", "duplicated parameter")
            treq = TokenRequest(
                realm,
                issuer_for(request, realm.name),
                form,
                authorization,
                PEER_CERTIFICATE.get(),
                dpop=request.headers.get("dpop"),
            )
            return token_response(grants.token(state, treq), state.faults)
        except OAuthProblem as problem:
            return _problem(problem, state.faults, await request.body())

    # -- other form endpoints ----------------------------------------------------------------------
    def _introspect(self, treq: TokenRequest) -> Response:
        return JSONResponse(grants.introspect(self.state, treq), headers=NO_STORE)

    def _device_authorization(self, treq: TokenRequest) -> Response:
        return JSONResponse(grants.start_device_authorization(self.state, treq), headers=NO_STORE)

    def _logout(self, treq: TokenRequest) -> Response:
        grants.logout(self.state, treq)
        return Response(status_code=204)

    def _revoke(self, treq: TokenRequest) -> Response:
        said = grants.revoke(self.state, treq)
        return Response(status_code=200) if said is None else JSONResponse(said, 200, headers=NO_STORE)

    # -- device verification page --------------------------------------------------------------------
    async def verification_page(self, request: Request) -> Response:
        realm = await self._guarded_realm("verification", request)
        if isinstance(realm, Response):
            return realm
        if request.method == "GET":
            return _page(realm.name, _form_html(request.query_params.get("user_code", "")))
        form, _ = await _read_form(request)
        user_code = form.get("user_code", "")
        auth = self.state.devices.by_user_code(user_code)
        if auth is None or auth.realm != realm.name or auth.expired(self.state.now()):
            return _page(realm.name, _form_html(user_code, "Invalid code, please try again."), 400)
        if form.get("action") == "deny":
            grants.deny_device(self.state, user_code)
            return _page(realm.name, "<p>Access denied. You can close this window.</p>")
        failure = grants.check_user_login(self.state, realm, form.get("username", ""), form.get("password", ""))
        if failure is not None:
            return _page(realm.name, _form_html(user_code, failure), 400)
        grants.approve_device(self.state, user_code, form.get("username", ""))
        return _page(realm.name, "<p>Device Login Successful. You can close this window.</p>")

    # -- authorization endpoint (code + PKCE): a login page that redirects back with a code ------------
    async def authorization_page(self, request: Request) -> Response:
        realm = await self._guarded_realm("authorization", request)
        if isinstance(realm, Response):
            return realm
        params = dict(request.query_params) if request.method == "GET" else (await _read_form(request))[0]
        client = realm.client(params.get("client_id", ""))
        redirect_uri = params.get("redirect_uri", "")
        if client is None or not authcode.loopback_redirect(redirect_uri):
            return _auth_page(realm.name, "<p class=error>Invalid parameter: client_id or redirect_uri</p>", 400)
        if (
            params.get("response_type") != "code"
            or params.get("code_challenge_method") != "S256"
            or not params.get("code_challenge")
        ):
            return _auth_page(realm.name, "<p class=error>Missing parameter: code_challenge (PKCE S256)</p>", 400)
        now = self.state.now()
        sso = self.state.sessions.session(request.cookies.get(SSO_COOKIE, ""))
        if sso is not None and (sso.realm != realm.name or not sso.active(realm, now)):
            sso = None
        if request.method == "GET" and sso is None:
            return _auth_page(realm.name, _login_form(params))
        if sso is None:  # the login form was sent
            username = params.get("username", "")
            failure = grants.check_user_login(self.state, realm, username, params.get("password", ""))
            if failure is not None:
                return _auth_page(realm.name, _login_form(params, failure), 400)
            user = realm.user(username)
            assert user is not None  # check_user_login found them
            sso = self.state.sessions.start(realm.name, user.username, client.client_id, now=now, offline=False)
            sso.clients.clear()  # the browser's session; a client attaches at its code exchange
        code = self.state.codes.issue(
            authcode.AuthCode(
                realm=realm.name,
                client_id=client.client_id,
                redirect_uri=redirect_uri,
                code_challenge=params["code_challenge"],
                scope=params.get("scope"),
                username=sso.username,
                issued_at=now,
                sid=sso.sid,
            )
        )
        query = urlencode({"code": code, "state": params.get("state", "")})
        response = RedirectResponse(f"{redirect_uri}{'&' if '?' in redirect_uri else '?'}{query}", status_code=302)
        # Keycloak's SSO cookie: the next authorization request of this browser skips the login form
        response.set_cookie(SSO_COOKIE, sso.sid, httponly=True, samesite="lax", path="/")
        return response

    # -- demo API ---------------------------------------------------------------------------------
    async def dev_stats(self, request: Request) -> Response:
        """The dev IdP's counters, for end-to-end tests that run it as a process: token requests by
        grant type, refresh-token reuse. Never a token or secret; no fault applies, nothing is counted."""
        by_grant: dict[str, int] = {}
        for (_, _, grant), count in self.state.stats.token_requests.items():
            by_grant[grant] = by_grant.get(grant, 0) + count
        return JSONResponse({"token_requests": by_grant, "refresh_reuse": self.state.stats.refresh_reuse})

    async def dev_logout_all(self, request: Request) -> Response:
        """An administrator's "log out all sessions" of every realm, for end-to-end tests: every refresh
        token dies ("Session not active"); the next login is a new one."""
        killed = sum(self.state.sessions.kill_matching(name) for name in self.state.realms)
        return JSONResponse({"killed": killed})

    async def dev_client(self, request: Request) -> Response:
        """The dev admin API (what Keycloak's admin console does to a client): create or change one,
        e.g. ``{"client_id": "svc", "auth": "client-jwt", "jwks": {...}}`` as a person pastes the
        JWKS in the Keys tab. For tests and the demo that run the dev IdP as a process."""
        realm = self._realm(request)
        if realm is None:
            return _no_realm()
        try:
            doc = await request.json()
            client_id = doc["client_id"]
            changes = {k: doc[k] for k in _CLIENT_FIELDS if k in doc}
            if "jwks" in changes and changes["jwks"] is not None:
                changes["jwks"] = clientauth.jwks_json(changes["jwks"])
            client = realm.client(client_id)
            if client is None:
                realm.clients.append(DevClient(client_id, **changes))
            else:
                for key, value in changes.items():
                    setattr(client, key, value)
                client.__post_init__()
        except (ValueError, KeyError, TypeError) as exc:
            return JSONResponse({"error": "invalid_request", "error_description": str(exc)[:200]}, 400)
        return JSONResponse({"client_id": client_id})

    async def dev_trusted_issuer(self, request: Request) -> Response:
        """The dev admin API: trust an issuer's assertions for federated clients, ``{"issuer", "jwks"}``
        (Keycloak 26.6: an identity provider of the realm)."""
        realm = self._realm(request)
        if realm is None:
            return _no_realm()
        try:
            doc = await request.json()
            realm.trusted_issuers[str(doc["issuer"])] = clientauth.jwks_json(doc["jwks"])
        except (ValueError, KeyError, TypeError) as exc:
            return JSONResponse({"error": "invalid_request", "error_description": str(exc)[:200]}, 400)
        return JSONResponse({"issuer": doc["issuer"]})

    async def demo_api(self, request: Request) -> Response:
        faulted = await self._guard("api")
        if faulted is not None:
            return faulted
        header = request.headers.get("authorization")
        if not header:
            return JSONResponse({"error": "unauthorized"}, 401, headers={"WWW-Authenticate": "Bearer"})
        scheme, _, token = header.strip().partition(" ")
        claims = grants.access_token_claims(self.state, token.strip()) if scheme.lower() == "bearer" else None
        if claims is None:
            return JSONResponse(
                {"error": "invalid_token"}, 401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
            )
        access = claims.get("realm_access")
        roles = access.get("roles", []) if isinstance(access, dict) else []
        if self.state.api_role not in roles:
            return JSONResponse(
                {"error": "forbidden", "error_description": f"requires realm role {self.state.api_role}"},
                403,
                headers={"WWW-Authenticate": 'Bearer error="insufficient_scope"'},
            )
        return JSONResponse(CONNECTION_TYPES)


def _form_html(user_code: str, error: str | None = None) -> str:
    message = f'<p class="error">{html.escape(error)}</p>' if error else ""
    return (
        f"{message}<form method=post>"
        f'<label>Code <input name=user_code value="{html.escape(user_code)}" autofocus></label><br>'
        "<label>Username <input name=username autocomplete=username></label><br>"
        "<label>Password <input name=password type=password autocomplete=current-password></label><br>"
        "<button name=action value=approve>Yes, sign in</button> "
        "<button name=action value=deny>No</button></form>"
    )


_AUTH_FIELDS: Final = (
    "client_id",
    "redirect_uri",
    "response_type",
    "scope",
    "state",
    "code_challenge",
    "code_challenge_method",
)


def _login_form(params: dict[str, str], error: str | None = None) -> str:
    message = f'<p class="error">{html.escape(error)}</p>' if error else ""
    hidden = "".join(
        f'<input type=hidden name={k} value="{html.escape(params.get(k, ""))}">' for k in _AUTH_FIELDS if k in params
    )
    return (
        f"{message}<form method=post>{hidden}"
        "<label>Username <input name=username autocomplete=username autofocus></label><br>"
        "<label>Password <input name=password type=password autocomplete=current-password></label><br>"
        "<button>Sign in</button></form>"
    )


def _auth_page(realm: str, body: str, status: int = 200) -> HTMLResponse:
    title = f"Sign in to {html.escape(realm)}"
    return HTMLResponse(
        f"<!doctype html><html><head><meta charset=utf-8><title>{title}</title></head>"
        f"<body><h1>{title}</h1>{body}</body></html>",
        status,
        headers={"Cache-Control": "no-store"},
    )


def _page(realm: str, body: str, status: int = 200) -> HTMLResponse:
    title = f"Sign in to {html.escape(realm)}: device login"
    return HTMLResponse(
        f"<!doctype html><html><head><meta charset=utf-8><title>{title}</title></head>"
        f"<body><h1>{title}</h1>{body}</body></html>",
        status,
        headers={"Cache-Control": "no-store"},
    )


def build_app(state: IdPState) -> Starlette:
    return Starlette(routes=Endpoints(state).routes())
