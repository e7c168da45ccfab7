"""FP8 KV scales (engine/kv_scales.py) are bounds no input can exceed: inputs built to reach them, at any
magnitude, come within a few percent and never past, for Qwen3 (key norms) and Qwen2 (biases, no key norms). A scale
calibrated on ordinary activations, as a fixed or measured scale would be, saturates on them (the control)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from engine import LLMEngine
from engine.kv_scales import ROUNDING_MARGIN, fp8_kv_scales
from engine.models.qwen import QwenDecoderLayer
from kernels.fp8_kv import E4M3_MAX
from kernels.rotary_kv_store import rotary_kv_store_ref


def keys_and_values(layer: QwenDecoderLayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What `layer` stores for hidden states x [T, H] at positions 0, 1, ..: keys and values [T, Hkv, D], float32."""
    attn = layer.self_attn
    qkv = attn.qkv_proj(layer.input_layernorm(x))
    caches = [torch.zeros(len(x), 1, attn.num_kv_heads, attn.head_dim) for _ in "kv"]
    norms = (attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps) if attn.k_norm is not None else (None, None, 0.0)
    positions = torch.arange(len(x)) % len(attn.rotary.cos)
    rotary_kv_store_ref(qkv, positions, norms[0], norms[1], attn.rotary.cos, attn.rotary.sin, norms[2],
                        attn.num_heads, attn.num_kv_heads, *caches, torch.arange(len(x)))
    return caches[0][:, 0], caches[1][:, 0]


def adversarial_inputs(layer: QwenDecoderLayer) -> torch.Tensor:
    """Hidden states whose normalised input lines up with each k and v projection row (the Cauchy-Schwarz case),
    at magnitudes from 1e-3 to 1e4 (RMSNorm makes them alike), plus ordinary random states."""
    attn = layer.self_attn
    rows = attn.qkv_proj.weight[attn.num_heads * attn.head_dim :] * layer.input_layernorm.weight
    aligned = torch.cat([rows, -rows])
    ordinary = torch.randn(64, rows.shape[1], generator=torch.Generator().manual_seed(0))
    return torch.cat([aligned * scale for scale in (1e-3, 1.0, 1e4)] + [ordinary * 50])


@pytest.mark.parametrize("name", ["tied-gqa2-hd16", "qwen2-untied-gqa2"])
def test_no_input_exceeds_its_head_s_scale(tiny_checkpoint: Callable[..., Path], name: str) -> None:
    engine = LLMEngine(tiny_checkpoint(name), device="cpu", dtype="float32", kv_cache_dtype="fp8",
                       max_model_len=128, num_kv_blocks=8)
    layers = [m for m in engine.model_runner.model.modules() if isinstance(m, QwenDecoderLayer)]
    for layer in layers:
        k_scale, v_scale = fp8_kv_scales(layer)
        with torch.no_grad():
            keys, values = keys_and_values(layer, adversarial_inputs(layer))
        for stored, scale in ((keys, k_scale), (values, v_scale)):
            peak = stored.abs().amax(dim=(0, 2))  # per KV head
            assert (peak <= scale * E4M3_MAX).all(), (name, peak, scale * E4M3_MAX)  # e4m3's top: none saturates
        # The aligned inputs reach the value bound (within float32 rounding of it): it is not loose. (A key's needs a
        # one-hot key head, which no hidden state need produce.)
        assert (values.abs().amax(dim=(0, 2)) >= 0.9 * v_scale * E4M3_MAX / ROUNDING_MARGIN).all()
        # The control: scales calibrated on ordinary states (what a measured scale would be) saturate here.
        ordinary = torch.randn(64, layer.input_layernorm.weight.shape[0], generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            calibrated = [x.abs().amax(dim=(0, 2)) / E4M3_MAX for x in keys_and_values(layer, ordinary)]
        assert (values.abs().amax(dim=(0, 2)) > calibrated[1] * E4M3_MAX).any()
    engine.close()
