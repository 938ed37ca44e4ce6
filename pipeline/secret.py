"""The API key: one object whose repr hides it, and a redactor for anything echoed back."""

from __future__ import annotations

from pipeline.errors import ItemError


class Secret:
    """Holds the key; `str()`, `repr()` and f-strings show `[secret]`, never the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def redact(self, text: str) -> str:
        return text.replace(self._value, "[secret]") if self._value else text

    def scrub(self, error: ItemError) -> ItemError:
        """The error with the key removed from its message (gateways that echo it back)."""
        error.message = self.redact(error.message)
        error.args = (error.message,)
        return error

    def __repr__(self) -> str:
        return "Secret([secret])"

    __str__ = __repr__
