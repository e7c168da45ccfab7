"""Exp(1) noise for sampling, keyed per row: the same key always gives the same row of noise.

The sampler picks argmax(probs / E) (the exponential race), so a request's randomness is just
its rows of E. A counter-based generator (Philox, keyed by the row's 64-bit key, its counter and
output lane derived from the vocabulary index) makes a row a pure function of its key, whatever batch
it is computed in.

`exponential_race` runs the race in one pass over the logits, in log space:
argmax(logits / T - log E) picks the same distribution as argmax(softmax(logits / T) / E), with no
softmax and no [B, V] float32 intermediates (it reads the logits once, in their own dtype).
"""

from __future__ import annotations

import torch

from kernels.triton_compat import tl, triton

_TINY = torch.finfo(torch.float32).tiny  # Exp(1) can round to 0; 0 would turn 0 / E into NaN
# Vocabulary entries per program. A row's noise depends on it: one Philox call draws the entries o,
# o + QUARTER, o + 2 QUARTER and o + 3 QUARTER of a chunk (a quarter of the integer work of one call per
# entry, which made the race compute-bound), so keep it the same in both kernels.
_BLOCK = 4096
_QUARTER = _BLOCK // 4


def exponential_noise(
    keys: torch.Tensor,  # [S] int64: the 64-bit key of each row (two's complement)
    rows: torch.Tensor,  # [S] int64: which row of `out` each key fills
    out: torch.Tensor,  # [B, V] float32, rows not named in `rows` are left as they are
) -> None:
    """Triton Philox version: one program per (row, vocabulary chunk), no host synchronisation."""
    vocab_size = out.shape[1]
    grid = (keys.shape[0], triton.cdiv(vocab_size, _BLOCK))
    _exponential_noise_kernel[grid](keys, rows, out, out.stride(0), vocab_size, _TINY, QUARTER=_QUARTER)


@triton.jit
def _exp1_chunk(key, chunk, tiny, QUARTER: tl.constexpr):
    """Exp(1) draws of the stream `key` for the four quarters of vocabulary chunk `chunk`: the one definition
    both kernels use. Quarter j holds entries chunk * 4 QUARTER + j QUARTER + [0, QUARTER)."""
    u0, u1, u2, u3 = tl.rand4x(key, chunk * QUARTER + tl.arange(0, QUARTER))  # uniform in [0, 1)
    e0 = tl.maximum(-tl.log(1.0 - u0), tiny)
    e1 = tl.maximum(-tl.log(1.0 - u1), tiny)
    e2 = tl.maximum(-tl.log(1.0 - u2), tiny)
    e3 = tl.maximum(-tl.log(1.0 - u3), tiny)
    return e0, e1, e2, e3


@triton.jit
def _exponential_noise_kernel(keys, rows, Out, stride_row, vocab_size, tiny, QUARTER: tl.constexpr):
    i = tl.program_id(0)
    chunk = tl.program_id(1)
    key = tl.load(keys + i)
    dst = Out + tl.load(rows + i) * stride_row
    offs = chunk * 4 * QUARTER + tl.arange(0, QUARTER)
    e0, e1, e2, e3 = _exp1_chunk(key, chunk, tiny, QUARTER)
    tl.store(dst + offs, e0, mask=offs < vocab_size)
    tl.store(dst + offs + QUARTER, e1, mask=offs + QUARTER < vocab_size)
    tl.store(dst + offs + 2 * QUARTER, e2, mask=offs + 2 * QUARTER < vocab_size)
    tl.store(dst + offs + 3 * QUARTER, e3, mask=offs + 3 * QUARTER < vocab_size)


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
    num_chunks = triton.cdiv(vocab_size, _BLOCK)
    best = torch.empty(num_rows, num_chunks, dtype=torch.float32, device=logits.device)
    best_ids = torch.empty(num_rows, num_chunks, dtype=torch.int64, device=logits.device)
    _exponential_race_kernel[(num_rows, num_chunks)](
        logits, logits.stride(0), keys, rows, temperatures, best, best_ids, vocab_size, _TINY, num_chunks,
        QUARTER=_QUARTER,
    )
    return best_ids.gather(1, best.argmax(dim=1, keepdim=True)).squeeze(1)


@triton.jit
def _race_quarter(Logits, start, vocab_size, temperature, e, best, best_id, QUARTER: tl.constexpr):
    """Fold the scores of entries start + [0, QUARTER) into the running best; a later quarter wins only when
    strictly better, so ties keep the lowest index."""
    offs = start + tl.arange(0, QUARTER)
    in_vocab = offs < vocab_size
    logits = tl.load(Logits + offs, mask=in_vocab, other=float("-inf")).to(tl.float32)
    scores = tl.where(in_vocab, logits / temperature - tl.log(e), float("-inf"))
    score = tl.max(scores, axis=0)
    better = score > best
    return tl.where(better, score, best), tl.where(better, start + tl.argmax(scores, axis=0), best_id)


@triton.jit
def _exponential_race_kernel(
    Logits, stride_row, keys, rows, temperatures, Best, BestIds, vocab_size, tiny, num_chunks,
    QUARTER: tl.constexpr,
):
    i = tl.program_id(0)
    chunk = tl.program_id(1)
    key = tl.load(keys + i)
    temperature = tl.load(temperatures + i)
    src = Logits + tl.load(rows + i) * stride_row
    start = chunk * 4 * QUARTER
    e0, e1, e2, e3 = _exp1_chunk(key, chunk, tiny, QUARTER)
    best, best_id = _race_quarter(src, start, vocab_size, temperature, e0, float("-inf"), start, QUARTER)
    best, best_id = _race_quarter(src, start + QUARTER, vocab_size, temperature, e1, best, best_id, QUARTER)
    best, best_id = _race_quarter(src, start + 2 * QUARTER, vocab_size, temperature, e2, best, best_id, QUARTER)
    best, best_id = _race_quarter(src, start + 3 * QUARTER, vocab_size, temperature, e3, best, best_id, QUARTER)
    tl.store(Best + i * num_chunks + chunk, best)
    tl.store(BestIds + i * num_chunks + chunk, best_id.to(tl.int64))


def exponential_noise_ref(keys: torch.Tensor, rows: torch.Tensor, out: torch.Tensor) -> None:
    """Torch version: a generator per row seeded with its key (a different stream than Philox's,
    with the same guarantee). CPU generators keep only the key's low 32 bits."""
    generator = torch.Generator(device=out.device)
    for key, row in zip(keys.tolist(), rows.tolist()):
        generator.manual_seed(key & 0xFFFF_FFFF_FFFF_FFFF)
        # A fresh contiguous tensor per row, so the draw cannot depend on where the row sits.
        out[row] = torch.empty(out.shape[1], device=out.device).exponential_(generator=generator).clamp_min_(_TINY)
