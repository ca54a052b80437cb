"""What ``--scope`` promises a caller: a token that has every scope asked for, or an error naming
the ones the IdP did not grant (``dc-token --scope``, ``dc-token exec --scope`` and its supervisor)."""

from __future__ import annotations

from dc_token.errors import CredentialsRejected


def check_scope(asked: str, granted: str | None, profile: str) -> None:
    """A token for ``--scope`` lacking some of it (Keycloak 23+ drops, silently, a scope the login
    never had) is neither printed nor handed to a command (``dc-token exec``, ``dc_token.supervise``):
    the caller asked for those scopes. (A scope the IdP did not say is the one asked: RFC 6749
    section 5.1.) Raises ``CredentialsRejected`` naming the missing scopes."""
    if not granted:  # (the result's scope is "" when the IdP said none)
        return
    have = granted.split()
    missing = [word for word in asked.split() if word not in have]
    if missing:
        raise CredentialsRejected(
            f"profile {profile!r}: the identity provider granted {granted!r} for --scope {asked!r}, without "
            f"{' '.join(missing)} (a scope the login never had is dropped); log in with a scope that has them "
            f"(`dc-broker set {profile} scope=...`, then `dc-broker login {profile}`)"
        )
