"""OpenAI answer shapes (router/openai_responses.py): a chat answer's reasoning as vLLM's reasoning_content."""

from __future__ import annotations

from engine.tokenizer import Tokenizer
from proto import nanoserve_pb2 as pb
from router.openai_requests import read_request
from router.openai_responses import Answer


def test_reasoning_is_reasoning_content_whole_and_streamed(qwen_tokenizer: Tokenizer) -> None:
    api = read_request("chat", {"messages": [{"role": "user", "content": "2+2?"}]})
    answer = Answer(api, "m", qwen_tokenizer)
    chunks = [pb.GenerateResponse(reasoning_text="Two and two."), pb.GenerateResponse(text="Four.", finish_reason=1)]
    assert answer.whole(chunks)["choices"][0]["message"] == {
        "role": "assistant", "content": "Four.", "reasoning_content": "Two and two."}
    first, last = (answer.event(c) for c in chunks)
    assert first is not None and first["choices"][0]["delta"] == {"content": "", "reasoning_content": "Two and two."}
    assert last is not None and last["choices"][0]["delta"] == {"content": "Four."}
    plain = Answer(api, "m", qwen_tokenizer).whole([pb.GenerateResponse(text="Four.", finish_reason=1)])
    assert plain["choices"][0]["message"] == {"role": "assistant", "content": "Four."}


def test_tool_calls_whole_and_streamed(qwen_tokenizer: Tokenizer) -> None:
    """OpenAI's shapes: the message's calls with null content, each streamed call as a delta with its index, and
    finish_reason "tool_calls" when the model stopped after calling (not when max_tokens cut it off)."""
    api = read_request("chat", {"messages": [{"role": "user", "content": "Weather?"}]})
    calls = [pb.ToolCall(id=f"call_{i}", name="get_weather", arguments=f'{{"day": {i}}}') for i in range(2)]
    chunks = [pb.GenerateResponse(tool_calls=calls[:1]), pb.GenerateResponse(tool_calls=calls[1:], finish_reason=1)]
    message = Answer(api, "m", qwen_tokenizer).whole(chunks)["choices"][0]
    expected = [{"id": f"call_{i}", "type": "function",
                 "function": {"name": "get_weather", "arguments": f'{{"day": {i}}}'}} for i in range(2)]
    assert message["message"] == {"role": "assistant", "content": None, "tool_calls": expected}
    assert message["finish_reason"] == "tool_calls"
    answer = Answer(api, "m", qwen_tokenizer)
    events = [answer.event(c) for c in chunks]
    deltas = [e["choices"][0] for e in events if e is not None]
    assert [d["delta"]["tool_calls"] for d in deltas] == [[{"index": i, **expected[i]}] for i in range(2)]
    assert [d["finish_reason"] for d in deltas] == [None, "tool_calls"]
    cut = Answer(api, "m", qwen_tokenizer).whole([pb.GenerateResponse(text="Hm", tool_calls=calls, finish_reason=2)])
    assert cut["choices"][0]["finish_reason"] == "length" and cut["choices"][0]["message"]["content"] == "Hm"
