"""OpenAI request bodies (/v1/completions, /v1/chat/completions) read into the router's GenerateRequest.

This module checks what JSON leaves open: types, OpenAI's spellings, and fields this server does not
implement. Value ranges are checked once, by the validator both front doors share; its errors name
GenerateRequest's fields, which `invalid_body` renames to the body's.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from proto import nanoserve_pb2 as pb
from router.invalid_body import InvalidBody, as_json
from router.openai_structured_output import FIELDS as STRUCTURED_OUTPUT_FIELDS
from router.openai_structured_output import body_param, read_structured_output

Endpoint = Literal["completions", "chat"]

_INT64 = range(-(2**63), 2**63)
_NUMBER_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
_INT_FIELDS = ("top_k", "seed", "min_tokens", "n")
_COMMON_FIELDS = frozenset({"model", "max_tokens", *_NUMBER_FIELDS, *_INT_FIELDS, "stop", "stop_token_ids",
                            "ignore_eos", "stream", "stream_options", "logprobs", "logit_bias",
                            "allowed_token_ids", *STRUCTURED_OUTPUT_FIELDS})
_FIELDS: dict[Endpoint, frozenset[str]] = {
    "completions": _COMMON_FIELDS | {"prompt"},
    "chat": _COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "chat_template_kwargs", "tools",
                              "tool_choice"},
}
# Fields that change the answer but are not implemented here (tools: by completions): accepted only at a value
# that changes nothing.
_NO_OP_VALUES: dict[str, tuple[object, ...]] = {
    "best_of": (1,), "echo": (False,),
    "suffix": ("",), "tools": ([],), "functions": ([],), "tool_choice": ("none", "auto"),
    "parallel_tool_calls": (True, False),
}
_IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier"})  # they do not change the answer
_MESSAGE_FIELDS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id"})
# The shared validator's field names -> the body's, first match wins.
_RENAMES = (("params.", ""), ("token_ids.ids", "prompt"), ("token_ids", "prompt"), ("text", "prompt"),
            ("chat.messages", "messages"), ("chat.template_kwargs", "chat_template_kwargs"), ("chat.tools", "tools"),
            ("chat.tool_choice.function_name", "tool_choice.function.name"), ("chat.tool_choice", "tool_choice"))


@dataclass(frozen=True, slots=True)
class ApiRequest:
    """One OpenAI request, read: what to generate, and how to answer it."""

    endpoint: Endpoint
    model: str | None  # None: the served model
    generate: pb.GenerateRequest
    stream: bool
    include_usage: bool  # streaming: end with a chunk that carries usage
    logprobs: bool  # answer with log-probabilities
    max_tokens_to_context_end: bool  # no max_tokens given to chat: all the context leaves after the prompt
    structured_output_param: str | None = None  # the body field its structured output came from, for errors


def read_request(endpoint: Endpoint, body: object) -> ApiRequest:
    """The request a body describes; InvalidBody naming the field if it is not one this server can run."""
    if not isinstance(body, dict):
        raise InvalidBody(None, "the request body must be a JSON object")
    _check_fields(endpoint, body)
    given = {name: value for name, value in body.items() if value is not None}  # null means unset
    request = pb.GenerateRequest(request_id=uuid.uuid4().hex)
    if endpoint == "chat":
        request.chat.CopyFrom(_messages(given))
        kwargs = given.get("chat_template_kwargs", {})
        if not isinstance(kwargs, dict):
            raise InvalidBody("chat_template_kwargs", f"must be an object, got {as_json(kwargs)}")
        request.chat.template_kwargs.update(kwargs)
        _tools(given, request.chat)
    else:
        _prompt(given, request)
    logprobs = _sampling(endpoint, given, request.params)
    spec_param = read_structured_output(given, request.params.structured_output)
    stream = _bool(given, "stream") if "stream" in given else False
    return ApiRequest(endpoint, _str(given, "model") if "model" in given else None, request, stream,
                      _include_usage(given, stream), logprobs,
                      max_tokens_to_context_end=endpoint == "chat" and not request.params.HasField("max_tokens"),
                      structured_output_param=spec_param)


def invalid_body(endpoint: Endpoint, field: str, message: str,
                 structured_output_param: str | None = None) -> InvalidBody:
    """The validator's error about a GenerateRequest field, about the body's field instead (`structured_output_param`:
    ApiRequest's, the body field of its structured output)."""
    spec_field = body_param(field, structured_output_param)
    if spec_field is not None:
        return InvalidBody(spec_field, message)
    for old, new in _RENAMES:
        if field.startswith(old):
            field = _in_function(new + field[len(old):])
            break
    if endpoint == "chat" and field.startswith("prompt"):
        field = "messages" + field[len("prompt"):]
    return InvalidBody(field, message)


def _in_function(field: str) -> str:
    """A Tool's or ToolCall's field as the body nests it: `tools[0].name` -> `tools[0].function.name`."""
    parts = field.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if parts[i - 1].startswith(("tools[", "tool_calls[")):
            parts.insert(i, "function")
    return ".".join(parts)


def _check_fields(endpoint: Endpoint, body: dict[str, Any]) -> None:
    for name, value in body.items():
        if name in _FIELDS[endpoint] or name in _IGNORED_FIELDS or value is None:
            continue
        if name not in _NO_OP_VALUES:
            raise InvalidBody(name, f"unknown field; this server takes {', '.join(sorted(_FIELDS[endpoint]))}")
        if not any(value == ok and isinstance(value, bool) == isinstance(ok, bool) for ok in _NO_OP_VALUES[name]):
            allowed = " or ".join(as_json(ok) for ok in _NO_OP_VALUES[name])
            raise InvalidBody(name, f"not supported by this server (only {allowed}), got {as_json(value)}")


def _prompt(given: dict[str, Any], request: pb.GenerateRequest) -> None:
    if "prompt" not in given:
        raise InvalidBody("prompt", "required")
    prompt = given["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        request.text = prompt
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        request.token_ids.ids.extend(_token_ids("prompt", prompt))
    elif isinstance(prompt, list) and all(isinstance(p, (str, list)) for p in prompt):
        raise InvalidBody("prompt", f"one prompt per request, got {len(prompt)}: send each as its own request")
    else:
        raise InvalidBody("prompt", "must be a string or a list of token ids")


def _messages(given: dict[str, Any]) -> pb.ChatMessages:
    messages = given.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidBody("messages", "must be a non-empty list of {role, content} objects")
    chat = pb.ChatMessages()
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidBody(f"messages[{i}]", "must be an object with role and content")
        for name in message.keys() - _MESSAGE_FIELDS:
            raise InvalidBody(f"messages[{i}].{name}", "not supported by this server (messages take role, content, "
                              "name, tool_calls and tool_call_id)")
        role = _str(message, "role", f"messages[{i}].role")
        added = chat.messages.add(role="system" if role == "developer" else role, content=_content(message, i))
        if message.get("tool_call_id") is not None:
            added.tool_call_id = _str(message, "tool_call_id", f"messages[{i}].tool_call_id")
        for j, call in enumerate(_list(message, "tool_calls", f"messages[{i}].tool_calls")):
            added.tool_calls.append(_tool_call(call, f"messages[{i}].tool_calls[{j}]"))
    return chat


def _tools(given: dict[str, Any], chat: pb.ChatMessages) -> None:
    """OpenAI's function tools and tool_choice (a mode, or {"type": "function", "function": {"name": ...}})."""
    for i, tool in enumerate(_list(given, "tools")):
        field = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise InvalidBody(field, 'must be {"type": "function", "function": {"name": ...}}')
        function = tool["function"]
        for name in function.keys() - {"name", "description", "parameters", "strict"}:
            raise InvalidBody(f"{field}.function.{name}", "unknown field (functions take name, description, "
                              "parameters and strict)")
        added = chat.tools.add(name=_str(function, "name", f"{field}.function.name"))
        if function.get("strict") is not None:
            added.strict = _bool(function, "strict", f"{field}.function.strict")
        if function.get("description") is not None:
            added.description = _str(function, "description", f"{field}.function.description")
        if function.get("parameters") is not None:
            if not isinstance(function["parameters"], dict):
                raise InvalidBody(f"{field}.function.parameters", "must be a JSON Schema object")
            added.parameters.update(function["parameters"])
    choice = given.get("tool_choice")
    if isinstance(choice, str):
        chat.tool_choice.mode = choice
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        chat.tool_choice.function_name = _str(choice["function"], "name", "tool_choice.function.name")
    elif choice is not None:
        raise InvalidBody("tool_choice", f'must be "auto", "none", "required" or {{"type": "function", "function": '
                          f'{{"name": ...}}}}, got {as_json(choice)}')


def _tool_call(call: object, field: str) -> pb.ToolCall:
    """One of an assistant message's tool_calls: {"id", "type": "function", "function": {"name", "arguments"}}."""
    if not isinstance(call, dict) or call.get("type", "function") != "function" or not isinstance(
            call.get("function"), dict):
        raise InvalidBody(field, 'must be {"id": ..., "type": "function", "function": {"name": ..., "arguments": ...}}')
    function = call["function"]
    return pb.ToolCall(id=_str(call, "id", f"{field}.id") if "id" in call else "",
                       name=_str(function, "name", f"{field}.function.name"),
                       arguments=_str(function, "arguments", f"{field}.function.arguments"))


def _content(message: dict[str, Any], i: int) -> str:
    """A message's text: a string, or a list of text parts (joined by newlines); none for an assistant's calls."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if content is None and message.get("tool_calls"):
        return ""
    if not isinstance(content, list):
        raise InvalidBody(f"messages[{i}].content", "must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise InvalidBody(f"messages[{i}].content[{j}]", f"only text parts are supported, got type {as_json(kind)}")
        texts.append(part["text"])
    return "\n".join(texts)


def _sampling(endpoint: Endpoint, given: dict[str, Any], params: pb.SamplingParams) -> bool:
    """Fill the sampling parameters; whether the answer carries logprobs."""
    for name in _NUMBER_FIELDS:
        if name in given:
            setattr(params, name, _number(given, name))
    for name in _INT_FIELDS:
        if name in given:
            setattr(params, name, _int(given, name))
    if "ignore_eos" in given:
        params.ignore_eos = _bool(given, "ignore_eos")
    if "stop" in given:
        stop = given["stop"]
        params.stop.extend([stop] if isinstance(stop, str) else _strs(given, "stop"))
    if "stop_token_ids" in given:
        params.stop_token_ids.extend(_token_ids("stop_token_ids", given["stop_token_ids"]))
    if "logit_bias" in given:
        params.logit_bias.update(_logit_bias(given["logit_bias"]))
    if "allowed_token_ids" in given:
        if given["allowed_token_ids"] == []:
            raise InvalidBody("allowed_token_ids", "must not be empty (leave it out to allow every token)")
        params.allowed_token_ids.extend(_token_ids("allowed_token_ids", given["allowed_token_ids"]))
    _max_tokens(endpoint, given, params)
    return _logprobs(endpoint, given, params)


def _logit_bias(value: object) -> dict[int, float]:
    """OpenAI's logit_bias: an object whose keys are token ids as strings and whose values are numbers."""
    if not isinstance(value, dict):
        raise InvalidBody("logit_bias", f"must be an object of token id -> bias, got {as_json(value)}")
    bias = {}
    for key in value:
        if not key.isdecimal() or int(key) not in _INT64:
            raise InvalidBody("logit_bias", f"keys must be token ids (decimal integers), got {as_json(key)}")
        bias[int(key)] = _number(value, key, f"logit_bias[{key}]")
    return bias


def _max_tokens(endpoint: Endpoint, given: dict[str, Any], params: pb.SamplingParams) -> None:
    """Completions default to 16 tokens (OpenAI's default); chat answers to the end of the context, which
    only the tokenized prompt tells (ApiRequest.max_tokens_to_context_end)."""
    if endpoint == "chat" and "max_completion_tokens" in given:
        params.max_tokens = _int(given, "max_completion_tokens")
    elif "max_tokens" in given:
        params.max_tokens = _int(given, "max_tokens")


def _logprobs(endpoint: Endpoint, given: dict[str, Any], params: pb.SamplingParams) -> bool:
    """Completions: logprobs=N (the top N alternatives). Chat: logprobs=true, with top_logprobs=N alternatives."""
    if endpoint == "completions":
        if "logprobs" in given:
            params.logprobs = _int(given, "logprobs")
        return "logprobs" in given
    wanted = _bool(given, "logprobs") if "logprobs" in given else False
    if "top_logprobs" in given:
        top = _int(given, "top_logprobs")
        if not wanted:
            raise InvalidBody("top_logprobs", "needs logprobs: true")
        if not 0 <= top <= 20:
            raise InvalidBody("top_logprobs", f"must be in [0, 20], got {top}")
        params.logprobs = top
    elif wanted:
        params.logprobs = 0
    return wanted


def _include_usage(given: dict[str, Any], stream: bool) -> bool:
    options = given.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise InvalidBody("stream_options", "only allowed with stream: true")
    if not isinstance(options, dict):
        raise InvalidBody("stream_options", "must be an object")
    for name in options.keys() - {"include_usage"}:
        raise InvalidBody(f"stream_options.{name}", "unknown option (this server takes include_usage)")
    return _bool(options, "include_usage", "stream_options.include_usage") if "include_usage" in options else False


def _number(given: dict[str, Any], name: str, param: str | None = None) -> float:
    """given[name] as a float; `param` names it in the error (default: `name`)."""
    value = given[name]
    # Python's json module reads NaN and Infinity, which JSON itself has no spelling for.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidBody(param or name, f"must be a finite number, got {as_json(value)}")
    return float(value)


def _int(given: dict[str, Any], name: str) -> int:
    value = given[name]
    if isinstance(value, bool) or not isinstance(value, int) or value not in _INT64:
        raise InvalidBody(name, f"must be a 64-bit integer, got {as_json(value)}")
    return value


def _bool(given: dict[str, Any], name: str, param: str | None = None) -> bool:
    value = given[name]
    if not isinstance(value, bool):
        raise InvalidBody(param or name, f"must be true or false, got {as_json(value)}")
    return value


def _str(given: dict[str, Any], name: str, param: str | None = None) -> str:
    value = given.get(name)
    if not isinstance(value, str):
        raise InvalidBody(param or name, f"must be a string, got {as_json(value)}")
    return value


def _strs(given: dict[str, Any], name: str) -> list[str]:
    value = given[name]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise InvalidBody(name, "must be a string or a list of strings")
    return value


def _list(given: dict[str, Any], name: str, param: str | None = None) -> list[Any]:
    """given[name] as a list; [] when unset or null."""
    value = given.get(name)
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidBody(param or name, f"must be a list, got {as_json(value)}")
    return value


def _token_ids(name: str, value: object) -> list[int]:
    if not isinstance(value, list):
        raise InvalidBody(name, "must be a list of token ids")
    for i, t in enumerate(value):
        if isinstance(t, bool) or not isinstance(t, int) or t not in _INT64:
            raise InvalidBody(f"{name}[{i}]", f"must be a token id (an integer), got {as_json(t)}")
    return value
