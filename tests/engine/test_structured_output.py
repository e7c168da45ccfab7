"""Tests for engine/structured_output.py: the spec's shape is checked by name, and it crosses a Ray call as plain
data (the grammar's own validity is engine/grammar.py's, tested in test_grammar.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from engine.sampling_params import InvalidRequest, SamplingParams
from engine.structured_output import StructuredOutput


@pytest.mark.parametrize("given", [
    {"json_schema": {"type": "object", "properties": {"b": {}, "a": {}}}}, {"json_object": True},
    {"regex": "[0-9]+"}, {"choice": ["x", "y z"]}, {"grammar": 'start: "a"'},
    {"regex": "[0-9]+", "reasoning": {"start": 7, "end": 8, "ends": [2, 3]}},
])
def test_a_spec_rebuilds_from_its_plain_data(given: dict[str, Any]) -> None:
    spec = StructuredOutput.from_value(given)
    assert spec.kind == next(iter(given))
    assert json.loads(json.dumps(spec.as_dict())) == spec.as_dict()  # plain data
    assert StructuredOutput.from_value(spec.as_dict()) == spec
    assert SamplingParams.from_kwargs(**SamplingParams(structured_output=spec).as_kwargs()).structured_output == spec


def test_a_schema_keeps_its_key_order() -> None:
    """Properties come out in the schema's order, so the JSON text keeps it."""
    spec = StructuredOutput(json_schema={"properties": {"b": {}, "a": {}}})  # type: ignore[arg-type]
    assert list(json.loads(spec.json_schema or "")["properties"]) == ["b", "a"]


@pytest.mark.parametrize("given, field", [
    ({}, "structured_output"),
    ({"regex": "a", "choice": ["b"]}, "structured_output"),
    ({"json_object": False}, "structured_output"),
    ({"json_schema": "[1, 2]"}, "structured_output.json_schema"),
    ({"json_schema": "{"}, "structured_output.json_schema"),
    ({"json_schema": 3}, "structured_output.json_schema"),
    ({"json_object": "yes"}, "structured_output.json_object"),
    ({"regex": ""}, "structured_output.regex"),
    ({"grammar": 5}, "structured_output.grammar"),
    ({"choice": []}, "structured_output.choice"),
    ({"choice": "yes"}, "structured_output.choice"),
    ({"choice": ["a", ""]}, "structured_output.choice[1]"),
    ({"regexp": "a"}, "structured_output.regexp"),
    ({"reasoning": {"start": 1, "end": 2}}, "structured_output"),
    ({"regex": "a", "reasoning": {"start": 1}}, "structured_output.reasoning"),
    ({"regex": "a", "reasoning": {"start": 1, "end": -2}}, "structured_output.reasoning.end"),
    ({"regex": "a", "reasoning": {"start": 1, "end": 2, "ends": ["x"]}}, "structured_output.reasoning.ends"),
])
def test_a_bad_shape_is_named(given: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as error:
        SamplingParams(structured_output=given)
    assert error.value.field == field


def test_not_a_mapping_and_min_tokens_are_refused() -> None:
    with pytest.raises(InvalidRequest, match="^structured_output: must be a StructuredOutput or a mapping"):
        SamplingParams(structured_output="json")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="^min_tokens: must be 0 with structured_output"):
        SamplingParams(min_tokens=1, structured_output={"regex": "a+"})
