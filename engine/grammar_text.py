"""A StructuredOutput as llguidance's grammar text, and the check of that grammar which needs no tokenizer.

Pure Python over llguidance (no torch): the engine compiles this text into matchers (engine/grammar.py), and the
router checks it when a request arrives, so a bad schema, regex or grammar is refused before any replica sees it.
"""

from __future__ import annotations

import json

import llguidance

from engine.invalid_request import InvalidRequest
from engine.structured_output import ReasoningSpan, StructuredOutput

# JSON's whitespace between tokens: runs of at most 20 characters (deep enough for pretty-printing), as xgrammar's
# max_whitespace_cnt; unbounded runs let a weak model pad forever. A schema's own "x-guidance" options win.
JSON_OPTIONS: llguidance.JsonCompileOptions = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,20}"}


def grammar_text(spec: StructuredOutput) -> str:
    """llguidance's grammar text of `spec`; InvalidRequest naming the field when llguidance cannot read it."""
    text = _kind_text(spec)
    return text if spec.reasoning is None else _after_reasoning(text, spec.reasoning)


def _kind_text(spec: StructuredOutput) -> str:
    try:
        if spec.json_object:
            return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', JSON_OPTIONS)
        if spec.json_schema is not None:
            return llguidance.LLMatcher.grammar_from_json_schema(spec.json_schema, JSON_OPTIONS)
        if spec.regex is not None:
            return llguidance.LLMatcher.grammar_from_regex(spec.regex)
        if spec.choice is not None:
            return llguidance.grammar_from("choice", list(spec.choice))  # type: ignore[arg-type]
        assert spec.grammar is not None
        return llguidance.grammar_from("grammar", spec.grammar)  # Lark, or GBNF turned into Lark
    except ValueError as e:
        raise InvalidRequest(f"structured_output.{spec.kind}", str(e)) from None


def _after_reasoning(text: str, span: ReasoningSpan) -> str:
    """`text`'s grammar, which may open with `span`. The kind's grammar becomes a named one of the top-level grammar
    list, referenced from a Lark start rule (`@answer`), so every kind is wrapped alike; llguidance's text is such a
    list (JSON) for a schema or regex, Lark for a choice or grammar."""
    answer = json.loads(text)["grammars"] if text.startswith("{") else [{"lark_grammar": text}]
    answer[0]["name"] = "answer"
    not_in_text = ",".join(str(t) for t in sorted({span.start, span.end, *span.ends}))
    start = f"start: reasoning? @answer\nreasoning: <[{span.start}]> <[^{not_in_text}]>* <[{span.end}]>\n"
    return json.dumps({"grammars": [{"lark_grammar": start}, *answer]})


def check_grammar(spec: StructuredOutput) -> None:
    """InvalidRequest naming the field when `spec`'s schema, regex or grammar is not one llguidance can enforce
    (checked without a tokenizer: a special token the grammar names is only looked up when the engine compiles it)."""
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar_text(spec), None)
    if is_error:
        raise InvalidRequest(f"structured_output.{spec.kind}", "; ".join(m.strip() for m in messages))
