"""Shared fixtures: tiny random Qwen2/Qwen3 checkpoints built with transformers, loaded through our loader."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from engine.qwen_tokenizer import cached_qwen_tokenizer_dir
from engine.tokenizer import Tokenizer
from tests.dev_shm import leaked_since, shm_names

# Without a GPU, Triton kernels run in Triton's CPU interpreter; it must be chosen before any kernel
# module is imported, since `kernels.triton_compat` imports Triton only where it is set (or a GPU is) and
# `triton.jit` reads it when decorating.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _let_triton_interpreter_index_with_numpy2() -> None:
    """Triton 3.6's interpreter turns a scalar (held as a 1-element array) into a Python int with
    `int(array)`, which NumPy >= 2.4 refuses; loop bounds loaded from memory then fail. Index via
    the array's single element instead (test-only: the compiled GPU path never runs this code)."""
    try:
        import triton.runtime.interpreter as interpreter
    except ImportError:
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor: object, scope: object) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))  # type: ignore

    interpreter._patch_lang_tensor = patched


_let_triton_interpreter_index_with_numpy2()

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# name -> config overrides ("model_type" picks the architecture; Qwen3 by default). The Qwen3 ones cover
# tied/untied heads, GQA ratios 1, 2, 4 and head dims 16 and 32; the Qwen2 ones q/k/v biases without q/k
# norms, and (as Qwen2.5 checkpoints ship) sliding-window settings that are off, with a window shorter
# than the tests' sequences so that honouring them by mistake would show.
TINY_CONFIGS: dict[str, dict] = {
    "tied-gqa2-hd16": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
    "untied-mha-hd32": dict(num_attention_heads=4, num_key_value_heads=4, head_dim=32, tie_word_embeddings=False),
    "tied-gqa4-hd32": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True),
    "qwen2-untied-gqa2": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2),
    "qwen2.5-tied-gqa4": dict(
        model_type="qwen2", hidden_size=128, num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
        use_sliding_window=False, sliding_window=32, max_window_layers=1,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ),
}


def write_tiny_checkpoint(path: Path, model_type: str = "qwen3", seed: int = 0, **overrides: object) -> Path:
    """Save a random Qwen2 or Qwen3 with transformers (safetensors) plus the Qwen tokenizer files.

    Biases are drawn at random too (transformers zeroes them), so a model that drops them shows it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True,
        initializer_range=0.3,  # wide enough that greedy output varies (0.02 repeats one token)
    )
    if model_type == "qwen3":
        config["head_dim"] = 16  # Qwen2 configs have no head_dim: it is hidden_size // num_attention_heads
    config.update(overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, float(config["initializer_range"]))  # type: ignore[arg-type]
    model.save_pretrained(path, safe_serialization=True)
    if "sliding_window" in overrides:
        _keep_raw_sliding_window(path / "config.json", overrides["sliding_window"])
    for name in TOKENIZER_FILES:
        shutil.copy(cached_qwen_tokenizer_dir() / name, path / name)
    return path


def _keep_raw_sliding_window(config_file: Path, window: object) -> None:
    """transformers 5 saves sliding_window as null when use_sliding_window is off, plus the layer_types it
    derives; released Qwen2.5 configs hold the raw window and no layer_types. Write it as they do."""
    config = json.loads(config_file.read_text())
    config["sliding_window"] = window
    config.pop("layer_types", None)
    config_file.write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    """Folder with Qwen3's tokenizer.json and tokenizer_config.json (cached across runs)."""
    return cached_qwen_tokenizer_dir()


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen_tokenizer_dir: Path) -> Tokenizer:
    """Our Tokenizer wrapper over the cached Qwen3 tokenizer."""
    return Tokenizer.from_dir(qwen_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: tiny_checkpoint("name", **overrides) -> checkpoint dir, built once per session per name."""
    built: dict[str, Path] = {}

    def make(name: str = "tied-gqa2-hd16", **overrides: object) -> Path:
        key = f"{name}-{sorted(overrides.items())}"
        if key not in built:
            config = {**TINY_CONFIGS.get(name, {}), **overrides}
            built[key] = write_tiny_checkpoint(tmp_path_factory.mktemp(name), **config)
        return built[key]

    return make


@pytest.fixture(scope="session", autouse=True)
def dev_shm_left_as_found() -> Iterator[None]:
    """The run leaves /dev/shm as it found it, however the processes it started ended. Torn down last (the
    first session fixture set up), so a leak fails the run as an error at the teardown of its last test."""
    before = shm_names()
    yield
    leaked = leaked_since(before)
    assert not leaked, f"the test run left these in /dev/shm, held by no live process: {sorted(leaked)}"
