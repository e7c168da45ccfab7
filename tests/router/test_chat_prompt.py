"""ChatMessages read as the chat template's inputs (router/chat_prompt.py): tools, tool_choice and tool messages,
and each bad one named by its field."""

from __future__ import annotations

import pytest
from google.protobuf import json_format

from engine.sampling_params import InvalidRequest
from proto import nanoserve_pb2 as pb
from router.chat_prompt import read_chat

USER = pb.ChatMessage(role="user", content="Weather in Paris?")
CALL = pb.ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}')


def tool(name: str = "get_weather", **schema: object) -> pb.Tool:
    parameters = json_format.ParseDict(schema, pb.Tool().parameters) if schema else None
    return pb.Tool(name=name, description="Weather in a city.", parameters=parameters)


def chat(*messages: pb.ChatMessage, tools: tuple[pb.Tool, ...] = (tool(),), **choice: str) -> pb.ChatMessages:
    return pb.ChatMessages(messages=messages or [USER], tools=tools, tool_choice=pb.ToolChoice(**choice))


def test_tools_and_an_exchange_reach_the_template_as_transformers_passes_them() -> None:
    exchange = chat(USER, pb.ChatMessage(role="assistant", tool_calls=[CALL]),
                    pb.ChatMessage(role="tool", content="sunny", tool_call_id="call_1"),
                    tools=(tool(type="object", properties={"days": {"type": "integer", "maximum": 7}}),))
    prompt = read_chat(exchange)
    assert prompt.tools == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city.",
        "parameters": {"type": "object", "properties": {"days": {"type": "integer", "maximum": 7}}}}}]
    assert isinstance(prompt.tools[0]["function"]["parameters"]["properties"]["days"]["maximum"], int)  # not 7.0
    assert prompt.messages[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    assert prompt.messages[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}


@pytest.mark.parametrize(("choice", "tools", "parsed"), [
    ({}, (tool(),), True), ({"mode": "auto"}, (tool(),), True), ({"mode": "none"}, (tool(),), False),
    ({}, (), False), ({"mode": "none"}, (), False),
])
def test_tool_choice_decides_whether_calls_are_parsed(choice: dict[str, str], tools: tuple[pb.Tool, ...],
                                                      parsed: bool) -> None:
    prompt = read_chat(chat(tools=tools, **choice))
    assert prompt.parse_tool_calls is parsed
    assert len(prompt.tools) == len(tools)  # "none" still describes the tools to the model (vLLM's default)


@pytest.mark.parametrize(("request_", "field", "message"), [
    (chat(mode="sometimes"), "tool_choice", "unknown mode 'sometimes'; this server takes auto, none"),
    (chat(mode="required"), "tool_choice", '"required" needs structured output'),
    (chat(function_name="get_weather"), "tool_choice", "a named function needs structured output"),
    (chat(tools=(), mode="auto"), "tool_choice", '"auto" needs tools'),
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
        read_chat(request_)
    assert error.value.field == field and error.value.message.startswith(message)
