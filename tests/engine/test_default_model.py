"""The embedded default model, and random checkpoints from `write_random_qwen3` that Hugging Face loads too."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from engine import LLMEngine, SamplingParams
from engine.default_model import QWEN3_EOS_TOKEN_IDS, TINY_QWEN3, default_model_dir, write_random_qwen3
from engine.prompt import Prompt

VOCAB = 151936
NUM_NEW_TOKENS = 16


def test_default_model_dir_holds_a_full_checkpoint() -> None:
    model_dir = default_model_dir()  # built once per machine in the nanoserve cache
    names = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    for name in names:
        assert (model_dir / name).is_file(), f"{name} missing from {model_dir}"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["vocab_size"] == VOCAB
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    assert {k: config[k] for k in TINY_QWEN3} == TINY_QWEN3
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [VOCAB, TINY_QWEN3["hidden_size"]]
    assert default_model_dir() == model_dir  # cached: the second call finds it


def test_default_model_serves() -> None:
    engine = LLMEngine(default_model_dir(), device="cpu", max_model_len=64)
    assert engine.config.dtype == torch.float32
    assert set(QWEN3_EOS_TOKEN_IDS) <= engine.eos_token_ids
    result = engine.generate("Hello", max_tokens=4, temperature=0, ignore_eos=True, use_tqdm=False)
    assert isinstance(result, dict) and len(result["token_ids"]) == 4
    assert len(set(result["token_ids"])) > 1  # the wide init makes the output vary


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def random_checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    shape = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=request.param,
    )
    return write_random_qwen3(tmp_path_factory.mktemp("random-qwen3"), shape, dtype=torch.float32, init_std=0.3)


def test_hugging_face_loads_it_and_greedy_matches(random_checkpoint: Path) -> None:
    from transformers import Qwen3ForCausalLM

    loaded: Any = Qwen3ForCausalLM.from_pretrained(random_checkpoint, dtype=torch.float32, output_loading_info=True)
    hf, info = loaded
    assert not any(info.values()), f"Hugging Face loading: {info}"
    hf.eval()
    engine = LLMEngine(random_checkpoint, device="cpu", dtype="float32", max_model_len=128)
    prompts: list[Prompt] = [engine.tokenizer.encode("Hello, how are you?"), torch.randint(0, VOCAB, (37,)).tolist()]
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    results = engine.generate(prompts, params, use_tqdm=False)
    assert isinstance(results, list)
    for ids, result in zip(prompts, results):
        input_ids = torch.tensor([ids])
        out = hf.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=NUM_NEW_TOKENS,
            min_new_tokens=NUM_NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0,
        )
        assert result["token_ids"] == out[0, len(ids) :].tolist()
    assert len(set(results[0]["token_ids"])) > 1  # not a degenerate repeat
