"""What the engine hands back: per-step deltas for streaming, and stats."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.sequence import FinishReason, Sequence, TokenLogprobs
from engine.tokenizer import Tokenizer


@dataclass(slots=True)
class RequestOutput:
    """One request's progress in one step: the tokens its choice `index` gained, and whether that choice is done
    (a request with n choices gives up to n outputs a step; it is done once each of them has said finished)."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    index: int = 0  # the choice (SamplingParams.n)


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


Result = dict[str, Any] | list[dict[str, Any]]  # one prompt's generate() result: a dict, or n (SamplingParams.n)


def result(choices: list[Sequence], tokenizer: Tokenizer) -> Result:
    """The `generate()` result of a finished request: its choice's dict, or with n > 1 a list of them by index."""
    outputs = [final_output(seq, tokenizer) for seq in choices]
    return outputs if choices[0].params.n > 1 else outputs[0]


def final_output(seq: Sequence, tokenizer: Tokenizer) -> dict[str, Any]:
    """The `generate()` result of one finished choice; text is cut before a matched stop string."""
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
