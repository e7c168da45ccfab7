"""A ChatMessages, checked, as the chat template's inputs: messages (with earlier tool calls and their results),
tools, template variables, and whether the answer's tool calls are parsed (router/tool_calls.py).

Tools and calls reach the template as transformers passes them, which Qwen's templates expect: each tool as
{"type": "function", "function": {...}}, a call's arguments as an object (vLLM turns OpenAI's JSON text into
one the same way). Errors are InvalidRequest naming the field within ChatMessages (`tools[0].name`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format, struct_pb2

from engine.sampling_params import InvalidRequest
from proto import nanoserve_pb2 as pb

TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
TOOL_CHOICE_MODES = ("auto", "none")
NEEDS_STRUCTURED_OUTPUT = "needs structured output (grammar-constrained decoding), which tool calls do not use yet"


@dataclass(frozen=True, slots=True)
class ChatPrompt:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    template_kwargs: dict[str, Any]
    parse_tool_calls: bool  # tools given and tool_choice "auto": the answer's calls go apart from its text


def read_chat(chat: pb.ChatMessages) -> ChatPrompt:
    """The template's inputs from `chat`; InvalidRequest naming the field if they are not ones it can take."""
    tools = [_tool(tool, i) for i, tool in enumerate(chat.tools)]
    names = [tool["function"]["name"] for tool in tools]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise InvalidRequest(f"tools[{i}].name", f"{name!r} is named by an earlier tool too")
    return ChatPrompt([_message(m, i) for i, m in enumerate(chat.messages)], tools,
                      json_format.MessageToDict(chat.template_kwargs), _parse_tool_calls(chat, names))


def _parse_tool_calls(chat: pb.ChatMessages, names: list[str]) -> bool:
    """Whether to parse the answer's calls, from tool_choice (unset: "auto" with tools, "none" without)."""
    kind = chat.tool_choice.WhichOneof("choice")
    if kind == "function_name":
        raise InvalidRequest("tool_choice", f"a named function {NEEDS_STRUCTURED_OUTPUT}; use \"auto\"")
    mode = chat.tool_choice.mode if kind == "mode" else "auto" if names else "none"
    if mode == "required":
        raise InvalidRequest("tool_choice", f'"required" {NEEDS_STRUCTURED_OUTPUT}; use "auto"')
    if mode not in TOOL_CHOICE_MODES:
        raise InvalidRequest("tool_choice", f"unknown mode {mode!r}; this server takes {', '.join(TOOL_CHOICE_MODES)}")
    if mode == "auto" and not names:
        raise InvalidRequest("tool_choice", '"auto" needs tools')
    return mode == "auto"


def _tool(tool: pb.Tool, i: int) -> dict[str, Any]:
    if not TOOL_NAME.fullmatch(tool.name):
        raise InvalidRequest(f"tools[{i}].name", f"must be 1 to 64 letters, digits, underscores or dashes, got "
                             f"{tool.name!r}")
    function: dict[str, Any] = {"name": tool.name}
    if tool.description:
        function["description"] = tool.description
    if tool.HasField("parameters"):
        function["parameters"] = _json_value(tool.parameters)
    return {"type": "function", "function": function}


def _message(message: pb.ChatMessage, i: int) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        if message.role != "assistant":
            raise InvalidRequest(f"messages[{i}].tool_calls", f"only assistant messages carry tool calls, not "
                                 f"{message.role!r} ones")
        out["tool_calls"] = [_call(call, f"messages[{i}].tool_calls[{j}]") for j, call in enumerate(message.tool_calls)]
    if message.tool_call_id:
        if message.role != "tool":
            raise InvalidRequest(f"messages[{i}].tool_call_id", f"only tool messages answer a call, not "
                                 f"{message.role!r} ones")
        out["tool_call_id"] = message.tool_call_id
    return out


def _call(call: pb.ToolCall, field: str) -> dict[str, Any]:
    if not call.name:
        raise InvalidRequest(f"{field}.name", "must not be empty")
    try:
        arguments = json.loads(call.arguments or "{}")
    except ValueError as e:
        raise InvalidRequest(f"{field}.arguments", f"not valid JSON ({e})") from None
    if not isinstance(arguments, dict):
        raise InvalidRequest(f"{field}.arguments", f"must be a JSON object, got {call.arguments}")
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": arguments}}


def _json_value(struct: struct_pb2.Struct) -> Any:
    """A Struct as the JSON it came from: protobuf keeps every number as a double, JSON Schema means 2 by 2.0."""
    def whole(value: Any) -> Any:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, dict):
            return {k: whole(v) for k, v in value.items()}
        if isinstance(value, list):
            return [whole(v) for v in value]
        return value

    return whole(json_format.MessageToDict(struct))
