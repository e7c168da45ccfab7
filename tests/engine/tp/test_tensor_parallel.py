"""TP=2 and TP=4 on CPU (gloo): greedy ids equal TP=1 and Hugging Face, through prefix hits and chunked prefill;
an FP8 KV cache under TP=2."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from engine import LLMEngine
from engine.kv_cache import attention_layers
from tests.engine.test_hf_parity import GREEDY, hf_greedy, random_prompts, shared_prefix_prompts

# 2 KV heads (1 per rank), tied head with a vocabulary that does not split evenly; 4 KV heads, untied head;
# Qwen2's q/k/v biases, split across ranks with their heads.
CASES = {
    "tied-gqa2-hd16": {"vocab_size": 1001}, "untied-mha-hd32": {"vocab_size": 1024},
    "qwen2-untied-gqa2": {"vocab_size": 1024},
}


@pytest.mark.parametrize("name", list(CASES))
def test_tp2_equals_tp1_and_hugging_face(name: str, tiny_checkpoint: Callable[..., Path]) -> None:
    model_dir = tiny_checkpoint(name, **CASES[name])
    prompts = random_prompts(0, [1, 15, 16, 17, 100, 129]) + shared_prefix_prompts()[:3]
    prompts = [[t % CASES[name]["vocab_size"] for t in p] for p in prompts]
    expected = hf_greedy(model_dir, prompts)
    with LLMEngine(model_dir, device="cpu", dtype="float32", max_model_len=512) as tp1:
        tp1_ids = [r["token_ids"] for r in tp1.generate(prompts, GREEDY, use_tqdm=False)]
    with LLMEngine(
        model_dir, device="cpu", dtype="float32", max_model_len=512, tensor_parallel_size=2,
        max_num_batched_tokens=37,  # chunked prefill
    ) as tp2:
        first = tp2.generate(prompts, GREEDY, use_tqdm=False)
        again = tp2.generate(prompts, GREEDY, use_tqdm=False)  # now from the prefix cache
        assert tp2.block_manager.num_used_blocks == 0
    for i, ref in enumerate(expected):
        assert first[i]["token_ids"] == ref, f"prompt {i}: TP=2 {first[i]['token_ids']} != HF {ref}"
        assert again[i]["token_ids"] == ref, f"prompt {i} (prefix hit): TP=2 {again[i]['token_ids']} != HF {ref}"
        assert tp1_ids[i] == ref
    assert sum(r["num_cached_tokens"] for r in again) > sum(len(p) for p in prompts) // 2


def test_each_rank_holds_its_share_of_kv_heads(tiny_checkpoint: Callable[..., Path]) -> None:
    model_dir = tiny_checkpoint("untied-mha-hd32")
    with LLMEngine(model_dir, device="cpu", dtype="float32", tensor_parallel_size=2, num_kv_blocks=8) as engine:
        k_cache = engine.model_runner.kv_cache[0, 0]  # [blocks, block_size, kv heads, head_dim]
        assert tuple(k_cache.shape) == (8, 16, 2, 32)  # 4 KV heads over 2 ranks


def test_tp4_equals_hugging_face(tiny_checkpoint: Callable[..., Path]) -> None:
    """Four ranks (one KV head each, a vocabulary of 1,001 over four shards), as on a 4-GPU host."""
    model_dir = tiny_checkpoint("untied-mha-hd32", vocab_size=1001)
    prompts = [[t % 1001 for t in p] for p in random_prompts(1, [1, 17, 100]) + shared_prefix_prompts()[:2]]
    expected = hf_greedy(model_dir, prompts)
    with LLMEngine(model_dir, device="cpu", dtype="float32", max_model_len=512, tensor_parallel_size=4,
                   max_num_batched_tokens=37) as tp4:
        assert [r["token_ids"] for r in tp4.generate(prompts, GREEDY, use_tqdm=False)] == expected
        assert tp4.model_runner.kv_cache.shape[-2] == 1


def test_an_fp8_cache_under_tp2_keeps_each_rank_s_heads_scales(tiny_checkpoint: Callable[..., Path]) -> None:
    """Each rank quantises its own KV heads with their scales (engine/kv_scales.py on its shard): rank 0 holds the
    first half of TP=1's scales, and TP=2's greedy tokens are TP=1's."""
    model_dir = tiny_checkpoint("untied-mha-hd32")
    prompts = [p[:40] for p in random_prompts(1, [30, 40, 17])]
    kwargs = dict(device="cpu", dtype="float32", kv_cache_dtype="fp8", max_model_len=128)
    with LLMEngine(model_dir, **kwargs) as tp1, LLMEngine(model_dir, tensor_parallel_size=2, **kwargs) as tp2:
        one, two = (attention_layers(e.model_runner.model)[1].kv_scales for e in (tp1, tp2))
        assert one is not None and two is not None
        assert all(torch.equal(a[:2], b) for a, b in zip(one, two))
        outputs = [[r["token_ids"] for r in e.generate(prompts, GREEDY, use_tqdm=False)] for e in (tp1, tp2)]
    assert outputs[0] == outputs[1]
