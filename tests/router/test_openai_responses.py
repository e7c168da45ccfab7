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
