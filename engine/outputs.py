"""What the engine hands back: per-step deltas for streaming, and stats."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.sequence import FinishReason, Sequence, TokenLogprobs
from engine.tokenizer import Tokenizer


@dataclass(slots=True)
class RequestOutput:
    """One request's progress in one step: the tokens it gained, and whether it is done."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot of the engine's load and cache, for metrics and routing."""

    num_running: int
    num_waiting: int
    num_running_tokens: int  # prompt + output tokens of running requests (their KV footprint)
    num_waiting_tokens: int  # tokens of queued requests still to be prefilled: the load not yet started
    num_kv_blocks_used: int
    num_kv_blocks_total: int
    num_prefix_hit_tokens: int  # prompt tokens served from the prefix cache, since start
    num_prompt_tokens: int  # prompt tokens admitted, since start
    num_preemptions: int


def final_output(seq: Sequence, tokenizer: Tokenizer) -> dict[str, Any]:
    """The `generate()` result for a finished request; text is cut before a matched stop string."""
    if seq.detokenizer is not None:
        text = seq.detokenizer.text + seq.detokenizer.flush()
        text = text if seq.stop_text_len is None else text[: seq.stop_text_len]
    else:
        text = tokenizer.decode(seq.output_token_ids)
    result: dict[str, Any] = {
        "text": text,
        "token_ids": seq.output_token_ids,
        "finish_reason": seq.finish_reason,
        "num_prompt_tokens": seq.num_prompt_tokens,
        "num_cached_tokens": seq.num_cached_tokens or 0,
    }
    if seq.params.logprobs is not None:
        result["logprobs"] = [
            {"token_id": t, "logprob": lp.logprob, "top_logprobs": lp.top}
            for t, lp in zip(seq.output_token_ids, seq.logprobs)
        ]
    return result
