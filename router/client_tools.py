"""The client's `tools` and `tool_choice`, in OpenAI's shapes, as the ChatMessages fields they fill.

A tool is OpenAI's {"type": "function", "function": {"name", "description", "parameters", "strict"}}, the function
object alone, or a pb.Tool; tool_choice is "auto", "none", "required", OpenAI's {"type": "function", "function":
{"name": ...}}, or a pb.ToolChoice. Mistakes are TypeError/ValueError naming the argument (`tools[1].parameters`)
before anything is sent; whether the names and schemas suit the model is the router's to say (INVALID_ARGUMENT).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from proto import nanoserve_pb2 as pb

_FUNCTION_FIELDS = {"name": str, "description": str, "parameters": Mapping, "strict": bool}


def build_tools(tools: Sequence[Any]) -> list[pb.Tool]:
    """`tools` as pb.Tool messages, in order."""
    if isinstance(tools, (str, Mapping)) or not isinstance(tools, Sequence):
        raise TypeError(f"tools: expected a list of tools, got {tools!r}")
    return [_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools)]


def _tool(tool: Any, field: str) -> pb.Tool:
    if isinstance(tool, pb.Tool):
        return tool
    if not isinstance(tool, Mapping):
        raise TypeError(f"{field}: expected a dict, got {tool!r}")
    if "function" in tool:
        if tool.get("type", "function") != "function":
            raise ValueError(f"{field}.type: only 'function' tools exist, got {tool['type']!r}")
        tool, field = tool["function"], f"{field}.function"
        if not isinstance(tool, Mapping):
            raise TypeError(f"{field}: expected a dict, got {tool!r}")
    for name in sorted(tool.keys() - _FUNCTION_FIELDS.keys()):
        raise ValueError(f"{field}.{name}: unknown; a function has {', '.join(_FUNCTION_FIELDS)}")
    if "name" not in tool:
        raise ValueError(f"{field}.name: missing")
    for name, kind in _FUNCTION_FIELDS.items():
        if name in tool and not isinstance(tool[name], kind):
            raise TypeError(f"{field}.{name}: wrong type, got {tool[name]!r}")
    message = pb.Tool(name=tool["name"], description=tool.get("description", ""), strict=tool.get("strict", False))
    if "parameters" in tool:
        message.parameters.update(tool["parameters"])
    return message


def build_tool_choice(choice: Any) -> pb.ToolChoice:
    """`choice` as a pb.ToolChoice: a mode's name, or the function named in OpenAI's dict."""
    if isinstance(choice, pb.ToolChoice):
        return choice
    if isinstance(choice, str):
        return pb.ToolChoice(mode=choice)
    function = choice.get("function") if isinstance(choice, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise TypeError(f'tool_choice: expected "auto", "none", "required" or {{"type": "function", "function": '
                        f'{{"name": ...}}}}, got {choice!r}')
    return pb.ToolChoice(function_name=function["name"])
