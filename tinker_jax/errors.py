"""Errors the engine raises for inputs it refuses.

A `ValidationError` always names the offending field (and the datum, when there is one)
so the service can return it verbatim as INVALID_ARGUMENT.
"""

from __future__ import annotations


class ValidationError(ValueError):
    """An input from outside the engine is malformed; the message names the field."""

    def __init__(self, field: str, message: str, *, datum: int | None = None):
        self.field = field
        self.datum = datum
        where = f"datum {datum}: {field}" if datum is not None else field
        super().__init__(f"{where}: {message}")
