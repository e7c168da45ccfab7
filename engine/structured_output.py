"""What a request's output must match: a JSON schema, any JSON object, a regex, one of some strings, or a grammar,
optionally after a reasoning span the grammar leaves free.

Pure Python (the router imports it with SamplingParams). Its shape is checked here; whether the schema, regex or
grammar itself is valid is found when the engine compiles it (engine/grammar.py), at submission.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from engine.invalid_request import InvalidRequest

Kind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]


@dataclass(frozen=True, slots=True)
class ReasoningSpan:
    """A span the output may open with, before the part the grammar holds: the `start` token, free text, the `end`
    token (Qwen3's <think> and </think>, single tokens of its vocabulary). The text may hold any token but the two
    tags and `ends`, the tokens that would end the output (EOS, stop ids): an output never ends inside the span,
    before the part the grammar holds."""

    start: int
    end: int
    ends: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "ends", tuple(self.ends))
        for name, value in (("start", self.start), ("end", self.end), *(("ends", t) for t in self.ends)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidRequest(f"structured_output.reasoning.{name}", f"must be token ids, got {value!r}")

    @classmethod
    def from_value(cls, value: object) -> ReasoningSpan:
        """A ReasoningSpan as given, or built from a mapping of its fields."""
        if isinstance(value, ReasoningSpan):
            return value
        if not isinstance(value, Mapping) or not {"start", "end"} <= value.keys() <= {"start", "end", "ends"}:
            raise InvalidRequest("structured_output.reasoning", f"must be a mapping of start, end and ends, got "
                                 f"{value!r}")
        return cls(**value)


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """Exactly one field set:

    json_schema: a JSON Schema object (a dict, or its JSON text; kept as JSON text in its key order).
    json_object: True: any JSON object (OpenAI's response_format {"type": "json_object"}).
    regex: the whole output matches it (Rust regex syntax, as llguidance reads it).
    choice: the output is one of these strings.
    grammar: a context-free grammar in Lark syntax (llguidance's dialect) or llama.cpp's GBNF.

    Beside it, not a kind: `reasoning`, a ReasoningSpan the output may open with before the part the kind holds (a
    thinking model's reasoning, left free: the router sets it for a Qwen3 chat answer with thinking on).
    """

    json_schema: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    reasoning: ReasoningSpan | None = None

    def __post_init__(self) -> None:
        if isinstance(self.json_schema, Mapping):
            object.__setattr__(self, "json_schema", json.dumps(self.json_schema))
        if isinstance(self.choice, (list, tuple)):
            object.__setattr__(self, "choice", tuple(self.choice))
        if self.reasoning is not None:
            object.__setattr__(self, "reasoning", ReasoningSpan.from_value(self.reasoning))
        self._validate()

    def _validate(self) -> None:
        given = [name for name in KINDS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            names = "none" if not given else " and ".join(given)
            raise InvalidRequest("structured_output", f"set exactly one of {', '.join(KINDS)}; got {names}")
        if self.json_schema is not None:
            _check_schema(self.json_schema)
        if self.json_object is not False and self.json_object is not True:
            raise InvalidRequest("structured_output.json_object", f"must be a bool, got {self.json_object!r}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise InvalidRequest(f"structured_output.{name}", f"must be a non-empty string, got {value!r}")
        if self.choice is not None:
            _check_choice(self.choice)

    @property
    def kind(self) -> Kind:
        """The field that is set."""
        return next(name for name in KINDS if getattr(self, name) not in (None, False))  # type: ignore[return-value]

    def as_dict(self) -> dict[str, Any]:
        """The set field by name (and the reasoning span, if any), as plain data ({"regex": "..."}): what
        `from_value` rebuilds this from."""
        value = getattr(self, self.kind)
        plain: dict[str, Any] = {self.kind: list(value) if self.kind == "choice" else value}
        if self.reasoning is not None:
            plain["reasoning"] = {"start": self.reasoning.start, "end": self.reasoning.end,
                                  "ends": list(self.reasoning.ends)}
        return plain

    @classmethod
    def from_value(cls, value: object) -> StructuredOutput:
        """A StructuredOutput as given, or built from a mapping of its fields ({"json_schema": {...}})."""
        if isinstance(value, StructuredOutput):
            return value
        if not isinstance(value, Mapping):
            raise InvalidRequest("structured_output", f"must be a StructuredOutput or a mapping, got {value!r}")
        unknown = sorted(set(value).difference(KINDS, ["reasoning"]))
        if unknown:
            raise InvalidRequest(f"structured_output.{unknown[0]}", f"unknown; known: {', '.join(KINDS)}")
        return cls(**value)


KINDS: tuple[str, ...] = tuple(f.name for f in fields(StructuredOutput) if f.name != "reasoning")


def _check_schema(text: object) -> None:
    field = "structured_output.json_schema"
    if not isinstance(text, str):
        raise InvalidRequest(field, f"must be a JSON Schema object (a dict or its JSON text), got {text!r}")
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidRequest(field, f"is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise InvalidRequest(field, f"must be a JSON Schema object, got {text}")


def _check_choice(choice: object) -> None:
    if not isinstance(choice, tuple) or not choice:
        raise InvalidRequest("structured_output.choice", f"must be a non-empty list of strings, got {choice!r}")
    for i, option in enumerate(choice):
        if not isinstance(option, str) or not option:
            raise InvalidRequest(f"structured_output.choice[{i}]", f"must be a non-empty string, got {option!r}")
