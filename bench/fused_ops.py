"""Fused kernels against the unfused torch code they replace, on Qwen3-0.6B shapes (GPU), and the
sampler's one-pass exponential race against its softmax / noise / argmax path at batch 256.

    python bench/fused_ops.py
"""

from __future__ import annotations

import argparse

import torch
from common import time_cuda

from engine.sampler import Sampler, SamplingBatch
from engine.sampler import _sample as unfused_sample
from engine.sampling_params import SamplingParams
from kernels.rms_norm import rms_norm, rms_norm_ref
from kernels.rotary_kv_store import rotary_kv_store, rotary_kv_store_ref
from kernels.silu_and_mul import silu_and_mul, silu_and_mul_ref

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE, VOCAB = 1024, 16, 8, 128, 3072, 151936


def compare(tokens: int) -> None:
    """Time each fused kernel and its unfused torch reference on `tokens` rows."""
    dt = torch.bfloat16
    x = torch.randn(tokens, HIDDEN, device="cuda", dtype=dt)
    residual = torch.randn_like(x)
    weight = torch.randn(HIDDEN, device="cuda", dtype=dt)
    qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device="cuda", dtype=dt)
    positions = torch.randint(0, 4096, (tokens,), device="cuda")
    cos, sin = torch.rand(4096, HEAD_DIM, device="cuda"), torch.rand(4096, HEAD_DIM, device="cuda")
    head_w = torch.randn(HEAD_DIM, device="cuda", dtype=dt)
    gate_up = torch.randn(tokens, 2 * INTERMEDIATE, device="cuda", dtype=dt)
    k_cache = torch.empty(tokens // 16 + 1, 16, KV_HEADS, HEAD_DIM, device="cuda", dtype=dt)
    v_cache = torch.empty_like(k_cache)
    slots = torch.randperm(k_cache.shape[0] * 16, device="cuda")[:tokens]
    rope_args = (qkv, positions, head_w, head_w, cos, sin, 1e-6, HEADS, KV_HEADS, k_cache, v_cache, slots)
    cases = {
        "rms_norm + residual": (lambda: rms_norm(x, weight, 1e-6, residual),
                                lambda: rms_norm_ref(x, weight, 1e-6, residual)),
        "q/k norm+rotary+KV": (lambda: rotary_kv_store(*rope_args), lambda: rotary_kv_store_ref(*rope_args)),
        "silu_and_mul": (lambda: silu_and_mul(gate_up), lambda: silu_and_mul_ref(gate_up)),
    }
    for name, (fused, unfused) in cases.items():
        f, u = time_cuda(fused, iters=50, hide_launch=True), time_cuda(unfused, iters=50, hide_launch=True)
        print(f"{tokens:5d} tokens  {name:20s} fused {f * 1e6:7.1f} us  unfused {u * 1e6:7.1f} us  "
              f"speed-up {u / f:4.1f}x")


def compare_sampler(rows: int = 256) -> None:
    """One step's sampling at temperature 0.6 (no top-k/top-p/min-p): the fused race against the path
    these rows took before it (float32 copy, scale, softmax, Philox noise tensor, divide, argmax)."""
    logits = torch.randn(rows, VOCAB, device="cuda", dtype=torch.bfloat16)
    batch = SamplingBatch.build([SamplingParams(temperature=0.6)] * rows, list(range(rows)), [0] * rows,
                                [[]] * rows, torch.device("cuda"))
    sampler = Sampler()
    f = time_cuda(lambda: sampler(logits, batch), iters=50, hide_launch=True)
    u = time_cuda(lambda: unfused_sample(logits, batch), iters=50, hide_launch=True)
    print(f"{rows:5d} rows    sampling (T=0.6)     fused {f * 1e6:7.1f} us  unfused {u * 1e6:7.1f} us  "
          f"speed-up {u / f:4.1f}x")


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    for tokens in (256, 8192):
        compare(tokens)
    compare_sampler()


if __name__ == "__main__":
    main()
