"""ChatMessages read as the chat template's inputs (router/chat_prompt.py): tools, tool_choice and tool messages,
the grammar that holds the answer's calls to the tools, and each bad one named by its field."""

from __future__ import annotations

import pytest
from google.protobuf import json_format

from engine.sampling_params import InvalidRequest
from proto import nanoserve_pb2 as pb
from router.chat_prompt import read_chat
from router.tool_grammar import CallTags

TAGS = CallTags("<[151657]>", "<[151658]>", 151657)  # Qwen's <tool_call> and </tool_call> tokens

USER = pb.ChatMessage(role="user", content="Weather in Paris?")
CALL = pb.ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}')


def tool(name: str = "get_weather", strict: bool = False, **schema: object) -> pb.Tool:
    parameters = json_format.ParseDict(schema, pb.Tool().parameters) if schema else None
    return pb.Tool(name=name, description="Weather in a city.", parameters=parameters, strict=strict)


def chat(*messages: pb.ChatMessage, tools: tuple[pb.Tool, ...] = (tool(),), **choice: str) -> pb.ChatMessages:
    return pb.ChatMessages(messages=messages or [USER], tools=tools, tool_choice=pb.ToolChoice(**choice))


def test_tools_and_an_exchange_reach_the_template_as_transformers_passes_them() -> None:
    exchange = chat(USER, pb.ChatMessage(role="assistant", tool_calls=[CALL]),
                    pb.ChatMessage(role="tool", content="sunny", tool_call_id="call_1"),
                    tools=(tool(type="object", properties={"days": {"type": "integer", "maximum": 7}}),))
    prompt = read_chat(exchange, TAGS)
    assert prompt.tools == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city.",
        "parameters": {"type": "object", "properties": {"days": {"type": "integer", "maximum": 7}}}}}]
    assert isinstance(prompt.tools[0]["function"]["parameters"]["properties"]["days"]["maximum"], int)  # not 7.0
    assert prompt.messages[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    assert prompt.messages[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}


@pytest.mark.parametrize(("choice", "tools", "parsed", "held"), [
    ({}, (tool(),), True, None), ({"mode": "auto"}, (tool(),), True, None), ({"mode": "none"}, (tool(),), False, None),
    ({}, (), False, None), ({"mode": "none"}, (), False, None),
    ({"mode": "required"}, (tool(), tool("f")), True, 'start: call ("\\n" call)*'),
    ({"function_name": "f"}, (tool(), tool("f")), True, "start: call\n"),
    ({"mode": "auto"}, (tool(strict=True), tool("f")), True, "start: text (call text)*"),
    ({"mode": "none"}, (tool(strict=True),), False, None),
])
def test_tool_choice_decides_whether_calls_are_parsed_and_held_to_the_tools(
    choice: dict[str, str], tools: tuple[pb.Tool, ...], parsed: bool, held: str | None
) -> None:
    prompt = read_chat(chat(tools=tools, **choice), TAGS)
    assert prompt.parse_tool_calls is parsed
    assert len(prompt.tools) == len(tools)  # "none" still describes the tools to the model (vLLM's default)
    grammar = prompt.tool_grammar.grammar if prompt.tool_grammar else None
    assert (grammar or "").startswith(held or "") and (grammar is None) == (held is None)
    if "function_name" in choice:  # only the named tool's call
        assert '"const": "f"' in (grammar or "") and '"const": "get_weather"' not in (grammar or "")


@pytest.mark.parametrize(("request_", "field", "message"), [
    (chat(mode="sometimes"), "tool_choice", "unknown mode 'sometimes'; this server takes auto, none, required"),
    (chat(function_name="get_time"), "tool_choice.function_name", "'get_time' is not one of the tools"),
    (chat(tools=(), mode="auto"), "tool_choice", "'auto' needs tools"),
    (chat(tools=(), mode="required"), "tool_choice", "'required' needs tools"),
    (chat(tools=(tool(type="object", properties={"days": {"type": "integr"}}),), mode="required"),
     "tools[0].parameters", "not a JSON Schema this server can enforce"),
    (chat(tools=(tool(), tool("f", strict=True, type="object", required=7))), "tools[1].parameters",
     "not a JSON Schema"),
    (chat(tools=(tool("get weather"),)), "tools[0].name", "must be 1 to 64 letters, digits, underscores or dashes"),
    (chat(tools=(tool(""),)), "tools[0].name", "must be 1 to 64"),
    (chat(tools=(tool(), tool("f"), tool())), "tools[2].name", "'get_weather' is named by an earlier tool too"),
    (chat(USER, pb.ChatMessage(role="user", content="x", tool_calls=[CALL])), "messages[1].tool_calls",
     "only assistant messages carry tool calls"),
    (chat(pb.ChatMessage(role="user", content="x", tool_call_id="call_1")), "messages[0].tool_call_id",
     "only tool messages answer a call"),
    (chat(USER, pb.ChatMessage(role="assistant", tool_calls=[pb.ToolCall(id="c", name="f", arguments="{x}")])),
     "messages[1].tool_calls[0].arguments", "not valid JSON"),
    (chat(USER, pb.ChatMessage(role="assistant", tool_calls=[pb.ToolCall(id="c", name="f", arguments="[1]")])),
     "messages[1].tool_calls[0].arguments", "must be a JSON object, got [1]"),
    (chat(USER, pb.ChatMessage(role="assistant", tool_calls=[pb.ToolCall(id="c", arguments="{}")])),
     "messages[1].tool_calls[0].name", "must not be empty"),
])
def test_bad_tools_and_tool_messages_are_named(request_: pb.ChatMessages, field: str, message: str) -> None:
    with pytest.raises(InvalidRequest) as error:
        read_chat(request_, TAGS)
    assert error.value.field == field and error.value.message.startswith(message)


def test_a_schema_is_only_checked_where_calls_are_held_to_it() -> None:
    """Under "auto" without strict nothing holds the calls (vLLM's behaviour), so a schema llguidance cannot
    enforce is no error there."""
    odd = tool(type="object", properties={"days": {"type": "integr"}})
    assert read_chat(chat(tools=(odd,)), TAGS).tool_grammar is None


def test_strict_tools_need_the_call_tag_as_a_token() -> None:
    with pytest.raises(InvalidRequest) as error:
        read_chat(chat(tools=(tool(), tool("f", strict=True))), CallTags('"<tool_call>"', '"</tool_call>"', None))
    assert error.value.field == "tools[1].strict"
    spelled = read_chat(chat(mode="required"), CallTags('"<tool_call>"', '"</tool_call>"', None)).tool_grammar
    assert spelled is not None and 'call: "<tool_call>" "\\n"' in spelled.grammar
