"""Structured output and tool calls held to their tools, through both front doors of a real router (2 replicas of
the embedded tiny Qwen3, random weights): the official openai client's response_format, vLLM's extras and
tool_choice required / named / strict, and gRPC's StructuredOutput. Unconstrained, the random model writes
gibberish; every answer here parses because the grammar forces it. The router splits reasoning (Qwen3's parser) and
the embedded template thinks by default, so a chat answer may reason before the part its grammar holds."""

from __future__ import annotations

import json
import re
from typing import Any

import grpc
import jsonschema
import openai
import pytest

from proto import nanoserve_pb2 as pb
from proto import nanoserve_pb2_grpc as pb_grpc
from tests.router.http_api.calls import grpc_complete, post
from tests.serving import RouterThread

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                   "role": {"enum": ["admin", "user"]}},
    "required": ["name", "age", "role"], "additionalProperties": False,
}
REGEX, CHOICE = r"[a-c]{3}-[0-9]{2,4}", ["yes", "no", "maybe not"]
MESSAGES: list[Any] = [{"role": "user", "content": "Weather in Paris, and the time?"}]
WEATHER: dict[str, Any] = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}
TIME: dict[str, Any] = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["CET", "UTC"]}}, "required": ["zone"],
    "additionalProperties": False}}}
PARAMETERS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (WEATHER, TIME)}
MODES = pytest.mark.parametrize("mode", [dict(temperature=0.0), dict(temperature=1.0, seed=5)],
                                ids=["greedy", "seeded"])



def token_bias(router: RouterThread, *texts: str, bias: float = 8.0) -> dict[str, float]:
    """OpenAI's logit_bias towards the first token of each text."""
    assert router.router.core is not None
    return {str(router.router.core.tokenizer.encode(text)[0]): bias for text in texts}


@MODES
def test_json_schema_output_validates_through_both_front_doors(router: RouterThread, client: openai.OpenAI,
                                                               model: str, mode: dict[str, Any]) -> None:
    answer = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=120, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}, **mode)
    [choice] = answer.choices
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content or ""), SCHEMA)
    via_grpc = grpc_complete(router, MESSAGES, max_tokens=120, structured_output={"json_schema": SCHEMA}, **mode)
    assert via_grpc.text == choice.message.content
    for extra in ({"guided_json": SCHEMA}, {"structured_outputs": {"json": json.dumps(SCHEMA)}}):
        completion = client.completions.create(model=model, prompt="Hello", max_tokens=120, extra_body=extra, **mode)
        jsonschema.validate(json.loads(completion.choices[0].text), SCHEMA)
    streamed = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=120, stream=True,
                                              response_format={"type": "json_schema", "json_schema": {
                                                  "name": "person", "schema": SCHEMA}}, **mode)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed) == choice.message.content


def test_json_object_output_is_an_object(router: RouterThread, client: openai.OpenAI, model: str) -> None:
    """Any object: a pull towards '"' and '}' ends the random model's free-form strings and objects."""
    for seed in range(2):
        answer = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=200, seed=seed,
                                                temperature=1.0, response_format={"type": "json_object"},
                                                logit_bias=token_bias(router, '"', "}", bias=16.0))  # type: ignore
        assert answer.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(answer.choices[0].message.content or ""), dict)


@MODES
def test_regex_and_choice_outputs_match(router: RouterThread, client: openai.OpenAI, model: str,
                                        mode: dict[str, Any]) -> None:
    for extra in ({"guided_regex": REGEX}, {"structured_outputs": {"regex": REGEX}}):
        text = client.completions.create(model=model, prompt="Hello", max_tokens=20, extra_body=extra, **mode)
        assert re.fullmatch(REGEX, text.choices[0].text)
    for extra in ({"guided_choice": CHOICE}, {"structured_outputs": {"choice": CHOICE}}):
        chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=20, extra_body=extra, **mode)
        assert chat.choices[0].message.content in CHOICE
    via_grpc = grpc_complete(router, "Hello", max_tokens=20, structured_output={"regex": REGEX}, **mode)
    assert re.fullmatch(REGEX, via_grpc.text)


def calls_of(message: Any) -> list[tuple[str, dict[str, Any]]]:
    """A message's tool calls as (name, arguments), each call's arguments checked against its tool's parameters."""
    calls = [(call.function.name, json.loads(call.function.arguments)) for call in message.tool_calls or []]
    for name, arguments in calls:
        jsonschema.validate(arguments, PARAMETERS[name])
    return calls


