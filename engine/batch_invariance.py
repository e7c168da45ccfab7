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
