"""The error every contract record raises for a bad request field."""

from __future__ import annotations


class FieldError(ValueError):
    """A request field is malformed or out of range; ``field`` names it (an OpenAI ``param``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