@MODES
def test_tool_choice_required_answers_with_calls_of_the_tools(router: RouterThread, client: openai.OpenAI, model: str,
                                                             mode: dict[str, Any]) -> None:
    eos = token_bias(router, "<|im_end|>", bias=10.0)  # once a call is complete, end rather than call again
    body: dict[str, Any] = dict(model=model, messages=MESSAGES, tools=[WEATHER, TIME], max_tokens=120,
                                logit_bias=eos, **mode)
    answer = client.chat.completions.create(tool_choice="required", **body)
    [choice] = answer.choices
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    calls = calls_of(choice.message)
    assert calls and {name for name, _ in calls} <= set(PARAMETERS)
    streamed = list(client.chat.completions.create(tool_choice="required", stream=True, **body))
    deltas = [call for chunk in streamed for call in chunk.choices[0].delta.tool_calls or []]
    assert [(d.function.name, json.loads(d.function.arguments)) for d in deltas] == calls  # type: ignore[union-attr]
    auto = client.chat.completions.create(tool_choice="auto", **body)  # the control: unheld, no call is made
    assert not auto.choices[0].message.tool_calls and auto.choices[0].finish_reason != "tool_calls"


def test_a_named_function_is_the_one_call(router: RouterThread, client: openai.OpenAI, model: str) -> None:
    answer = client.chat.completions.create(model=model, messages=MESSAGES, tools=[WEATHER, TIME], max_tokens=80,
                                            temperature=1.0, seed=3,
                                            tool_choice={"type": "function", "function": {"name": "get_time"}})
    [call] = calls_of(answer.choices[0].message)
    assert call[0] == "get_time" and answer.choices[0].finish_reason == "tool_calls"
    chat = pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in MESSAGES],
                           tool_choice=pb.ToolChoice(function_name="get_time"))
    for name, parameters in PARAMETERS.items():  # the same tools, so the same prompt
        chat.tools.add(name=name).parameters.update(parameters)
    with grpc.insecure_channel(router.address) as channel:
        request = pb.GenerateRequest(chat=chat, params=pb.SamplingParams(max_tokens=80, temperature=1.0, seed=3))
        whole = pb_grpc.NanoServeStub(channel).Complete(request, timeout=120)
    [grpc_call] = whole.tool_calls
    assert grpc_call.name == "get_time" and json.loads(grpc_call.arguments) == call[1]


def test_strict_tools_hold_the_calls_the_model_opens(router: RouterThread, client: openai.OpenAI, model: str) -> None:
    """Under "auto" the model writes what it likes; a pull towards <tool_call> makes it open calls, and a strict
    tool's arguments then match its parameters (the control: not strict, the random model's calls do not parse)."""
    def answer(strict: bool) -> Any:
        tools = [{"type": "function", "function": {**WEATHER["function"], "strict": strict}}]
        return client.chat.completions.create(model=model, messages=MESSAGES, tools=tools, max_tokens=100,  # type: ignore
                                              temperature=0.0, logit_bias=token_bias(router, "<tool_call>", bias=20.0))

    held = answer(strict=True).choices[0].message
    assert calls_of(held) and all(name == "get_weather" for name, _ in calls_of(held))
    assert not answer(strict=False).choices[0].message.tool_calls


def thinking_pull(router: RouterThread, close: float) -> dict[str, float]:
    """A pull that opens a <think> span at once, and (`close` > 0) towards closing it after some tokens."""
    pull = token_bias(router, "<think>", bias=100.0)
    return {**pull, **token_bias(router, "</think>", bias=close)} if close else pull


def test_a_thinking_answer_reasons_then_matches_the_schema(router: RouterThread, client: openai.OpenAI,
                                                           model: str) -> None:
    """Thinking on, the answer may open with reasoning, which comes back as reasoning_content, and the content after
    it validates; the control: thinking off, the same pull cannot open a span and the content is JSON throughout."""
    body: dict[str, Any] = dict(model=model, messages=MESSAGES, max_tokens=120, temperature=1.0, seed=5,
                                response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}},
                                logit_bias={**thinking_pull(router, close=12.0), **token_bias(router, '"', "}")})
    [thought] = client.chat.completions.create(**body).choices
    assert thought.message.model_dump()["reasoning_content"] and thought.finish_reason == "stop"
    jsonschema.validate(json.loads(thought.message.content or ""), SCHEMA)
    [off] = client.chat.completions.create(**body, extra_body={"chat_template_kwargs": {"enable_thinking": False}}
                                           ).choices
    assert not off.message.model_dump().get("reasoning_content") and off.finish_reason == "stop"
    jsonschema.validate(json.loads(off.message.content or ""), SCHEMA)


