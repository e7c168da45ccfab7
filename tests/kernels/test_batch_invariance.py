"""A row's output bits do not depend on the rows around it (the batch-invariant mode, engine/batch_invariance.py):
for every kernel on the model's path, bf16, Qwen3-0.6B's shapes, one fixed input row computed alone and inside
batches of the sizes the engine runs (the CUDA-graph padded decode sizes and prefill steps). Attention has its
own in test_paged_attention.py, the sampler in tests/engine/test_sampler.py. These are properties of the compiled
kernels, so they need a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kernels.rms_norm import rms_norm
from kernels.rotary_kv_store import rotary_kv_store
from kernels.silu_and_mul import silu_and_mul

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="bitwise equality of compiled kernels: a GPU")
ROWS = (1, 2, 3, 4, 8, 16, 24, 64, 256, 512, 2048, 8192)  # graph sizes 1-512 (steps of 8 from 16), prefill steps
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 1024, 3072, 16, 8, 128


def mixed(*shape: int, seed: int = 0) -> torch.Tensor:
    """bf16 values of mixed magnitudes (2^-8 to 2^3), so sums round and a changed order shows."""
    g = torch.Generator().manual_seed(seed)
    scales = 2.0 ** torch.randint(-8, 4, shape, generator=g)
    return (torch.randn(*shape, generator=g) * scales).to("cuda", torch.bfloat16)


def test_rms_norm_with_residual() -> None:
    x, residual, weight = mixed(max(ROWS), HIDDEN), mixed(max(ROWS), HIDDEN, seed=1), mixed(HIDDEN, seed=2)
    alone = rms_norm(x[:1], weight, 1e-6, residual[:1])
    for m in ROWS:
        out, new_residual = rms_norm(x[:m], weight, 1e-6, residual[:m])
        assert torch.equal(out[:1], alone[0]) and torch.equal(new_residual[:1], alone[1]), m


def test_silu_and_mul() -> None:
    x = mixed(max(ROWS), 2 * INTERMEDIATE)
    alone = silu_and_mul(x[:1])
    for m in ROWS:
        assert torch.equal(silu_and_mul(x[:m])[:1], alone), m


def test_rotary_kv_store() -> None:
    """The tokens of a 1,023-token step (a head per program) get the same q, keys and values as the first 1,023
    of longer steps (8 heads per program). A [heads, D/2] tile per program once summed a head's squares in
    another order than one head's vector, and moved keys by a bf16 ulp (bench/RESULTS.md)."""
    n = max(ROWS)
    qkv = mixed(n, (HEADS + 2 * KV_HEADS) * HEAD_DIM)
    positions = torch.arange(n, device="cuda")
    angles = torch.outer(torch.arange(n).float(), 1e6 ** -(torch.arange(0, HEAD_DIM, 2) / HEAD_DIM))
    cos, sin = torch.cat([angles, angles], -1).cos().cuda(), torch.cat([angles, angles], -1).sin().cuda()
    weights = mixed(HEAD_DIM, seed=4), mixed(HEAD_DIM, seed=5)

    def step(num_tokens: int) -> tuple[torch.Tensor, ...]:
        caches = [torch.zeros(num_tokens, 1, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda") for _ in "kv"]
        q = rotary_kv_store(qkv[:num_tokens], positions[:num_tokens], *weights, cos, sin, 1e-6, HEADS, KV_HEADS,
                            *caches, positions[:num_tokens])
        return q[:1023], caches[0][:1023], caches[1][:1023]

    alone = step(1023)
    for m in (1024, 2048, n):
        assert all(torch.equal(a, b) for a, b in zip(alone, step(m))), m


LINEAR_PROBE = textwrap.dedent("""
    import sys, torch, torch.nn.functional as F
    from tests.kernels.test_batch_invariance import HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, ROWS, mixed
    shapes = {"qkv": (HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM), "o_proj": (HEADS * HEAD_DIM, HIDDEN),
              "gate_up": (HIDDEN, 2 * INTERMEDIATE), "down": (INTERMEDIATE, HIDDEN), "lm_head": (HIDDEN, 151936)}
    from kernels.skinny_matmul import MAX_ROWS, skinny_config, skinny_matmul
    for name, (k, n) in shapes.items():
        x, w = mixed(max(ROWS), k), mixed(n, k, seed=1) * 0.05
        alone = F.linear(x[:1], w)
        print(name, [m for m in ROWS if not torch.equal(F.linear(x[:m], w)[:1], alone)])
        cublas = F.linear(x[:256], w)[:MAX_ROWS]  # the skinny matmul's rows against cuBLAS's, unsplit and split
        print(name, "skinny", *(torch.equal(skinny_matmul(x[:MAX_ROWS], w, skinny_config(n, k, split)), cublas)
                                for split in (False, True)))
""")


def differing_row_counts(workspace: str | None) -> str:
    """Per projection, the row counts at which row 0 of F.linear differs from row 0 alone, in a process whose
    cuBLAS has `workspace` as CUBLAS_WORKSPACE_CONFIG (read once per process)."""
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    if workspace is not None:
        env["CUBLAS_WORKSPACE_CONFIG"] = workspace
    return subprocess.run([sys.executable, "-c", LINEAR_PROBE], env=env, cwd=Path(__file__).parents[2], check=True,
                          capture_output=True, text=True, timeout=300).stdout


def test_linear_layers_without_split_k() -> None:
    """cuBLAS without workspace (the mode's setting, engine/batch_invariance.py NO_SPLIT_K): every projection of
    the model gives row 0 the same bits at every row count. With its default workspace, cuBLAS picks split-K for
    some shapes (on an H200: the down projection from 256 rows), printed here as the control."""
    from engine.batch_invariance import NO_SPLIT_K

    print("default workspace, row counts differing:\n" + differing_row_counts(None))
    lines = differing_row_counts(NO_SPLIT_K).splitlines()
    print("no split-K:", *lines, sep="\n")
    assert [line for line in lines if "skinny" not in line] == [f"{name} []" for name in
                                                               ("qkv", "o_proj", "gate_up", "down", "lm_head")]
    # The mode runs decode steps of <= 16 rows through the skinny matmul, unsplit, where its rows are cuBLAS's
    # bits (engine/batch_invariance.py checks it at start-up too); split K (its control) sums in another order.
    skinny = {line.split()[0]: line.split()[2:] for line in lines if "skinny" in line}
    assert all(unsplit == "True" for unsplit, _ in skinny.values()), skinny
    assert skinny["o_proj"][1] == "False" and skinny["down"][1] == "False", skinny
