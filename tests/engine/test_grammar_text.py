"""engine/grammar_text.py: a spec's grammar checked without a tokenizer, errors naming the spec's field."""

from __future__ import annotations

import pytest

from engine.grammar_text import check_grammar
from engine.sampling_params import InvalidRequest
from engine.structured_output import StructuredOutput


@pytest.mark.parametrize(("spec", "field", "says"), [
    ({"json_schema": {"type": "object", "properties": {"a": {"type": "strng"}}}}, "json_schema", "strng"),
    ({"json_schema": {"type": "object", "required": 5}}, "json_schema", "required"),
    ({"regex": "[a-"}, "regex", "unclosed character class"),
    ({"grammar": "start: item"}, "grammar", "unknown name"),
    ({"grammar": "root ::= [a-"}, "grammar", ""),
])
def test_a_bad_grammar_is_refused_naming_its_field(spec: dict, field: str, says: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_grammar(StructuredOutput.from_value(spec))
    assert info.value.field == f"structured_output.{field}" and says in info.value.message


@pytest.mark.parametrize("spec", [{"json_schema": {"type": "object", "properties": {"a": {"type": "integer"}}}},
                                  {"json_object": True}, {"regex": "[a-c]{3}"}, {"choice": ["yes", "no"]},
                                  {"grammar": 'start: "(" /[0-9]/ ")"'}, {"grammar": 'root ::= "a" [b-c]'},
                                  {"grammar": 'start: <tool_call> "x"'}])  # special tokens: checked by the engine
def test_good_grammars_pass(spec: dict) -> None:
    check_grammar(StructuredOutput.from_value(spec))
