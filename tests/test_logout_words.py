"""What `dc-broker logout` says for each way a logout can end at the identity provider (issue 20,
"Logout that logs out": it says which it did), word for word: the broker's answer is stubbed, the
command's own printing is real."""

from __future__ import annotations

from typing import Any

import pytest
from click.testing import CliRunner

from dc_broker.cli import talk
from dc_broker.sessions.flows import Ended

#: (the broker's answer, the line the person reads)
ENDINGS = [
    (
        {"ended": Ended.NOTHING.value, "forgotten": "password", "kept_client_secret": True},
        "Logged out of profile acme: its login already over at the identity provider (nothing to revoke), "
        "its password forgotten (the client secret stays: `dc-broker login` uses it).",
    ),
    (
        {"ended": Ended.NOTHING.value, "forgotten": "refresh token", "kept_client_secret": False},
        "Logged out of profile acme: its login already over at the identity provider (nothing to revoke), "
        "its refresh token forgotten.",
    ),
    (
        {"ended": Ended.UNCONFIRMED.value, "forgotten": "refresh token", "kept_client_secret": False},
        "Logged out of profile acme: its login forgotten (the identity provider did not confirm an end), "
        "its refresh token forgotten.",
    ),
    (
        {"ended": Ended.UNCONFIRMED.value, "forgotten": "client secret", "kept_client_secret": False},
        "Logged out of profile acme: its login forgotten (the identity provider did not confirm an end), "
        "its client secret forgotten (`dc-broker rotate acme --client-secret` stores one again).",
    ),
]


@pytest.mark.parametrize(
    ("answer", "line"),
    ENDINGS,
    ids=["nothing-password", "nothing-device", "unconfirmed-device", "unconfirmed-client-credentials"],
)
def test_logout_says_whether_the_identity_provider_ended_anything(
    monkeypatch: pytest.MonkeyPatch, answer: dict[str, Any], line: str
) -> None:
    asked: list[tuple[str | None, str, dict[str, Any]]] = []

    def ask(socket_path: str | None, op: str, **args: Any) -> dict[str, Any]:
        asked.append((socket_path, op, args))
        return {"profile": "acme", "revoked": False, **answer}

    monkeypatch.setattr(talk, "ask", ask)
    result = CliRunner().invoke(talk.logout, ["--socket", "/run/b.sock", "acme"])
    assert (result.exit_code, result.output) == (0, line + "\n"), result.output
    assert asked == [("/run/b.sock", "logout", {"profile": "acme"})]  # this profile's login, nothing more
    # never "revoked" for a login the identity provider did not end
    assert "revoked" not in result.output and "session at the identity provider ended" not in result.output
