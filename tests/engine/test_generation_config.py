"""Sampling defaults from the checkpoint's generation_config.json (vLLM's --generation-config auto), and "vllm",
which ignores them."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from engine import LLMEngine, SamplingParams

QWEN3_STYLE = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_new_tokens": 7,
               "eos_token_id": [151643, 151645]}


def with_generation_config(src: Path, dst: Path, generation: dict) -> Path:
    shutil.copytree(src, dst)
    (dst / "generation_config.json").write_text(json.dumps(generation))
    return dst


@pytest.fixture(scope="module")
def qwen3_style(tiny_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_generation_config(tiny_checkpoint(), tmp_path_factory.mktemp("m") / "m", QWEN3_STYLE)


def test_unset_fields_take_the_checkpoints_defaults_and_set_ones_win(qwen3_style: Path) -> None:
    engine = LLMEngine(qwen3_style, device="cpu", max_model_len=128)
    assert engine.default_sampling_params() == SamplingParams(temperature=0.6, top_p=0.95, top_k=20)
    assert engine.default_sampling_params(temperature=0.0, top_k=-1) == SamplingParams(temperature=0.0, top_p=0.95)
    prompt, explicit = [1, 2, 3], dict(temperature=0.6, top_p=0.95, top_k=20)
    by_default = engine.generate(prompt, max_tokens=12, seed=5, ignore_eos=True, use_tqdm=False)["token_ids"]
    assert len(by_default) == 12  # max_new_tokens in the file is not a default: a request's length is its own
    plain = LLMEngine(qwen3_style, device="cpu", max_model_len=128, generation_config="vllm")
    assert plain.default_sampling_params() == SamplingParams()
    assert plain.generate(prompt, max_tokens=12, seed=5, ignore_eos=True, use_tqdm=False,
                          **explicit)["token_ids"] == by_default
    # The control: the same seed at SamplingParams' own defaults (temperature 1, no top-k/top-p) samples otherwise.
    assert plain.generate(prompt, max_tokens=12, seed=5, ignore_eos=True, use_tqdm=False)["token_ids"] != by_default


def test_a_default_the_engine_cannot_use_is_refused_by_name(
    tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    model_dir = with_generation_config(tiny_checkpoint(), tmp_path / "m", {"top_p": 2.0})
    with pytest.raises(ValueError, match="generation_config.json has a sampling default .*top_p"):
        LLMEngine(model_dir, device="cpu", max_model_len=128)
    LLMEngine(model_dir, device="cpu", max_model_len=128, generation_config="vllm")  # which does not read it
    with pytest.raises(ValueError, match="generation_config must be one of auto, vllm, got 'hf'"):
        LLMEngine(model_dir, device="cpu", max_model_len=128, generation_config="hf")
