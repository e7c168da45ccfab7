"""Which attention implementation runs where, and the flash-attn path end to end (through a stand-in of
flash-attn, which needs a CUDA build): greedy output equals the reference path's, prefix hits included."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import kernels.flash_attention as flash
from engine import LLMEngine
from engine.kv_cache import attention_layers
from engine.layers import attention
from tests import flash_attn_stand_in
from tests.engine.test_hf_parity import GREEDY, VOCAB, random_prompts

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


def test_backend_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flash, "HAS_FLASH_ATTN", True)
    monkeypatch.setattr(attention, "HAS_TRITON", True)
    assert attention.attention_backend(CUDA, 256) == "flash-attn"
    assert attention.attention_backend(CUDA, 16) == "triton"  # flash-attn 2 reads only 256-token multiples
    assert attention.attention_backend(CPU, 256) == "torch-reference"
    monkeypatch.setattr(flash, "HAS_FLASH_ATTN", False)
    assert attention.attention_backend(CUDA, 256) == "triton"
    monkeypatch.setattr(attention, "HAS_TRITON", False)
    assert attention.attention_backend(CUDA, 256) == "torch-reference"


def test_engine_through_flash_attn_equals_reference(
    monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: Callable[..., Path]
) -> None:
    monkeypatch.setitem(sys.modules, "flash_attn", flash_attn_stand_in.module)
    model_dir = tiny_checkpoint("tied-gqa2-hd16", vocab_size=VOCAB)
    prompts = random_prompts(5, [1, 100, 300, 600])
    kwargs = dict(device="cpu", dtype="float32", max_model_len=1024, block_size=256, max_num_batched_tokens=512)
    with LLMEngine(model_dir, **kwargs) as reference:
        expected = [r["token_ids"] for r in reference.generate(prompts, GREEDY, use_tqdm=False)]
    with LLMEngine(model_dir, **kwargs) as engine:
        for layer in attention_layers(engine.model_runner.model):
            layer.backend = "flash-attn"  # what a GPU with flash-attn installed picks for 256-token pages
        first = engine.generate(prompts, GREEDY, use_tqdm=False)
        again = engine.generate(prompts, GREEDY, use_tqdm=False)  # 600-token prompt: 2 cached pages
    assert [r["token_ids"] for r in first] == expected
    assert [r["token_ids"] for r in again] == expected
    assert again[3]["num_cached_tokens"] == 512
