"""What an identity provider's refusal *means*: one table, Keycloak's texts and other OPs' equivalents.
Pure: plain values in, a ``Refusal`` out.

A status code alone says little (Keycloak answers "HTTPS required" with 403 and a dead session with
400, a locked account and a wrong password with the same words), so each refusal is read by its
``error``, its ``error_description``, the grant it answered and, last, its status. The first row that
matches decides:

    meaning            what the broker does                                      e.g. (Keycloak)
    TOKEN_DEAD         drops the refresh token, falls back to the stored password 400 invalid_grant
                       or secret, else asks a person to log in                    "Session not active"
    CREDENTIAL_WRONG   stops: a person stores the right credential                401 unauthorized_client
    MAYBE_LOCKED       a password the IdP accepted before: retried a bounded      400 invalid_grant
                       number of times over Keycloak's lock-out window, as a      "Invalid user credentials"
                       brute-force lock looks exactly like a wrong password
    MISCONFIGURED      keeps every token, retries only every few minutes, and     403 "HTTPS required"
                       says exactly which client or realm setting to fix
    SCOPE              refuses the scope                                          400 invalid_scope

Only ``TOKEN_DEAD`` may cost a refresh token: on a refresh, an ``invalid_grant`` (RFC 6749: the token
is invalid, expired or revoked), a body-less 400/401 (glewlwyd), or another error whose words are
about the token or session ("Invalid refresh token" as ``invalid_request``). Anything else a refresh
is refused with is read as the client's or realm's configuration, never as a dead token.

``fix`` texts name ``{client}``, ``{profile}`` and ``{user}``, filled in by ``classify``.

Must never: look at anything but the refusal and the grant; hold a secret (the IdP's text reaches
here already cut and redacted by ``oidc.clean_text``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from dc_broker.errors import OAuthError


class Meaning(StrEnum):
    TOKEN_DEAD = "token_dead"
    CREDENTIAL_WRONG = "credential_wrong"
    MAYBE_LOCKED = "maybe_locked"
    MISCONFIGURED = "misconfigured"
    SCOPE = "scope"


#: the grants a refusal can answer (``classify``'s ``grant``)
REFRESH: Final = "refresh_token"
PASSWORD: Final = "password"
CLIENT_CREDENTIALS: Final = "client_credentials"
DEVICE: Final = "device"
CODE: Final = "authorization_code"
ANY: Final = frozenset({REFRESH, PASSWORD, CLIENT_CREDENTIALS, DEVICE, CODE})


@dataclass(frozen=True, slots=True)
class Row:
    meaning: Meaning
    #: the ``error`` it matches (None: any)
    error: frozenset[str] | None = None
    #: a pattern the ``error_description`` (or a body-less refusal's words) must contain
    said: re.Pattern[str] | None = None
    grants: frozenset[str] = ANY
    statuses: frozenset[int] | None = None
    #: what to do, for the person who reads the message
    fix: str = ""


def _said(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


_CAPABILITY: Final = "Clients -> {client} -> Settings -> Capability config"

TABLE: Final[tuple[Row, ...]] = (
    # --- the realm or the client is configured so that nothing can work: keep every token ---
    Row(
        Meaning.MISCONFIGURED,
        said=_said(r"HTTPS required"),
        fix="the identity provider wants https for this request (Keycloak: Realm settings -> General -> "
        "Require SSL): give the profile an https server URL (`dc-broker set {profile} server=https://...`)",
    ),
    Row(
        Meaning.MISCONFIGURED,
        said=_said(r"Realm not enabled"),
        fix="the realm is disabled at the identity provider: an administrator must enable it (Realm settings -> "
        "Enabled); nothing was dropped, the broker tries again every few minutes",
    ),
    Row(
        Meaning.MISCONFIGURED,
        error=frozenset({"not_allowed"}),
        said=_said(r"offline"),
        fix="offline tokens are not allowed for this user or client: give the user the offline_access role and "
        "client {client} the offline_access client scope, or drop offline_access from the profile's scope "
        "(`dc-broker set {profile} scope=...`)",
    ),
    Row(
        Meaning.MISCONFIGURED,
        said=_said(r"\bDPoP\b"),
        fix="client {client} wants DPoP-bound tokens, which dc-broker does not send: turn off 'OAuth 2.0 DPoP Bound "
        "Access Tokens' for the client (Clients -> {client} -> Advanced)",
    ),
    Row(
        Meaning.MISCONFIGURED,
        error=frozenset({"invalid_dpop_proof"}),
        fix="client {client} wants DPoP-bound tokens, which dc-broker does not send: turn off 'OAuth 2.0 DPoP Bound "
        "Access Tokens' for the client (Clients -> {client} -> Advanced)",
    ),
    Row(
        Meaning.MISCONFIGURED,
        said=_said(r"Device Authorization Grant"),
        fix="the device login is off for client {client}: turn on 'OAuth 2.0 Device Authorization Grant' ("
        + _CAPABILITY
        + "), or log in with a browser (`dc-broker set {profile} grant=browser`)",
    ),
    Row(
        Meaning.MISCONFIGURED,
        error=frozenset({"unauthorized_client"}),
        said=_said(r"direct access grants"),
        fix="password logins are off for client {client}: turn on 'Direct access grants' ("
        + _CAPABILITY
        + "), or log in with a device or browser (`dc-broker set {profile} grant=device`)",
    ),
    Row(
        Meaning.MISCONFIGURED,
        error=frozenset({"unauthorized_client"}),
        said=_said(r"service account"),
        fix="client {client} has no service account: turn on 'Client authentication' and 'Service accounts roles' ("
        + _CAPABILITY
        + ")",
    ),
    Row(
        Meaning.MISCONFIGURED,
        error=frozenset({"invalid_request"}),
        grants=frozenset({CLIENT_CREDENTIALS}),
        statuses=frozenset({401}),
        fix="the service account of client {client} is disabled: an administrator must enable its user (Users -> "
        "service-account-{client} -> Enabled)",
    ),
    Row(
        Meaning.MISCONFIGURED,
        error=frozenset({"unsupported_grant_type"}),
        fix="the identity provider does not offer this grant to client {client}: check the client's capability "
        "settings, or the profile's grant",
    ),
    # --- the user ---
    Row(Meaning.TOKEN_DEAD, error=frozenset({"invalid_grant"}), grants=frozenset({REFRESH})),
    Row(
        Meaning.CREDENTIAL_WRONG,
        error=frozenset({"invalid_grant"}),
        said=_said(r"(account|user) (is )?disabled"),
        fix="user {user} is disabled at the identity provider: an administrator must enable them",
    ),
    Row(
        Meaning.CREDENTIAL_WRONG,
        error=frozenset({"invalid_grant"}),
        said=_said(r"not fully set up"),
        grants=frozenset({PASSWORD}),
        fix="user {user} has actions to complete first (a new password, terms to accept): log in once in a "
        "browser, then `dc-broker login {profile}`",
    ),
    Row(
        Meaning.MAYBE_LOCKED,
        error=frozenset({"invalid_grant"}),
        said=_said(r"invalid user credentials"),
        grants=frozenset({PASSWORD}),
    ),
    # --- the client: a wrong id or secret ---
    Row(Meaning.CREDENTIAL_WRONG, error=frozenset({"invalid_client", "unauthorized_client"})),
    Row(Meaning.SCOPE, error=frozenset({"invalid_scope"})),
    # --- a refresh refused in words about the token (other OPs), or with no words at all ---
    Row(Meaning.TOKEN_DEAD, error=frozenset({"refused"}), grants=frozenset({REFRESH}), statuses=frozenset({400, 401})),
    Row(
        Meaning.TOKEN_DEAD,
        said=_said(r"\b(refresh|token|session|grant)\b"),
        grants=frozenset({REFRESH}),
        statuses=frozenset({400, 401}),
    ),
    Row(
        Meaning.MISCONFIGURED,
        grants=frozenset({REFRESH}),
        fix="it did not say the login is dead, so nothing was dropped: check the client's and the realm's "
        "settings at the identity provider; the broker tries again every few minutes",
    ),
    # --- anything else a grant is refused with: the credential it presented ---
    Row(Meaning.CREDENTIAL_WRONG),
)


@dataclass(frozen=True, slots=True)
class Refusal:
    meaning: Meaning
    #: what to do (empty: the grant's own message says it)
    fix: str = ""


def classify(exc: OAuthError, grant: str, *, client: str = "", profile: str = "", user: str = "") -> Refusal:
    """What ``exc`` (a refusal of ``grant``) means, by the first matching row of ``TABLE``."""
    words = f"{exc.error} {exc.description}"
    for row in TABLE:
        if row.error is not None and exc.error not in row.error:
            continue
        if row.said is not None and not row.said.search(words):
            continue
        if grant not in row.grants or (row.statuses is not None and exc.status not in row.statuses):
            continue
        return Refusal(row.meaning, row.fix.format(client=client, profile=profile, user=user or "(none)"))
    raise AssertionError("the last row matches every refusal")  # pragma: no cover
