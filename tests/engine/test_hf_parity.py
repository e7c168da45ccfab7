"""Greedy token ids equal Hugging Face's `generate`, through prefix hits, chunked prefill and preemption."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from engine import LLMEngine, SamplingParams
from tests.conftest import TINY_CONFIGS

NUM_NEW_TOKENS = 32
VOCAB = 1024
PROMPT_LENGTHS = [1, 2, 3, 7, 15, 16, 17, 31, 33, 64, 100, 127, 128, 129, 200, 300]
GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)


def random_prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def shared_prefix_prompts() -> list[list[int]]:
    """Prompts sharing a 200-token (12.5 blocks) prefix, with distinct tails of varied length."""
    prefix = random_prompts(1, [200])[0]
    return [prefix + tail for tail in random_prompts(2, [1, 5, 16, 40, 77, 100])]


def hf_greedy(
    model_dir: Path, prompts: list[list[int]], new_tokens: int = NUM_NEW_TOKENS,
    extra_kwargs: Callable[[list[int]], dict[str, Any]] = lambda ids: {},
) -> list[list[int]]:
    """Hugging Face's `generate` (Qwen2 or Qwen3 model), greedy, one prompt at a time (no padding);
    `extra_kwargs(prompt)` adds generate() arguments (e.g. logits processors) for that prompt."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outputs = []
    for ids in prompts:
        input_ids = torch.tensor([ids])
        out = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0, **extra_kwargs(ids),
        )
        outputs.append(out[0, len(ids):].tolist())
    return outputs


@pytest.fixture(scope="module", params=list(TINY_CONFIGS))
def case(request: pytest.FixtureRequest, tiny_checkpoint: Callable[..., Path]) -> tuple[Path, list, list]:
    """(checkpoint, prompts, Hugging Face's greedy continuations) for one tiny config."""
    model_dir = tiny_checkpoint(request.param, vocab_size=VOCAB)
    prompts = random_prompts(0, PROMPT_LENGTHS) + shared_prefix_prompts()
    return model_dir, prompts, hf_greedy(model_dir, prompts)


def run(engine: LLMEngine, prompts: list[list[int]]) -> list[dict]:
    return engine.generate(prompts, GREEDY, use_tqdm=False)  # type: ignore[return-value]


def assert_same(results: list[dict], expected: list[list[int]]) -> None:
    for i, (result, ref) in enumerate(zip(results, expected)):
        assert result["token_ids"] == ref, f"prompt {i}: engine {result['token_ids']} != HF {ref}"


def assert_no_blocks_held(engine: LLMEngine) -> None:
    assert engine.block_manager.num_used_blocks == 0
    assert not engine.has_unfinished()


def test_batch_and_prefix_cache_hits(case: tuple[Path, list, list]) -> None:
    model_dir, prompts, expected = case
    engine = LLMEngine(model_dir, device="cpu", dtype="float32", max_model_len=512)
    assert_same(run(engine, prompts), expected)
    again = run(engine, prompts)
    assert_same(again, expected)
    for prompt, result in zip(prompts, again):
        assert result["num_cached_tokens"] == (len(prompt) - 1) // 16 * 16
    assert_no_blocks_held(engine)


def test_shared_prefix_hits(case: tuple[Path, list, list]) -> None:
    model_dir, prompts, expected = case
    engine = LLMEngine(model_dir, device="cpu", dtype="float32", max_model_len=512)
    first, rest = prompts[-6], prompts[-5:]  # the shared-prefix group
    assert_same([run(engine, [first])[0]], expected[-6:-5])
    results = run(engine, rest)
    assert_same(results, expected[-5:])
    assert all(r["num_cached_tokens"] == 192 for r in results)  # 12 full blocks of the 200-token prefix
    assert_no_blocks_held(engine)


def test_chunked_prefill(case: tuple[Path, list, list]) -> None:
    model_dir, prompts, expected = case
    engine = LLMEngine(model_dir, device="cpu", dtype="float32", max_model_len=512, max_num_batched_tokens=37)
    assert_same(run(engine, prompts), expected)
    assert_no_blocks_held(engine)


def test_preemption_under_tiny_kv_cache(case: tuple[Path, list, list]) -> None:
    model_dir, prompts, expected = case
    engine = LLMEngine(
        model_dir, device="cpu", dtype="float32", max_model_len=512, num_kv_blocks=24, max_num_batched_tokens=64
    )
    assert_same(run(engine, prompts), expected)
    assert engine.stats().num_preemptions > 0
    assert_no_blocks_held(engine)


@pytest.mark.parametrize("name", ["untied-mha-hd32", "qwen2-untied-gqa2"])
def test_prompt_logits_close_to_hf(name: str, tiny_checkpoint: Callable[..., Path]) -> None:
    from transformers import AutoModelForCausalLM

    from engine.layers.attention import AttentionMetadata

    model_dir = tiny_checkpoint(name, vocab_size=VOCAB)
    ids = random_prompts(3, [150])[0]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    engine = LLMEngine(model_dir, device="cpu", dtype="float32", max_model_len=512, num_kv_blocks=16)
    n, bs = len(ids), engine.config.block_size
    blocks = list(range(-(-n // bs)))
    metadata = AttentionMetadata(
        slot_mapping=torch.arange(n), query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        seq_lens=torch.tensor([n], dtype=torch.int32), block_tables=torch.tensor([blocks], dtype=torch.int32),
        max_query_len=n,
    )
    model = engine.model_runner.model
    with torch.no_grad():
        logits = model.compute_logits(model(torch.tensor(ids), torch.arange(n), metadata))
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
