"""Exp(1) noise for sampling, keyed per row: the same key always gives the same row of noise.

The sampler picks argmax(probs / E) (the exponential race), so a request's randomness is just
its rows of E. A counter-based generator (Philox, keyed by the row's 64-bit key, counter = vocab
index) makes a row a pure function of its key, whatever batch it is computed in.

`exponential_race` runs the race in one pass over the logits, in log space:
argmax(logits / T - log E) picks the same distribution as argmax(softmax(logits / T) / E), with no
softmax and no [B, V] float32 intermediates (it reads the logits once, in their own dtype).
"""

from __future__ import annotations

import torch

from kernels.triton_compat import tl, triton

_TINY = torch.finfo(torch.float32).tiny  # Exp(1) can round to 0; 0 would turn 0 / E into NaN


def exponential_noise(
    keys: torch.Tensor,  # [S] int64: the 64-bit key of each row (two's complement)
    rows: torch.Tensor,  # [S] int64: which row of `out` each key fills
    out: torch.Tensor,  # [B, V] float32, rows not named in `rows` are left as they are
) -> None:
    """Triton Philox version: one program per (row, vocabulary chunk), no host synchronisation."""
    vocab_size = out.shape[1]
    block = 4096
    grid = (keys.shape[0], triton.cdiv(vocab_size, block))
    _exponential_noise_kernel[grid](keys, rows, out, out.stride(0), vocab_size, _TINY, BLOCK=block)


@triton.jit
def _exp1(key, offs, tiny):
    """Exp(1) draws [BLOCK] of the stream `key` at counters `offs`: the one definition both kernels use."""
    u = tl.rand(key, offs)  # uniform in [0, 1)
    return tl.maximum(-tl.log(1.0 - u), tiny)


@triton.jit
def _exponential_noise_kernel(keys, rows, Out, stride_row, vocab_size, tiny, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    key = tl.load(keys + i)
    row = tl.load(rows + i)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Out + row * stride_row + offs, _exp1(key, offs, tiny), mask=offs < vocab_size)


def exponential_race(
    logits: torch.Tensor,  # [B, V], any float dtype
    keys: torch.Tensor,  # [S] int64: the 64-bit key of each sampled row
    rows: torch.Tensor,  # [S] int64: the row of `logits` each key samples
    temperatures: torch.Tensor,  # [S] float32, > 0
) -> torch.Tensor:  # [S] int64
    """argmax over v of logits[row, v] / T - log E[v], with E the row's Philox noise (as `exponential_noise`
    draws it): one program per (row, vocabulary chunk) keeps its best score, then the best chunk wins
    (ties go to the lowest index, as torch.argmax breaks them)."""
    num_rows, vocab_size = keys.shape[0], logits.shape[1]
    block = 4096
    num_chunks = triton.cdiv(vocab_size, block)
    best = torch.empty(num_rows, num_chunks, dtype=torch.float32, device=logits.device)
    best_ids = torch.empty(num_rows, num_chunks, dtype=torch.int64, device=logits.device)
    _exponential_race_kernel[(num_rows, num_chunks)](
        logits, logits.stride(0), keys, rows, temperatures, best, best_ids, vocab_size, _TINY, num_chunks,
        BLOCK=block,
    )
    return best_ids.gather(1, best.argmax(dim=1, keepdim=True)).squeeze(1)


@triton.jit
def _exponential_race_kernel(
    Logits, stride_row, keys, rows, temperatures, Best, BestIds, vocab_size, tiny, num_chunks, BLOCK: tl.constexpr
):
    i = tl.program_id(0)
    chunk = tl.program_id(1)
    key = tl.load(keys + i)
    row = tl.load(rows + i)
    temperature = tl.load(temperatures + i)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    in_vocab = offs < vocab_size
    logits = tl.load(Logits + row * stride_row + offs, mask=in_vocab, other=float("-inf")).to(tl.float32)
    scores = tl.where(in_vocab, logits / temperature - tl.log(_exp1(key, offs, tiny)), float("-inf"))
    best = tl.argmax(scores, axis=0)
    tl.store(Best + i * num_chunks + chunk, tl.max(scores, axis=0))
    tl.store(BestIds + i * num_chunks + chunk, chunk * BLOCK + best)


def exponential_noise_ref(keys: torch.Tensor, rows: torch.Tensor, out: torch.Tensor) -> None:
    """Torch version: a generator per row seeded with its key (a different stream than Philox's,
    with the same guarantee). CPU generators keep only the key's low 32 bits."""
    generator = torch.Generator(device=out.device)
    for key, row in zip(keys.tolist(), rows.tolist()):
        generator.manual_seed(key & 0xFFFF_FFFF_FFFF_FFFF)
        # A fresh contiguous tensor per row, so the draw cannot depend on where the row sits.
        out[row] = torch.empty(out.shape[1], device=out.device).exponential_(generator=generator).clamp_min_(_TINY)
