"""The batch-invariant mode (`LLMEngine(batch_invariant=True)`): a token's logits do not depend on the batch.

Why a token's numbers move with its batch on a GPU, measured on an H200 in bf16 (`bench/invariance_probe.py`,
bench/RESULTS.md): cuBLAS switches to split-K for some shapes as the row count grows (the MLP's down
projection from 256 rows), which sums each row's products in another order; attention reduces a query's
keys in tiles of 128 keys on the decode path, of 64 on the prefill path, and across a number of KV splits
chosen by the batch size; torch scans a lone row (the sampler's top-p cumulative sum) with another algorithm
than a batch's rows; and the q/k-norm + rotary kernel summed a head's squares in an order that followed the
step's token count (it takes more heads per program from 1,024 tokens on). RMSNorm, SiLU, softmax, sort and
top-k came out the same.

So the mode changes three things; the other two are fixed for every mode (engine/sampler.py `_row_cumsum`, and
kernels/rotary_kv_store.py, which now takes the same number of heads per program in every step):
- cuBLAS gets no workspace (`CUBLAS_WORKSPACE_CONFIG=:0:0`), which rules out split-K: each output row is then
  the same sum in the same order whatever M is (the probe: bitwise equal from 1 to 8,192 rows, every shape).
  Steps of at most 16 rows (decode at small batches) take the skinny Triton matmul without split-K, which
  gives a row the same bits as cuBLAS there (checked at start-up: `skinny_matmul_matches_cublas`); off the
  mode it splits K for narrow weights, faster still.
- Attention (`kernels/paged_attention.py`) runs one tile shape on both paths (16 query rows, 64 keys) and no KV
  split, so a query's keys are reduced in the same order in decode, in a prefill chunk of any size, and after
  a prefix-cache hit. flash-attn, whose decode and prefill differ, is not used in the mode.
- With 3 or more tensor-parallel ranks, a row-parallel layer sums the ranks' partials in rank order
  (engine/layers/tp_reduce.py): NCCL and gloo add a row's ranks in an order that follows the message's size.
The aim: a request alone, in any batch, chunked under any token budget, cached or not, preempted and
recomputed, or resumed from prompt + its first tokens, gets bitwise the same logits;
tests/engine/test_gpu_batch_invariance.py checks exactly that on a GPU.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from kernels.skinny_matmul import MAX_ROWS, skinny_config, skinny_matmul

log = logging.getLogger(__name__)

NO_SPLIT_K = ":0:0"  # CUBLAS_WORKSPACE_CONFIG: no workspace, hence no split-K


def disable_cublas_split_k() -> None:
    """Give cuBLAS no workspace in this process and the processes it starts from now on.

    cuBLAS reads the setting once, at its first call in a process: an engine built after something else in
    the process already multiplied on the GPU cannot change it, and is warned.
    """
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") == NO_SPLIT_K:
        return
    if torch.cuda.is_initialized():
        log.warning("batch_invariant: CUDA was in use in this process before the engine; if it ran a matmul, cuBLAS "
                    "keeps its split-K workspace. Start the process with CUBLAS_WORKSPACE_CONFIG=%s to be sure",
                    NO_SPLIT_K)
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = NO_SPLIT_K


def skinny_matmul_matches_cublas(shapes: set[tuple[int, int]], dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the skinny matmul, unsplit, gives a row the bits cuBLAS without split-K gives it, for every weight
    shape here: then decode steps of a few rows may take the faster kernel and keep the mode exact.

    On an H200 in bf16 it does for every Qwen3-0.6B projection at 16 and at 256 rows (bench/RESULTS.md): both add
    a row's products in K order through the same tensor-core steps. NVIDIA does not promise that, so the engine
    checks it here, at start-up, on random numbers, and keeps cuBLAS for every row count where it differs.
    """
    g = torch.Generator(device=device).manual_seed(0)
    for n, k in sorted(shapes):
        weight = torch.randn(n, k, generator=g, device=device).to(dtype) / k**0.5
        x = torch.randn(256, k, generator=g, device=device).to(dtype)
        want = F.linear(x, weight)[:MAX_ROWS]
        if not torch.equal(skinny_matmul(x[:MAX_ROWS], weight, skinny_config(n, k, split=False)), want):
            log.warning("batch_invariant: the skinny matmul sums a [%d, %d] weight's rows unlike cuBLAS on this "
                        "GPU; decode steps keep cuBLAS (slower at small batches)", n, k)
            return False
    return True
