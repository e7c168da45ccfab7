"""Helpers of the LLMEngine API tests: requests to run, ways to run them, and the idle-engine check."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from engine import LLMEngine, SamplingParams
from engine.outputs import RequestOutput
from engine.prompt import Prompt

VOCAB = 151936  # the Qwen tokenizer's ids reach 151668, so text prompts need the full vocabulary
HELLO = "Hello, how are you?"
LONG_GREEDY = 60  # tokens of the reference greedy continuation of HELLO


def greedy(max_tokens: int, **kwargs: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def random_ids(seed: int, n: int) -> list[int]:
    return torch.randint(0, 100_000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def one(engine: LLMEngine, prompt: Prompt, params: SamplingParams | None = None, **kwargs: Any) -> dict[str, Any]:
    """generate() of a single prompt, which returns one dict."""
    result = engine.generate(prompt, params, use_tqdm=False, **kwargs)
    assert isinstance(result, dict)
    return result


def many(engine: LLMEngine, prompts: Sequence[Prompt], params: Any = None, **kwargs: Any) -> list[dict[str, Any]]:
    """generate() of a list of prompts, which returns a list of dicts in input order."""
    results = engine.generate(list(prompts), params, use_tqdm=False, **kwargs)
    assert isinstance(results, list)
    return results


def drain(engine: LLMEngine) -> dict[str, list[RequestOutput]]:
    """Step until idle; every request's deltas, in order."""
    deltas: dict[str, list[RequestOutput]] = defaultdict(list)
    while engine.has_unfinished():
        for out in engine.step():
            deltas[out.request_id].append(out)
    return deltas


def tokens_of(deltas: list[RequestOutput]) -> list[int]:
    return [t for d in deltas for t in d.new_token_ids]


def assert_idle(engine: LLMEngine) -> None:
    assert not engine.has_unfinished()
    assert engine.block_manager.num_used_blocks == 0
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting, stats.num_kv_blocks_used) == (0, 0, 0)
