"""The router's chunks in OpenAI's answer shapes: text completions and chat completions, whole or as the
chunks of a server-sent-event stream (with n > 1, each event carries one choice, which its index names)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from engine.tokenizer import Tokenizer
from proto import nanoserve_pb2 as pb
from router.openai_requests import ApiRequest

FINISH_REASONS: dict[pb.FinishReason, str] = {
    pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_ABORT: "abort",
}


class Answer:
    """One request's answer: its id, and the JSON objects that carry its chunks."""

    def __init__(self, api: ApiRequest, model: str, tokenizer: Tokenizer) -> None:
        self.api, self.model, self.tokenizer = api, model, tokenizer
        self.is_chat = api.endpoint == "chat"
        self.id = ("chatcmpl-" if self.is_chat else "cmpl-") + api.generate.request_id
        self.created = int(time.time())
        self.n = api.generate.params.n or 1
        # Per choice: completions' logprobs.text_offset (characters of the answer before a token), and the tool calls
        # sent so far (a streamed call's index).
        self._text_offset = [0] * self.n
        self._num_tool_calls = [0] * self.n

    def whole(self, chunks: Sequence[pb.GenerateResponse]) -> dict[str, Any]:
        """The answer of a request that did not stream, from all its chunks: its choices by index."""
        choices = [self._whole_choice([c for c in chunks if c.index == index]) for index in range(self.n)]
        return {**self._envelope("chat.completion" if self.is_chat else "text_completion"), "choices": choices,
                "usage": _usage(chunks[-1].usage)}

    def _whole_choice(self, chunks: Sequence[pb.GenerateResponse]) -> dict[str, Any]:
        text, reasoning = "".join(c.text for c in chunks), "".join(c.reasoning_text for c in chunks)
        calls = [call for c in chunks for call in c.tool_calls]
        choice = self._choice(chunks[-1].index, text, [lp for c in chunks for lp in c.logprobs],
                              chunks[-1].finish_reason, reasoning, calls)
        if self.is_chat:
            choice["message"] = {"role": "assistant", **choice.pop("delta")}
            if calls:  # as OpenAI answers a call: the message's text, if it has none, is null
                choice["message"]["content"] = text or None
                for call in choice["message"]["tool_calls"]:
                    del call["index"]  # only a streamed call (a delta) says where it goes
        return choice

    def openings(self) -> list[dict[str, Any]]:
        """The stream's first events, sent before the first token: chat announces the assistant's turn in each
        choice."""
        if not self.is_chat:
            return []
        return [self._event({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}) for index in range(self.n)]

    def event(self, chunk: pb.GenerateResponse) -> dict[str, Any] | None:
        """The stream event of one chunk; None when it carries nothing (text held back, e.g. before a stop)."""
        if not (chunk.text or chunk.reasoning_text or chunk.tool_calls or chunk.logprobs or chunk.finish_reason):
            return None
        return self._event(self._choice(chunk.index, chunk.text, chunk.logprobs, chunk.finish_reason,
                                        chunk.reasoning_text, chunk.tool_calls))

    def usage_event(self, usage: pb.Usage) -> dict[str, Any]:
        """The stream's last event when stream_options.include_usage is set: no choice, the usage."""
        return {**self._envelope(self._stream_object), "choices": [], "usage": _usage(usage)}

    @property
    def _stream_object(self) -> str:
        return "chat.completion.chunk" if self.is_chat else "text_completion"

    def _event(self, choice: dict[str, Any]) -> dict[str, Any]:
        event = {**self._envelope(self._stream_object), "choices": [choice]}
        if self.api.include_usage:
            event["usage"] = None  # as OpenAI: every chunk has the key, only the last one a value
        return event

    def _envelope(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _choice(
        self, index: int, text: str, logprobs: Sequence[pb.TokenLogprob], finish_reason: pb.FinishReason,
        reasoning: str = "", tool_calls: Sequence[pb.ToolCall] = (),
    ) -> dict[str, Any]:
        """Choice `index`'s part. `reasoning`: chat only, with the router's --reasoning-parser (vLLM's
        reasoning_content). `tool_calls`: chat only, the calls parsed from the answer (each whole, with its index
        in the answer)."""
        choice: dict[str, Any] = {"index": index}
        if self.is_chat:
            choice["delta"] = {"content": text, **({"reasoning_content": reasoning} if reasoning else {})}
            if tool_calls:
                choice["delta"]["tool_calls"] = [self._tool_call(index, call) for call in tool_calls]
            choice["logprobs"] = {"content": self._chat_logprobs(logprobs)} if self.api.logprobs else None
        else:
            choice["text"] = text
            choice["logprobs"] = self._completion_logprobs(index, logprobs) if self.api.logprobs else None
        choice["finish_reason"] = FINISH_REASONS.get(finish_reason)
        if finish_reason == pb.FINISH_REASON_STOP and self._num_tool_calls[index]:
            choice["finish_reason"] = "tool_calls"  # the model stopped after calling
        return choice

    def _tool_call(self, index: int, call: pb.ToolCall) -> dict[str, Any]:
        self._num_tool_calls[index] += 1
        return {"index": self._num_tool_calls[index] - 1, "id": call.id, "type": "function",
                "function": {"name": call.name, "arguments": call.arguments}}

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _chat_logprobs(self, entries: Sequence[pb.TokenLogprob]) -> list[dict[str, Any]]:
        def one(token_id: int, logprob: float) -> dict[str, Any]:
            token = self._token(token_id)
            return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

        return [{**one(e.token_id, e.logprob), "top_logprobs": [one(t.token_id, t.logprob) for t in e.top_logprobs]}
                for e in entries]

    def _completion_logprobs(self, index: int, entries: Sequence[pb.TokenLogprob]) -> dict[str, Any]:
        tokens = [self._token(e.token_id) for e in entries]
        offsets = []
        for token in tokens:
            offsets.append(self._text_offset[index])
            self._text_offset[index] += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{self._token(t.token_id): t.logprob for t in e.top_logprobs} for e in entries],
            "text_offset": offsets,
        }


def _usage(usage: pb.Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
    }
