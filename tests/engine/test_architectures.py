"""Qwen2/Qwen2.5/Qwen3 checkpoints read into the right decoder flags; sliding windows are honoured or refused."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from engine import LLMEngine
from engine.config import EngineConfig, ModelConfig
from tests.engine.test_hf_parity import GREEDY, hf_greedy, random_prompts


def with_config(src: Path, dst: Path, **changes: object) -> Path:
    """A copy of checkpoint `src` whose config.json has `changes` (None deletes a key)."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    config = {key: value for key, value in config.items() if value is not None}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    "name,architecture,qk_norm,qkv_bias",
    [("tied-gqa2-hd16", "Qwen3ForCausalLM", True, False), ("qwen2-untied-gqa2", "Qwen2ForCausalLM", False, True)],
)
def test_flags_follow_the_architecture(
    name: str, architecture: str, qk_norm: bool, qkv_bias: bool, tiny_checkpoint: Callable[..., Path]
) -> None:
    config = ModelConfig.from_dir(tiny_checkpoint(name))
    assert (config.architecture, config.qk_norm, config.qkv_bias, config.o_proj_bias) == (
        architecture, qk_norm, qkv_bias, False
    )


def test_model_type_names_the_architecture_when_architectures_is_absent(
    tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    model_dir = with_config(tiny_checkpoint("qwen2-untied-gqa2"), tmp_path / "m", architectures=None)
    assert ModelConfig.from_dir(model_dir).architecture == "Qwen2ForCausalLM"


def test_unsupported_model_type_is_named(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    model_dir = with_config(tiny_checkpoint(), tmp_path / "m", architectures=None, model_type="qwen2_moe")
    with pytest.raises(ValueError, match="unsupported architecture 'qwen2_moe'.*Qwen2ForCausalLM, Qwen3ForCausalLM"):
        ModelConfig.from_dir(model_dir)


def test_qwen3_attention_bias_matches_hugging_face(tiny_checkpoint: Callable[..., Path]) -> None:
    model_dir = tiny_checkpoint("untied-mha-hd32", attention_bias=True)
    config = ModelConfig.from_dir(model_dir)
    assert config.qkv_bias and config.o_proj_bias
    prompts = random_prompts(4, [5, 40])
    engine = LLMEngine(model_dir, device="cpu", dtype="float32", max_model_len=256)
    assert [r["token_ids"] for r in engine.generate(prompts, GREEDY, use_tqdm=False)] == hf_greedy(model_dir, prompts)


def test_sliding_window_settings_that_are_off_are_ignored(tiny_checkpoint: Callable[..., Path]) -> None:
    model_dir = tiny_checkpoint("qwen2.5-tied-gqa4")  # use_sliding_window false, sliding_window 32
    assert json.loads((model_dir / "config.json").read_text())["sliding_window"] == 32
    assert ModelConfig.from_dir(model_dir).sliding_window is None
    assert EngineConfig.create(model_dir, device="cpu").max_model_len == 1024  # max_position_embeddings


@pytest.mark.parametrize("changes", [{"max_window_layers": 2}, {"layer_types": ["full_attention"] * 2}])
def test_sliding_window_on_no_layer_is_off(
    changes: dict, tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    sliding = tiny_checkpoint("qwen2-untied-gqa2", use_sliding_window=True, sliding_window=64, max_window_layers=1)
    model_dir = with_config(sliding, tmp_path / "m", **changes)
    assert ModelConfig.from_dir(model_dir).sliding_window is None


def test_sliding_window_caps_the_context_and_matches_hugging_face_within_it(
    tiny_checkpoint: Callable[..., Path],
) -> None:
    # Layer 1 of 2 slides over 64 tokens: full attention computes the same for sequences up to 64 tokens.
    model_dir = tiny_checkpoint("qwen2-untied-gqa2", use_sliding_window=True, sliding_window=64, max_window_layers=1)
    assert ModelConfig.from_dir(model_dir).sliding_window == 64
    engine = LLMEngine(model_dir, device="cpu", dtype="float32")
    assert engine.config.max_model_len == 64
    prompts = random_prompts(5, [1, 17, 32])  # + 32 new tokens: at most 64
    assert [r["token_ids"] for r in engine.generate(prompts, GREEDY, use_tqdm=False)] == hf_greedy(model_dir, prompts)
    with pytest.raises(ValueError, match="max_model_len=65 exceeds the model's sliding_window=64"):
        EngineConfig.create(model_dir, device="cpu", max_model_len=65)


YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256}


def test_yarn_rope_matches_hugging_face_beyond_the_original_context(
    tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    model_dir = tiny_checkpoint("tied-gqa2-hd16", max_position_embeddings=1024, rope_parameters=YARN)
    engine = LLMEngine(model_dir, device="cpu", dtype="float32", max_model_len=1024)
    prompts = random_prompts(6, [5, 300, 700])  # the last two run past the 256 positions it was "trained" on
    expected = hf_greedy(model_dir, prompts)
    assert [r["token_ids"] for r in engine.generate(prompts, GREEDY, use_tqdm=False)] == expected
    # The control: the same weights read with plain RoPE answer otherwise, so the match above is YaRN's.
    plain = with_config(model_dir, tmp_path / "plain", rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    engine = LLMEngine(plain, device="cpu", dtype="float32", max_model_len=1024)
    assert [r["token_ids"] for r in engine.generate(prompts, GREEDY, use_tqdm=False)] != expected


def test_yarn_read_from_either_config_format_sets_the_context_length(
    tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    # Qwen's own instructions: keep max_position_embeddings and add a classic rope_scaling block.
    classic = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
    model_dir = with_config(tiny_checkpoint(), tmp_path / "classic", rope_parameters=None, rope_scaling=classic,
                            rope_theta=500000.0, max_position_embeddings=300)
    config = ModelConfig.from_dir(model_dir)
    assert (config.rope_theta, config.rope_scaling.factor, config.context_length) == (500000.0, 4.0, 1024)
    assert EngineConfig.create(model_dir, device="cpu").max_model_len == 1024
    with pytest.raises(ValueError, match="max_model_len=1025 exceeds the model's context length of 1024"):
        EngineConfig.create(model_dir, device="cpu", max_model_len=1025)


@pytest.mark.parametrize("rope, message", [
    ({"rope_type": "longrope", "rope_theta": 1e4}, "rope scaling type 'longrope' is not supported"),
    ({**YARN, "factor": -2.0}, "rope_scaling.factor must be a positive number, got -2.0"),
])
def test_rope_settings_it_cannot_serve_are_refused_by_name(
    rope: dict, message: str, tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    model_dir = with_config(tiny_checkpoint(), tmp_path / "m", rope_parameters=rope)
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dir(model_dir)
