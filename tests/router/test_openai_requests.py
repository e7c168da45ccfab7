"""OpenAI request bodies read into GenerateRequests (router/openai_requests.py), without a router: the errors
name the body's field and show its value as the client sent it, in JSON (true, null, "x", {"1": 5})."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proto import nanoserve_pb2 as pb
from router.openai_requests import Endpoint, InvalidBody, invalid_body, read_request

PROMPT = {"prompt": [1, 2, 3]}
MESSAGES = {"messages": [{"role": "user", "content": "Hi"}]}

# (endpoint, body as JSON text, param, message): one per kind of check that shows a value.
BAD_VALUES: list[tuple[Endpoint, str, str, str]] = [
    ("completions", '{"temperature": true}', "temperature", "must be a finite number, got true"),
    ("completions", '{"top_p": "high"}', "top_p", 'must be a finite number, got "high"'),
    ("completions", '{"temperature": NaN}', "temperature", "must be a finite number, got NaN"),
    ("completions", '{"min_p": -Infinity}', "min_p", "must be a finite number, got -Infinity"),
    ("completions", '{"top_k": 1.5}', "top_k", "must be a 64-bit integer, got 1.5"),
    ("completions", '{"seed": {"a": 1}}', "seed", 'must be a 64-bit integer, got {"a": 1}'),
    ("completions", '{"max_tokens": false}', "max_tokens", "must be a 64-bit integer, got false"),
    ("completions", '{"stream": "yes"}', "stream", 'must be true or false, got "yes"'),
    ("completions", '{"ignore_eos": 1}', "ignore_eos", "must be true or false, got 1"),
    ("completions", '{"model": 5}', "model", "must be a string, got 5"),
    ("chat", '{"messages": [{"role": null, "content": "Hi"}]}', "messages[0].role", "must be a string, got null"),
    ("completions", '{"stop_token_ids": [1, true]}', "stop_token_ids[1]", "must be a token id (an integer), got true"),
    ("completions", '{"logit_bias": [1, 5]}', "logit_bias", "must be an object of token id -> bias, got [1, 5]"),
    ("completions", '{"logit_bias": {"a": 5}}', "logit_bias", 'keys must be token ids (decimal integers), got "a"'),
    ("chat", '{"logit_bias": {"7": "x"}}', "logit_bias[7]", 'must be a finite number, got "x"'),
    ("chat", '{"allowed_token_ids": []}', "allowed_token_ids", "must not be empty (leave it out to allow every token)"),
    ("completions", '{"echo": true}', "echo", "not supported by this server (only false), got true"),
    ("completions", '{"tool_choice": "required"}', "tool_choice",
     'not supported by this server (only "none" or "auto"), got "required"'),
    ("chat", '{"tools": {"name": "f"}}', "tools", 'must be a list, got {"name": "f"}'),
    ("chat", '{"tools": [{"type": "function", "name": "f"}]}', "tools[0]",
     'must be {"type": "function", "function": {"name": ...}}'),
    ("chat", '{"tools": [{"type": "function", "function": {"name": 7}}]}', "tools[0].function.name",
     "must be a string, got 7"),
    ("chat", '{"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}',
     "tools[0].function.parameters", "must be a JSON Schema object"),
    ("chat", '{"tools": [{"type": "function", "function": {"name": "f", "strict": 1}}]}', "tools[0].function.strict",
     "must be true or false, got 1"),
    ("chat", '{"tools": [{"type": "function", "function": {"name": "f", "args": {}}}]}', "tools[0].function.args",
     "unknown field (functions take name, description, parameters and strict)"),
    ("chat", '{"tool_choice": 5}', "tool_choice",
     'must be "auto", "none", "required" or {"type": "function", "function": {"name": ...}}, got 5'),
    ("chat", '{"tool_choice": {"type": "function", "function": {}}}', "tool_choice.function.name",
     "must be a string, got null"),
    ("chat", '{"messages": [{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", '
     '"arguments": {}}}]}]}', "messages[0].tool_calls[0].function.arguments", "must be a string, got {}"),
    ("chat", '{"messages": [{"role": "assistant", "tool_calls": [{"name": "f"}]}]}', "messages[0].tool_calls[0]",
     'must be {"id": ..., "type": "function", "function": {"name": ..., "arguments": ...}}'),
    ("chat", '{"messages": [{"role": "tool", "content": "x", "tool_call_id": 3}]}', "messages[0].tool_call_id",
     "must be a string, got 3"),
    ("chat", '{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', "messages[0].content[0]",
     'only text parts are supported, got type "image_url"'),
    ("chat", '{"messages": [{"role": "user", "content": ["Hi"]}]}', "messages[0].content[0]",
     "only text parts are supported, got type null"),
    ("completions", '{"guided_regex": 5}', "guided_regex", "must be a string, got 5"),
    ("completions", '{"guided_choice": "yes"}', "guided_choice", 'must be a list of strings, got "yes"'),
    ("chat", '{"guided_json": [1]}', "guided_json", "must be a JSON Schema object (or its JSON text), got [1]"),
    ("chat", '{"guided_grammar": {"x": 1}}', "guided_grammar", 'must be a string, got {"x": 1}'),
    ("chat", '{"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}',
     "response_format.json_schema.schema", "must be a JSON Schema object, got null"),
    ("chat", '{"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}}',
     "response_format.json_schema.strict", 'wrong type: "yes"'),
    ("chat", '{"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "x": 1}}}',
     "response_format.json_schema.x", "unknown; it takes name, description, schema, strict"),
    ("completions", '{"response_format": {"type": "structural_tag"}}', "response_format.type",
     'not supported by this server (text, json_object or json_schema), got "structural_tag"'),
    ("completions", '{"response_format": "json"}', "response_format",
     'must be {"type": "text" | "json_object" | "json_schema", ...}, got "json"'),
    ("completions", '{"response_format": {"type": "json_object", "schema": {}}}', "response_format.schema",
     'unknown with type "json_object"'),
    ("completions", '{"structured_outputs": {"structural_tag": "{}"}}', "structured_outputs.structural_tag",
     "not supported by this server"),
    ("completions", '{"structured_outputs": {"regexp": "a"}}', "structured_outputs.regexp",
     "unknown; it takes one of json, regex, choice, grammar, json_object"),
    ("completions", '{"structured_outputs": {"regex": "a", "choice": ["b"]}}', "structured_outputs",
     "set exactly one of json, regex, choice, grammar, json_object; got regex and choice"),
    ("completions", '{"structured_outputs": {"json_object": 1}}', "structured_outputs.json_object",
     "must be true, got 1"),
    ("completions", '{"guided_regex": "a", "response_format": {"type": "json_object"}}', "guided_regex",
     "only one of response_format, structured_outputs and guided_* per request; response_format is given too"),
]


def body_of(endpoint: Endpoint, text: str) -> dict[str, Any]:
    """The body as the server parses it (Python's json, NaN included), with a valid prompt unless it brings one."""
    body = json.loads(text)
    return {**(MESSAGES if endpoint == "chat" else PROMPT), **body}


@pytest.mark.parametrize(("endpoint", "text", "param", "message"), BAD_VALUES, ids=[b for _, b, _, _ in BAD_VALUES])
def test_a_bad_value_is_named_and_shown_as_json(endpoint: Endpoint, text: str, param: str, message: str) -> None:
    with pytest.raises(InvalidBody) as error:
        read_request(endpoint, body_of(endpoint, text))
    assert (error.value.param, str(error.value)) == (param, f"{param}: {message}")


@pytest.mark.parametrize(("endpoint", "field", "param"), [
    ("completions", "params.temperature", "temperature"), ("completions", "token_ids.ids[2]", "prompt[2]"),
    ("completions", "text", "prompt"), ("chat", "prompt", "messages"),
    ("chat", "chat.messages[0].role", "messages[0].role"), ("chat", "chat.tools[1].name", "tools[1].function.name"),
    ("chat", "chat.tool_choice", "tool_choice"),
    ("chat", "chat.tool_choice.function_name", "tool_choice.function.name"),
    ("chat", "chat.tools[0].strict", "tools[0].function.strict"),
    ("chat", "chat.messages[1].tool_calls[0].arguments", "messages[1].tool_calls[0].function.arguments"),
    ("chat", "chat.messages[1].tool_calls", "messages[1].tool_calls"),
])
def test_the_validators_field_is_renamed_to_the_bodys(endpoint: Endpoint, field: str, param: str) -> None:
    """Only the field is renamed; the message, whatever it holds, is not read."""
    error = invalid_body(endpoint, field, "must be >= 0: params.x")
    assert (error.param, str(error)) == (param, f"{param}: must be >= 0: params.x")


def test_allowed_no_op_values_and_null_pass() -> None:
    body = {**MESSAGES, "tool_choice": "auto", "parallel_tool_calls": False, "temperature": None}
    request = read_request("chat", body)
    assert not request.generate.params.HasField("temperature")  # null means unset
    # chat runs to the end of the context, which the validator computes from the tokenized prompt
    assert not request.generate.params.HasField("max_tokens") and request.max_tokens_to_context_end


def test_logit_bias_and_allowed_token_ids_reach_the_request() -> None:
    body = {**PROMPT, "logit_bias": {"50256": -100, "7": 2.5}, "allowed_token_ids": [7, 9]}
    params = read_request("completions", body).generate.params
    assert dict(params.logit_bias) == {50256: -100.0, 7: 2.5} and list(params.allowed_token_ids) == [7, 9]


def test_chat_template_kwargs_reach_the_chat_request() -> None:
    request = read_request("chat", {**MESSAGES, "chat_template_kwargs": {"enable_thinking": False}})
    assert dict(request.generate.chat.template_kwargs) == {"enable_thinking": False}
    with pytest.raises(InvalidBody, match="^chat_template_kwargs: must be an object, got true$"):
        read_request("chat", {**MESSAGES, "chat_template_kwargs": True})
    assert invalid_body("chat", "chat.template_kwargs.messages", "x").param == "chat_template_kwargs.messages"


def test_tools_tool_choice_and_tool_messages_reach_the_chat_request() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    body = {"messages": [{"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": None, "tool_calls": [call]},
                         {"role": "tool", "content": "2", "tool_call_id": "call_1"}],
            "tools": [{"type": "function", "function": {"name": "f", "description": "Doubles x.", "parameters": {
                "type": "object", "properties": {"x": {"type": "integer", "maximum": 10}}}}}],
            "tool_choice": {"type": "function", "function": {"name": "f"}}}
    chat = read_request("chat", body).generate.chat
    [tool] = chat.tools
    assert (tool.name, tool.description, tool.parameters["properties"]["x"]["maximum"]) == ("f", "Doubles x.", 10)
    assert chat.tool_choice.function_name == "f"
    assert (chat.messages[1].content, list(chat.messages[1].tool_calls)) == (
        "", [pb.ToolCall(id="call_1", name="f", arguments='{"x": 1}')])
    assert chat.messages[2].tool_call_id == "call_1"
    assert read_request("chat", {**body, "tool_choice": "none"}).generate.chat.tool_choice.mode == "none"
    assert not read_request("chat", MESSAGES).generate.chat.HasField("tool_choice")


@pytest.mark.parametrize(("body", "expected", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object"},
                                                                 "strict": True}}},
     pb.StructuredOutput(json_schema='{"type": "object"}'), "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_object"}}, pb.StructuredOutput(json_object=True), "response_format"),
    ({"response_format": {"type": "text"}}, None, None),
    ({"guided_json": {"type": "object"}}, pb.StructuredOutput(json_schema='{"type": "object"}'), "guided_json"),
    ({"guided_json": '{"type": "object"}'}, pb.StructuredOutput(json_schema='{"type": "object"}'), "guided_json"),
    ({"guided_regex": "[a-c]+"}, pb.StructuredOutput(regex="[a-c]+"), "guided_regex"),
    ({"guided_choice": ["a", "b"]}, pb.StructuredOutput(choice=pb.Choices(choices=["a", "b"])), "guided_choice"),
    ({"guided_grammar": 'start: "a"'}, pb.StructuredOutput(grammar='start: "a"'), "guided_grammar"),
    ({"structured_outputs": {"json": {"type": "object"}}}, pb.StructuredOutput(json_schema='{"type": "object"}'),
     "structured_outputs.json"),
    ({"structured_outputs": {"choice": ["a"], "regex": None}}, pb.StructuredOutput(choice=pb.Choices(choices=["a"])),
     "structured_outputs.choice"),
    ({"structured_outputs": {"json_object": True}}, pb.StructuredOutput(json_object=True),
     "structured_outputs.json_object"),
])
def test_structured_output_fields_reach_the_request(body: dict[str, Any], expected: pb.StructuredOutput | None,
                                                    param: str | None) -> None:
    for endpoint, prompt in (("completions", PROMPT), ("chat", MESSAGES)):
        request = read_request(endpoint, {**prompt, **body})  # type: ignore[arg-type]
        params = request.generate.params
        assert (params.structured_output if params.HasField("structured_output") else None) == expected
        assert request.structured_output_param == param


@pytest.mark.parametrize(("field", "spec_param", "param"), [
    ("params.structured_output.json_schema", "response_format.json_schema.schema",
     "response_format.json_schema.schema"),
    ("params.structured_output.choice[1]", "guided_choice", "guided_choice[1]"),
    ("params.structured_output.choice[1]", "structured_outputs.choice", "structured_outputs.choice[1]"),
    ("params.structured_output", "guided_choice", "guided_choice"),
    ("params.min_tokens", "guided_regex", "min_tokens"),
])
def test_the_validators_structured_output_field_is_the_bodys(field: str, spec_param: str, param: str) -> None:
    assert invalid_body("completions", field, "x", spec_param).param == param
