"""The OpenAI-compatible HTTP API's answers, through the official `openai` client: each equals the gRPC API's
for the same request (one path below the two front doors), whole and streamed, with logprobs, stops, seeds,
n choices, the chat template's kwargs, the reasoning split and tools."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import grpc
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from engine.tokenizer import Tokenizer
from proto import nanoserve_pb2 as pb
from proto import nanoserve_pb2_grpc as pb_grpc
from tests.router.http_api.calls import GREEDY, MESSAGES, PROMPT, grpc_complete
from tests.serving import RouterThread


def test_models_and_health(router: RouterThread, client: openai.OpenAI, model: str) -> None:
    [listed] = client.models.list().data
    assert router.router.core is not None
    assert listed.id == model == router.router.core.model_name and listed.owned_by == "nanoserve"
    with urllib.request.urlopen(f"http://127.0.0.1:{router.router.http_port}/health", timeout=10) as answer:
        assert answer.status == 200 and json.loads(answer.read()) == {"status": "serving"}


@pytest.mark.parametrize("prompt", [PROMPT, "Hello, how are you?"], ids=["token-ids", "text"])
@pytest.mark.parametrize("params", [dict(GREEDY), dict(temperature=0.9, top_p=0.9, seed=3, presence_penalty=0.5,
    frequency_penalty=0.3, extra_body={"top_k": 50, "min_p": 0.01, "ignore_eos": True, "repetition_penalty": 1.2})],
    ids=["greedy", "seeded"])
def test_completion_equals_the_grpc_answer(router: RouterThread, client: openai.OpenAI, model: str,
                                           prompt: Any, params: dict[str, Any]) -> None:
    answer = client.completions.create(model=model, prompt=prompt, max_tokens=12, **params)
    grpc_params = {k: v for k, v in params.items() if k != "extra_body"} | params["extra_body"]
    expected = grpc_complete(router, prompt, max_tokens=12, **grpc_params)
    [choice] = answer.choices
    assert choice.text == expected.text and choice.finish_reason == "length"
    assert answer.id.startswith("cmpl-") and answer.object == "text_completion" and answer.model == model
    usage = answer.usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (6, 12)
    assert usage.total_tokens == 18


def test_logit_bias_forces_a_token_and_an_allow_list_bounds_the_draw(
    router: RouterThread, client: openai.OpenAI, model: str
) -> None:
    forced = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=1.0, seed=1,
                                       logit_bias={"21806": 100})
    expected = grpc_complete(router, PROMPT, max_tokens=4, temperature=1.0, seed=1, logit_bias={21806: 100.0})
    assert list(expected.token_ids) == [21806] * 4 and forced.choices[0].text == expected.text
    allowed = [151, 9707, 21806]
    answer = grpc_complete(router, PROMPT, max_tokens=8, temperature=1.5, seed=2, ignore_eos=True,
                           allowed_token_ids=allowed)
    assert set(answer.token_ids) <= set(allowed)
    via_http = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=1.5, seed=2,
                                         extra_body={"ignore_eos": True, "allowed_token_ids": allowed})
    assert via_http.choices[0].text == answer.text


def test_chat_template_kwargs_and_the_reasoning_split(router: RouterThread, client: openai.OpenAI, model: str) -> None:
    """enable_thinking=false reaches the embedded Qwen3-style template (its prompt closes an empty <think> span:
    4 more tokens); an answer that opens a <think> span (forced here with logit_bias) comes back as
    reasoning_content, whole and streamed alike, and the same request over gRPC as reasoning_text."""
    def prompt_tokens(**template_kwargs: Any) -> int:
        answer = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=1, temperature=0.0,
                                                extra_body={"chat_template_kwargs": template_kwargs})
        assert answer.usage is not None
        return answer.usage.prompt_tokens

    assert prompt_tokens(enable_thinking=False) == prompt_tokens() + 4  # <think>, "\n\n", </think>, "\n\n"
    think = {"151667": 100}  # <think>: the answer opens a span and stays in it
    answer = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=3, logit_bias=think, **GREEDY)
    message = answer.choices[0].message.model_dump()
    assert (message["content"], message["reasoning_content"]) == ("", "<think><think>")
    chunks = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=3, logit_bias=think,
                                            stream=True, **GREEDY)
    deltas = [chunk.choices[0].delta.model_dump() for chunk in chunks if chunk.choices]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "<think><think>"
    assert "".join(d.get("content") or "" for d in deltas) == ""
    grpc_answer = grpc_complete(router, list(MESSAGES), max_tokens=3, logit_bias={151667: 100.0}, temperature=0.0)
    assert (grpc_answer.reasoning_text, grpc_answer.text) == ("<think><think>", "")


WEATHER_TOOL: dict[str, Any] = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"maximum": 7}}}}}
TOOL_EXCHANGE: list[Any] = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
]


def test_tools_and_a_tool_exchange_render_through_the_template(
    router: RouterThread, client: openai.OpenAI, model: str, qwen_tokenizer: Tokenizer
) -> None:
    """A multi-turn exchange with a call and its result, and the tools, reach the checkpoint's template as
    transformers passes them (the prompt is the locally rendered one, token for token), through both front doors;
    tool_choice "none" still describes the tools (vLLM's default)."""
    as_template = [TOOL_EXCHANGE[0], {**TOOL_EXCHANGE[1], "content": "", "tool_calls": [{
        "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        TOOL_EXCHANGE[2]]
    # The servers render a tool's parameters with sorted keys (a protobuf Struct's order varies by process).
    function = WEATHER_TOOL["function"]
    rendered_tool = {**WEATHER_TOOL, "function": {**function, "parameters": json.loads(
        json.dumps(function["parameters"], sort_keys=True))}}
    expected = len(qwen_tokenizer.encode(qwen_tokenizer.apply_chat_template(as_template, tools=[rendered_tool])))
    without_tools = len(qwen_tokenizer.encode(qwen_tokenizer.apply_chat_template(as_template)))
    assert expected > without_tools + 20

    def prompt_tokens(**body: Any) -> int:
        answer = client.chat.completions.create(model=model, messages=TOOL_EXCHANGE, max_tokens=2, **GREEDY, **body)
        assert answer.usage is not None and answer.choices[0].finish_reason == "length"
        return answer.usage.prompt_tokens

    assert prompt_tokens(tools=[WEATHER_TOOL]) == expected
    assert prompt_tokens(tools=[WEATHER_TOOL], tool_choice="none") == expected
    assert prompt_tokens() == without_tools
    tool = pb.Tool(name="get_weather", description="Weather in a city.")
    tool.parameters.update(WEATHER_TOOL["function"]["parameters"])
    chat = pb.ChatMessages(tools=[tool], messages=[
        pb.ChatMessage(role="user", content="Weather in Paris?"),
        pb.ChatMessage(role="assistant", tool_calls=[pb.ToolCall(id="call_1", name="get_weather",
                                                                 arguments='{"city": "Paris"}')]),
        pb.ChatMessage(role="tool", content="sunny", tool_call_id="call_1")])
    with grpc.insecure_channel(router.address) as channel:
        answer = pb_grpc.NanoServeStub(channel).Complete(pb.GenerateRequest(chat=chat, params=pb.SamplingParams(
            max_tokens=2, temperature=0.0)), timeout=60)
    assert answer.usage.prompt_tokens == expected


def test_streamed_completion_is_the_whole_one_in_pieces(client: openai.OpenAI, model: str) -> None:
    whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, **GREEDY)
    events = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=16, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    *chunks, last = events
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.usage is None for c in chunks) and last.choices == [] and last.usage == whole.usage


def test_chat_whole_and_streamed(router: RouterThread, client: openai.OpenAI, model: str) -> None:
    whole = client.chat.completions.create(model=model, messages=MESSAGES, max_completion_tokens=10, **GREEDY)
    [choice] = whole.choices
    expected = grpc_complete(router, MESSAGES, temperature=0.0, max_tokens=10, ignore_eos=True)
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-") and choice.finish_reason == "length"
    assert whole.usage is not None and whole.usage.prompt_tokens == expected.usage.prompt_tokens
    stream = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=10, stream=True, **GREEDY)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].object == "chat.completion.chunk"


def test_n_choices_whole_and_streamed_equal_the_grpc_answer(router: RouterThread, client: openai.OpenAI,
                                                            model: str) -> None:
    """n = 3, completions and chat: the choices by index, whole or streamed (each event one choice's, naming its
    index), equal gRPC's; the usage counts the prompt once and every choice's tokens."""
    params: dict[str, Any] = dict(temperature=0.9, seed=3, n=3, extra_body={"ignore_eos": True})
    expected = grpc_complete(router, PROMPT, temperature=0.9, seed=3, n=3, ignore_eos=True, max_tokens=8).choices
    assert len({c.text for c in expected}) == 3
    whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, **params)
    assert [(c.index, c.text, c.finish_reason) for c in whole.choices] == [(i, e.text, "length")
                                                                           for i, e in enumerate(expected)]
    assert whole.usage is not None and (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (6, 24)
    *events, last = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, stream=True,
                                              stream_options={"include_usage": True}, **params)
    assert ["".join(e.choices[0].text for e in events if e.choices[0].index == i) for i in range(3)] == [
        e.text for e in expected]
    assert sorted(e.choices[0].index for e in events if e.choices[0].finish_reason) == [0, 1, 2]
    assert last.choices == [] and last.usage == whole.usage

    chat = grpc_complete(router, MESSAGES, temperature=0.9, seed=3, n=3, ignore_eos=True, max_tokens=8).choices
    answer = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, **params)
    assert [c.message.content for c in answer.choices] == [c.text for c in chat]
    stream = list(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, stream=True, **params))
    assert [e.choices[0].delta.role for e in stream[:3]] == ["assistant"] * 3  # each choice's opening
    assert ["".join(e.choices[0].delta.content or "" for e in stream if e.choices[0].index == i)
            for i in range(3)] == [c.text for c in chat]


