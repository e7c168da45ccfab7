"""The grammar that holds a chat answer's tool calls to the request's tools (tool_choice "required", a named
function, or tools marked strict), in the format the model writes and router/tool_calls.py parses back.

Qwen2.5 and Qwen3 write a call as `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, the tags being
single tokens of their vocabularies. The grammar is Lark, llguidance's dialect, because it can say all of it in
one text: the tags as those tokens (`<[id]>`, what the model was trained to write), each call's JSON as a JSON
Schema (`%json`: the name a constant, the arguments the tool's parameters) and, for strict tools under "auto",
free text around the calls (`<[^id]>`: any token but the opening tag, special tokens such as <think> included).
A regex could not hold the arguments to a schema, and one JSON Schema could not spell the tags as tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from engine.grammar_text import JSON_OPTIONS
from engine.sampling_params import InvalidRequest
from engine.structured_output import StructuredOutput
from engine.tokenizer import Tokenizer

CALL_START, CALL_END = "<tool_call>", "</tool_call>"
ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True, slots=True)
class CallTags:
    """The call tags as a grammar spells them: tokens where the vocabulary has them, else their text."""

    start: str
    end: str
    start_token_id: int | None  # None: the vocabulary spells the tags in pieces

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> CallTags:
        start, end = tokenizer.encode(CALL_START), tokenizer.encode(CALL_END)
        if len(start) == 1 and len(end) == 1:
            return cls(f"<[{start[0]}]>", f"<[{end[0]}]>", start[0])
        return cls(json.dumps(CALL_START), json.dumps(CALL_END), None)


def required_calls(tools: list[dict[str, Any]], tags: CallTags) -> StructuredOutput:
    """One or more calls, each of one of `tools` with arguments its parameters allow, and nothing else."""
    return _lark('start: call ("\\n" call)*', _functions(tools, schema_of=_parameters), tags)


def named_call(tool: dict[str, Any], tags: CallTags) -> StructuredOutput:
    """Exactly one call, of `tool`, with arguments its parameters allow."""
    return _lark("start: call", _functions([tool], schema_of=_parameters), tags)


def strict_calls(tools: list[dict[str, Any]], strict: set[str], tags: CallTags, field: str) -> StructuredOutput:
    """Any text, in which each call is of one of `tools`, the arguments of those named in `strict` held to their
    parameters (any object for the others). `field` names what asked for it in the error of a vocabulary that
    spells the tags in pieces (free text could then write a tag no grammar sees)."""
    if tags.start_token_id is None:
        raise InvalidRequest(field, f"needs a vocabulary with a {CALL_START} token; this model spells it in pieces")
    rules = _functions(tools, schema_of=lambda f: _parameters(f) if f["name"] in strict else ANY_OBJECT)
    return _lark(f"start: text (call text)*\ntext: <[^{tags.start_token_id}]>*", rules, tags)


def _functions(tools: list[dict[str, Any]], schema_of: Any) -> list[str]:
    """One rule per tool: its call's JSON, {"name": <the name>, "arguments": <schema_of(function)>}."""
    rules = []
    for i, tool in enumerate(tools):
        function = tool["function"]
        call = {"type": "object", "properties": {"name": {"const": function["name"]}, "arguments": schema_of(function)},
                "required": ["name", "arguments"], "additionalProperties": False, "x-guidance": JSON_OPTIONS}
        rules.append(f"fn_{i}: %json {json.dumps(call)}")
    return rules


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    return function.get("parameters") or ANY_OBJECT


def _lark(start: str, functions: list[str], tags: CallTags) -> StructuredOutput:
    alternatives = " | ".join(f"fn_{i}" for i in range(len(functions)))
    call = f'call: {tags.start} "\\n" ({alternatives}) "\\n" {tags.end}'
    return StructuredOutput(grammar="\n".join([start, call, *functions]) + "\n")
