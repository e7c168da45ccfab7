"""The error of a bad request field (pure Python: the router raises and reads it too)."""

from __future__ import annotations


class InvalidRequest(ValueError):
    """A request field is missing or out of range: `field` names it, `message` says what is wrong with it. A
    ValueError (its text "field: message"), so the Python API raises what it always has; a server answers it
    as INVALID_ARGUMENT and carries the field on as a field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message

    def within(self, parent: str) -> InvalidRequest:
        """The same problem, named as a field of `parent` (the router's `params.temperature`)."""
        return InvalidRequest(f"{parent}.{self.field}", self.message)
