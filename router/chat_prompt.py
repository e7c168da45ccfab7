"""A ChatMessages, checked, as the chat template's inputs: messages (with earlier tool calls and their results),
tools, template variables, whether the answer's tool calls are parsed (router/tool_calls.py), and the grammar
that holds those calls to the tools where tool_choice or a strict tool asks for it (router/tool_grammar.py).

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

from engine.grammar_text import check_grammar
from engine.sampling_params import InvalidRequest
from engine.structured_output import StructuredOutput
from proto import nanoserve_pb2 as pb
from router.tool_grammar import CallTags, named_call, required_calls, strict_calls

TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
TOOL_CHOICE_MODES = ("auto", "none", "required")


@dataclass(frozen=True, slots=True)
class ChatPrompt:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    template_kwargs: dict[str, Any]
    parse_tool_calls: bool  # tools given and tool_choice not "none": the answer's calls go apart from its text
    tool_grammar: StructuredOutput | None  # what the answer's calls must match, when tool_choice or strict asks


def read_chat(chat: pb.ChatMessages, tags: CallTags) -> ChatPrompt:
    """The template's inputs from `chat`; InvalidRequest naming the field if they are not ones it can take.
    `tags`: how the served vocabulary spells the call tags, for the tool grammar."""
    tools = [_tool(tool, i) for i, tool in enumerate(chat.tools)]
    names = [tool["function"]["name"] for tool in tools]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise InvalidRequest(f"tools[{i}].name", f"{name!r} is named by an earlier tool too")
    mode = _tool_choice(chat, names)
    return ChatPrompt([_message(m, i) for i, m in enumerate(chat.messages)], tools,
                      json_format.MessageToDict(chat.template_kwargs), mode != "none",
                      _tool_grammar(chat, tools, mode, tags))


def _tool_choice(chat: pb.ChatMessages, names: list[str]) -> str:
    """tool_choice's mode ("function" for a named one; unset: "auto" with tools, "none" without)."""
    kind = chat.tool_choice.WhichOneof("choice")
    if kind == "function_name":
        name = chat.tool_choice.function_name
        if name not in names:
            known = ", ".join(names) or "none"
            raise InvalidRequest("tool_choice.function_name", f"{name!r} is not one of the tools (tools: {known})")
        return "function"
    mode = chat.tool_choice.mode if kind == "mode" else "auto" if names else "none"
    if mode not in TOOL_CHOICE_MODES:
        raise InvalidRequest("tool_choice", f"unknown mode {mode!r}; this server takes {', '.join(TOOL_CHOICE_MODES)} "
                             "or a function's name")
    if mode != "none" and not names:
        raise InvalidRequest("tool_choice", f"{mode!r} needs tools")
    return mode


def _tool_grammar(chat: pb.ChatMessages, tools: list[dict[str, Any]], mode: str,
                  tags: CallTags) -> StructuredOutput | None:
    """The grammar of the answer's calls: "required" and a named function hold every call to its tool's
    parameters; under "auto", tools marked strict hold theirs; otherwise none."""
    if mode == "required":
        _check_parameters(tools, {tool.name for tool in chat.tools})
        return required_calls(tools, tags)
    if mode == "function":
        name = chat.tool_choice.function_name
        _check_parameters(tools, {name})
        return named_call(next(t for t in tools if t["function"]["name"] == name), tags)
    strict = {tool.name for tool in chat.tools if tool.strict}
    if mode == "auto" and strict:
        _check_parameters(tools, strict)
        first = next(i for i, tool in enumerate(chat.tools) if tool.strict)
        return strict_calls(tools, strict, tags, f"tools[{first}].strict")
    return None


def _check_parameters(tools: list[dict[str, Any]], held: set[str]) -> None:
    """The parameters of the tools whose calls the grammar holds to them are JSON Schemas llguidance enforces."""
    for i, tool in enumerate(tools):
        function = tool["function"]
        if function["name"] in held and "parameters" in function:
            try:
                check_grammar(StructuredOutput(json_schema=function["parameters"]))
            except InvalidRequest as e:
                raise InvalidRequest(f"tools[{i}].parameters", f"not a JSON Schema this server can enforce: "
                                     f"{e.message}") from None


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
    """A Struct as the JSON it came from: protobuf keeps every number as a double, JSON Schema means 2 by 2.0.
    Keys are sorted: a Struct's map order varies from process to process, and the rendered prompt must not."""
    def whole(value: Any) -> Any:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, dict):
            return {k: whole(value[k]) for k in sorted(value)}
        if isinstance(value, list):
            return [whole(v) for v in value]
        return value

    return whole(json_format.MessageToDict(struct))
