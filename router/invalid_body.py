"""The error of a bad OpenAI request body, and how its messages quote the body's values."""

from __future__ import annotations

import json


class InvalidBody(ValueError):
    """A body field is missing, mistyped, out of range or unsupported; `param` names it (OpenAI's error JSON
    carries it), and the message starts with it."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(f"{param}: {message}" if param else message)
        self.param = param


def as_json(value: object) -> str:
    """A body value as its sender wrote it: JSON (true, null, "text", {"a": 1}), not Python (True, None, 'text')."""
    return json.dumps(value, ensure_ascii=False)
