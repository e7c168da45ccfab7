"""The safetensors loader: sharded checkpoints, packed modules, tied heads, and clear errors."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import LLMEngine, SamplingParams

PROMPTS = [[5, 17, 300, 2, 9], list(range(40, 90))]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def generate(model_dir: Path) -> list[list[int]]:
    engine = LLMEngine(model_dir, device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=64)
    return [r["token_ids"] for r in engine.generate(PROMPTS, GREEDY, use_tqdm=False)]


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("name", ["tied-gqa2-hd16", "untied-mha-hd32", "qwen2-untied-gqa2"])
def test_sharded_checkpoint_loads_like_one_file(
    name: str, tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    single = tiny_checkpoint(name)
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(single, dtype=torch.float32).save_pretrained(sharded, max_shard_size="100KB")
    for tokenizer_file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(single / tokenizer_file, sharded / tokenizer_file)
    assert len(list(sharded.glob("*.safetensors"))) > 3
    assert generate(sharded) == generate(single)


def test_missing_weight_is_named(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    model_dir = copy_checkpoint(tiny_checkpoint(), tmp_path / "m")
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="layers.1.mlp.down_proj.weight"):
        generate(model_dir)


def test_unexpected_weight_is_named(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    model_dir = copy_checkpoint(tiny_checkpoint(), tmp_path / "m")
    tensors = load_file(model_dir / "model.safetensors")
    tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="extra.weight"):
        generate(model_dir)


def test_wrong_shape_is_an_error(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    model_dir = copy_checkpoint(tiny_checkpoint(), tmp_path / "m")
    config = json.loads((model_dir / "config.json").read_text())
    config["hidden_size"] = 32  # the checkpoint's tensors no longer fit
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not fit"):
        generate(model_dir)


def test_larger_vocabulary_than_config_is_an_error(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    model_dir = copy_checkpoint(tiny_checkpoint(), tmp_path / "m")
    config = json.loads((model_dir / "config.json").read_text())
    config["vocab_size"] -= 8  # rows would otherwise be dropped silently
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="embed_tokens"):
        generate(model_dir)


def test_no_safetensors_files(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    model_dir = copy_checkpoint(tiny_checkpoint(), tmp_path / "m")
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="safetensors"):
        generate(model_dir)
