"""The API key: one object whose repr hides it, and a redactor for anything echoed back."""

from __future__ import annotations


class Secret:
    """Holds the key; `str()`, `repr()` and f-strings show `[secret]`, never the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def redact(self, text: str) -> str:
        return text.replace(self._value, "[secret]") if self._value else text

    def __repr__(self) -> str:
        return "Secret([secret])"

    __str__ = __repr__
