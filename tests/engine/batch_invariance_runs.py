"""The same requests run every way the engine may run them, for tests/engine/test_gpu_batch_invariance.py.

`python -m tests.engine.batch_invariance_runs --model DIR --out FILE [--batch-invariant] [--kv-cache-dtype fp8]`
runs, in a process of its own (cuBLAS reads its workspace setting once per process), each request alone; then,
with their prompts in the prefix cache, all of them in one batch, in batches of 5, and resumed from prompt + k of
their own tokens; then, on fresh engines, in one batch with step budgets of 64, 512 and 16,384 tokens, with a KV
cache small enough to force preemption, and eagerly instead of through CUDA graphs. It writes every run's token
ids and logprobs as JSON.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from engine import LLMEngine, SamplingParams
from engine.layers.linear import LinearBase

NUM_REQUESTS, NEW_TOKENS, MAX_PROMPT = 64, 128, 2000
RESUME_AT = (1, 17, 64)


def requests(vocab_size: int) -> list[tuple[list[int], SamplingParams]]:
    """Greedy and seeded requests with prompts of 1 to 2,000 tokens, logprobs asked for."""
    rng = random.Random(0)
    out = []
    for i in range(NUM_REQUESTS):
        prompt = [rng.randrange(vocab_size) for _ in range(1 if i == 0 else rng.randint(2, MAX_PROMPT))]
        sampling = dict(temperature=0.0) if i % 2 else dict(temperature=0.8, top_p=0.95, seed=rng.randrange(2**31))
        out.append((prompt, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1, **sampling)))
    return out


def run(engine: LLMEngine, batch: list[tuple[list[int], SamplingParams]]) -> list[dict[str, Any]]:
    results = engine.generate([p for p, _ in batch], [s for _, s in batch], use_tqdm=False)
    assert isinstance(results, list)
    return [{"token_ids": r["token_ids"], "logprobs": [e["logprob"] for e in r["logprobs"]],
             "cached": r["num_cached_tokens"]} for r in results]


def resumed(engine: LLMEngine, batch: list[tuple[list[int], SamplingParams]], alone: list[dict[str, Any]],
            k: int) -> list[dict[str, Any]]:
    """Each request from prompt + its first k tokens, as a failover resubmits it; the continuation only."""
    ids = []
    for (prompt, params), first in zip(batch, alone):
        rest = SamplingParams(**{**params.as_kwargs(), "max_tokens": NEW_TOKENS - k})
        ids.append(engine.add_request(prompt + first["token_ids"][:k], rest, resumed_tokens=k))
    outputs: dict[str, dict[str, Any]] = {request_id: {"token_ids": [], "logprobs": []} for request_id in ids}
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id]["token_ids"] += out.new_token_ids
            outputs[out.request_id]["logprobs"] += [lp.logprob for lp in out.new_logprobs]
    return [outputs[request_id] for request_id in ids]


def all_runs(model: Path, batch_invariant: bool, kv_cache_dtype: str = "auto") -> dict[str, Any]:
    base = dict(max_model_len=MAX_PROMPT + NEW_TOKENS + 64, dtype="bfloat16", batch_invariant=batch_invariant,
                kv_cache_dtype=kv_cache_dtype)
    runs: dict[str, Any] = {}
    with LLMEngine(model, **base) as engine:
        batch = requests(engine.config.model_config.vocab_size)
        runs["skinny_matmul"] = any(m.skinny is not None for m in engine.model_runner.model.modules()
                                    if isinstance(m, LinearBase))  # decode's few-row steps: kernels/skinny_matmul.py
        runs["alone"] = [run(engine, [request])[0] for request in batch]  # random prompts: no prefix hits
        runs["one batch of 64, prompts cached"] = run(engine, batch)
        runs["batches of 5, prompts cached"] = [r for i in range(0, NUM_REQUESTS, 5)
                                                for r in run(engine, batch[i : i + 5])]
        for k in RESUME_AT:
            runs[f"resumed after {k}"] = resumed(engine, batch, runs["alone"], k)
    for budget in (64, 512, 16384):  # fresh engines: no prefix hits
        with LLMEngine(model, **base, max_num_batched_tokens=budget) as engine:
            runs[f"one batch of 64, step budget {budget}"] = run(engine, batch)
    with LLMEngine(model, **base, num_kv_blocks=8 * (MAX_PROMPT + NEW_TOKENS) // 16) as engine:
        runs["preempted"] = run(engine, batch)
        runs["num_preemptions"] = engine.stats().num_preemptions
    with LLMEngine(model, **base, enforce_eager=True) as engine:
        runs["eager"] = run(engine, batch)
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batch-invariant", action="store_true")
    p.add_argument("--kv-cache-dtype", default="auto")
    args = p.parse_args()
    args.out.write_text(json.dumps(all_runs(args.model, args.batch_invariant, args.kv_cache_dtype)))


if __name__ == "__main__":
    main()
