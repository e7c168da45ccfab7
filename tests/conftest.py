"""Shared fixtures: tiny random Qwen3 checkpoints built with transformers, loaded through our loader."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from engine.qwen_tokenizer import cached_qwen_tokenizer_dir
from engine.tokenizer import Tokenizer

# Without a GPU, Triton kernels run in Triton's CPU interpreter; it must be chosen before any kernel
# module is imported, since `triton.jit` reads it when decorating.
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

# name -> Qwen3Config overrides. Covers tied/untied heads, GQA ratios 1, 2, 4 and head dims 16 and 32.
TINY_CONFIGS: dict[str, dict] = {
    "tied-gqa2-hd16": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
    "untied-mha-hd32": dict(num_attention_heads=4, num_key_value_heads=4, head_dim=32, tie_word_embeddings=False),
    "tied-gqa4-hd32": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True),
}


def write_tiny_qwen3(path: Path, seed: int = 0, **overrides: object) -> Path:
    """Save a random Qwen3 with transformers (safetensors) plus the Qwen tokenizer files."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = dict(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True,
        initializer_range=0.3,  # wide enough that greedy output varies (0.02 repeats one token)
    )
    config.update(overrides)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**config)).eval()
    model.save_pretrained(path, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(cached_qwen_tokenizer_dir() / name, path / name)
    return path


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
            built[key] = write_tiny_qwen3(tmp_path_factory.mktemp(name), **config)
        return built[key]

    return make
