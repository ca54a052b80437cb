"""``Secret``: a string that never shows itself in a repr, str, log line or error message.

Passwords, client secrets, refresh and access tokens travel inside ``Secret`` everywhere in the broker;
only the code that puts one on the wire to the IdP or into a reply calls ``reveal()``.
"""

from __future__ import annotations

from typing import Final


class Secret:
    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("Secret holds a str")
        self._value: Final = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> str | tuple[object, ...]:  # never pickled or copied by accident
        raise TypeError("Secret cannot be pickled")