def test_chat_content_parts_and_the_developer_role(client: openai.OpenAI, model: str) -> None:
    """Text parts are the string content they join to; "developer" is OpenAI's newer name for "system"."""
    parts: list[ChatCompletionMessageParam] = [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Hello,"}, {"type": "text", "text": "how are you?"}]}]
    plain: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello,\nhow are you?"}]
    answers = [client.chat.completions.create(model=model, messages=m, max_tokens=8, **GREEDY) for m in (parts, plain)]
    assert answers[0].choices[0].message.content == answers[1].choices[0].message.content
    assert answers[0].usage is not None and answers[1].usage is not None
    assert answers[0].usage.prompt_tokens == answers[1].usage.prompt_tokens


def test_chat_without_max_tokens_runs_to_the_end_of_the_context(client: openai.OpenAI, model: str) -> None:
    answer = client.chat.completions.create(model=model, messages=MESSAGES, **GREEDY)
    assert answer.usage is not None and answer.choices[0].finish_reason == "length"
    assert answer.usage.total_tokens == 512  # max_model_len


def test_stop_strings_cut_the_text(client: openai.OpenAI, model: str) -> None:
    text = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, **GREEDY).choices[0].text
    stop = text[12:15]
    whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, stop=[stop, "never"], **GREEDY)
    streamed = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=24, stop=[stop, "never"],
                                              stream=True, **GREEDY))
    for chunks in ([whole], streamed):
        assert "".join(c.choices[0].text for c in chunks) == text[: text.index(stop)]
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_seed_reproduces_the_answer(client: openai.OpenAI, model: str) -> None:
    def sample(seed: int) -> str:
        answer = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=16, temperature=1.0,
                                                seed=seed, extra_body={"ignore_eos": True})
        return answer.choices[0].message.content or ""

    assert sample(11) == sample(11) != sample(12)


def test_completion_logprobs(client: openai.OpenAI, model: str) -> None:
    answer = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, logprobs=3, **GREEDY)
    logprobs = answer.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs and logprobs.top_logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    assert "".join(logprobs.tokens) == answer.choices[0].text
    assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:i])) for i in range(6)]
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert 1 <= len(top) <= 3 and logprob <= 0
        assert top[token] == pytest.approx(logprob) == pytest.approx(max(top.values()))  # greedy: the top token


def test_chat_logprobs_streamed(client: openai.OpenAI, model: str) -> None:
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=5, logprobs=True,
                                                 top_logprobs=2, stream=True, **GREEDY))
    entries = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content or []]
    assert len(entries) == 5
    assert "".join(e.token for e in entries) == "".join(c.choices[0].delta.content or "" for c in chunks)
    for entry in entries:
        assert [t.token for t in entry.top_logprobs][0] == entry.token and len(entry.top_logprobs) == 2
        assert entry.bytes == list(entry.token.encode())
