"""What a person reads after a failure: the hint never prints a literal PROFILE, never repeats the
message, never sends a public client to fix a secret, never promises a broker that is not there."""

from __future__ import annotations

import pytest

from dc_broker import errors as broker_errors
from dc_token import errors
from dc_token.errors import BrokerError, DcBrokerError, hint_for

CLASSES = [  # the whole tree: the part both sides see and the broker's own
    cls
    for module in (errors, broker_errors)
    for cls in vars(module).values()
    if isinstance(cls, type) and issubclass(cls, DcBrokerError) and cls is not broker_errors.OAuthError
]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("profile", [None, "acme"])
def test_no_literal_profile_and_no_repetition(cls: type[DcBrokerError], profile: str | None) -> None:
    exc = cls("something went wrong")
    hint = hint_for(exc, profile)
    assert "PROFILE" not in hint
    if profile and "PROFILE" in cls.hint:
        assert profile in hint
    again = cls(f"something went wrong; {hint}") if hint else exc
    assert hint_for(again, profile) == "" or not hint  # a hint already in the message is not repeated


def test_a_message_that_says_what_to_do_gets_no_hint() -> None:
    assert hint_for(errors.LoginRequired("profile 'a': run `dc-broker login a`"), "a") == ""


def test_the_generic_hints_are_right_for_every_grant() -> None:
    assert "secret" not in errors.CredentialsRejected.hint
    assert "broker" not in errors.UpstreamUnavailable.hint  # `dc-broker add` verifies with no broker
    assert all(isinstance(c.hint, str) for c in CLASSES if issubclass(c, BrokerError))
