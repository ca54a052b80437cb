"""Pending device authorizations (RFC 8628 as Keycloak implements it). Pure: ``now`` is a parameter.

A device authorization is created by ``POST .../auth/device``, approved or denied by a person (the
verification page or ``DevIdP.approve_device``), polled by the client, and consumed by the one poll
that returns tokens. Each authorization keeps the ``interval`` its client was told (the realm's
``device_interval``); ``slow_down`` answers a poll that comes less than ``interval`` seconds after the
last accepted one (a poll answered ``slow_down`` does not count: Keycloak keeps its polling mark for
``interval`` seconds from the poll that set it). Keycloak does not grow the interval afterwards, and
neither do we.
"""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass, field
from typing import Final

EXPIRES_IN: Final = 600
_USER_CODE_ALPHABET: Final = "BCDFGHJKLMNPQRSTVWXZ"  # no vowels, as Keycloak: no accidental words


class DeviceState(enum.Enum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"


@dataclass
class DeviceAuthorization:
    device_code: str = field(repr=False)
    user_code: str
    realm: str
    client_id: str
    scope: str | None
    created: float
    interval: int
    state: DeviceState = DeviceState.PENDING
    username: str | None = None
    #: when the last poll that was not answered ``slow_down`` came
    last_poll: float | None = None

    def expired(self, now: float) -> bool:
        return now > self.created + EXPIRES_IN


def normalize_user_code(user_code: str) -> str:
    return "".join(ch for ch in user_code.upper() if ch.isalnum())


@dataclass
class DeviceStore:
    by_device_code: dict[str, DeviceAuthorization] = field(default_factory=dict, repr=False)

    def create(
        self, realm: str, client_id: str, scope: str | None, *, interval: int, now: float
    ) -> DeviceAuthorization:
        raw = "".join(secrets.choice(_USER_CODE_ALPHABET) for _ in range(8))
        auth = DeviceAuthorization(
            device_code=secrets.token_urlsafe(32),
            user_code=f"{raw[:4]}-{raw[4:]}",
            realm=realm,
            client_id=client_id,
            scope=scope,
            created=now,
            interval=interval,
        )
        self.by_device_code[auth.device_code] = auth
        return auth

    def by_user_code(self, user_code: str) -> DeviceAuthorization | None:
        wanted = normalize_user_code(user_code)
        return next(
            (a for a in self.by_device_code.values() if normalize_user_code(a.user_code) == wanted),
            None,
        )

    def get(self, device_code: str) -> DeviceAuthorization | None:
        return self.by_device_code.get(device_code)

    def consume(self, device_code: str) -> None:
        self.by_device_code.pop(device_code, None)
