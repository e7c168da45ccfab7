"""Random-weight Qwen3 checkpoints: the embedded default model (no hub needed) and benchmark models.

Checkpoints are written in Hugging Face's format (config.json, model.safetensors, tokenizer
files), so they load through the same loader as a real one, and Hugging Face can load them too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.qwen_tokenizer import cache_root, cached_qwen_tokenizer_dir

log = logging.getLogger(__name__)

QWEN3_EOS_TOKEN_IDS = [151645, 151643]  # <|im_end|>, <|endoftext|>

# Real Qwen3 vocabulary and tokenizer, tiny everything else: runs anywhere in a second.
TINY_QWEN3 = dict(
    vocab_size=151936, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
)
# The shape of Qwen/Qwen3-0.6B, for benchmarks.
QWEN3_0_6B = dict(
    vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
    num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
)
DEFAULT_MODEL_NAME = "tiny-random-qwen3-v4"


def default_model_dir() -> Path:
    """The embedded default model (TINY_QWEN3, random weights), built on first use and cached."""
    path = cache_root() / DEFAULT_MODEL_NAME
    if not (path / "config.json").is_file():
        log.info("building the embedded tiny random Qwen3 in %s (once)", path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_root()) as tmp:
            # A wide init makes the gibberish vary instead of repeating one token.
            write_random_qwen3(Path(tmp) / "model", TINY_QWEN3, dtype=torch.float32, init_std=0.3)
            with contextlib.suppress(OSError):  # another process built it first
                os.replace(Path(tmp) / "model", path)
    return path


def write_random_qwen3(
    out_dir: Path, shape: dict, *, dtype: torch.dtype = torch.bfloat16, seed: int = 0, init_std: float = 0.02
) -> Path:
    """Write a Qwen3 checkpoint of `shape` with N(0, init_std) weights and unit norms, plus the Qwen tokenizer."""
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        name: torch.ones(size, dtype=dtype) if name.endswith("norm.weight") else _init(size, generator, dtype, init_std)
        for name, size in _tensor_shapes(shape).items()
    }
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_act": "silu",
        "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None,
        "attention_bias": False, "initializer_range": init_std, "bos_token_id": 151643, "eos_token_id": 151645,
        "torch_dtype": str(dtype).removeprefix("torch."), **shape,
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": 151643, "eos_token_id": QWEN3_EOS_TOKEN_IDS, "pad_token_id": 151643}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(cached_qwen_tokenizer_dir() / name, out_dir / name)
    return out_dir


def _init(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype, std: float) -> torch.Tensor:
    return (torch.randn(shape, generator=generator) * std).to(dtype)


def _tensor_shapes(s: dict) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor names and shapes of a dense Qwen3."""
    h, d, inter = s["hidden_size"], s["head_dim"], s["intermediate_size"]
    q, kv = s["num_attention_heads"] * d, s["num_key_value_heads"] * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (s["vocab_size"], h), "model.norm.weight": (h,)}
    for i in range(s["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        })
    if not s["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (s["vocab_size"], h)
    return shapes