def test_a_thinking_answer_reasons_then_makes_the_required_call(router: RouterThread, client: openai.OpenAI,
                                                                model: str) -> None:
    """The same for a forced call: reasoning, then calls held to the tools; thinking off, calls from the start."""
    pull = {**thinking_pull(router, close=12.0), **token_bias(router, "<|im_end|>", bias=10.0)}
    answer = client.chat.completions.create(model=model, messages=MESSAGES, tools=[WEATHER, TIME], max_tokens=120,
                                            tool_choice="required", temperature=1.0, seed=1, logit_bias=pull)
    [choice] = answer.choices
    assert choice.message.model_dump()["reasoning_content"] and choice.finish_reason == "tool_calls"
    assert calls_of(choice.message) and not choice.message.content
    off = client.chat.completions.create(model=model, messages=MESSAGES, tools=[WEATHER, TIME], max_tokens=120,
                                         tool_choice="required", temperature=1.0, seed=1, logit_bias=pull,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert not off.choices[0].message.model_dump().get("reasoning_content") and calls_of(off.choices[0].message)


def test_reasoning_never_closed_ends_at_max_tokens_without_content(router: RouterThread, client: openai.OpenAI,
                                                                   model: str) -> None:
    """The span holds out EOS, so a model that never writes </think> runs into max_tokens: finish_reason "length",
    all of it reasoning, and no content that could be taken for a (broken) answer."""
    answer = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=6, temperature=0.0,
                                            response_format={"type": "json_object"},
                                            logit_bias={**thinking_pull(router, close=0.0),
                                                        **token_bias(router, "<|im_end|>", bias=100.0)})
    [choice] = answer.choices
    assert choice.finish_reason == "length" and choice.message.model_dump()["reasoning_content"]
    assert not choice.message.content


BAD_BODIES: list[tuple[str, dict[str, Any], str]] = [
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "strng"}}}}}}, "response_format.json_schema.schema"),
    ("completions", {"guided_json": {"type": "object", "required": 5}}, "guided_json"),
    ("completions", {"guided_regex": "[a-"}, "guided_regex"),
    ("completions", {"structured_outputs": {"grammar": "start: item"}}, "structured_outputs.grammar"),
    ("completions", {"guided_choice": 5}, "guided_choice"),
    ("completions", {"guided_choice": []}, "guided_choice"),
    ("completions", {"guided_json": SCHEMA, "min_tokens": 2}, "min_tokens"),
    ("chat", {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_news"}}},
     "tool_choice.function.name"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}],
              "tool_choice": "required"}, "tools[0].function.parameters"),
    ("chat", {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice"),
]


@pytest.mark.parametrize(("endpoint", "body", "param"), BAD_BODIES, ids=[f"{e}-{p}" for e, _, p in BAD_BODIES])
def test_bad_structured_output_is_400_naming_the_field(router: RouterThread, endpoint: str, body: dict[str, Any],
                                                       param: str) -> None:
    prompt = {"messages": MESSAGES} if endpoint == "chat" else {"prompt": "Hello"}
    status, answer = post(router, f"/v1/{'chat/' if endpoint == 'chat' else ''}completions",
                          json.dumps({**prompt, **body}).encode())
    assert status == 400 and answer["error"]["param"] == param, answer
    assert answer["error"]["message"].startswith(param), answer


def test_bad_structured_output_over_grpc_is_invalid_argument(router: RouterThread) -> None:
    for spec, field in (({"regex": "[a-"}, "params.structured_output.regex"),
                        ({"json_schema": {"type": "strng"}}, "params.structured_output.json_schema")):
        with pytest.raises(grpc.RpcError) as info:
            grpc_complete(router, "Hello", max_tokens=4, structured_output=spec)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (info.value.details() or "").startswith(field)
