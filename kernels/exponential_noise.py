"""Exp(1) noise for sampling, keyed per row: the same key always gives the same row of noise.

The sampler picks argmax(probs / E) (the exponential race), so a request's randomness is just
its rows of E. A counter-based generator (Philox, keyed by the row's 64-bit key, counter = vocab
index) makes a row a pure function of its key, whatever batch it is computed in.
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
def _exponential_noise_kernel(keys, rows, Out, stride_row, vocab_size, tiny, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    key = tl.load(keys + i)
    row = tl.load(rows + i)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    u = tl.rand(key, offs)  # [BLOCK] uniform in [0, 1)
    noise = tl.maximum(-tl.log(1.0 - u), tiny)
    tl.store(Out + row * stride_row + offs, noise, mask=offs < vocab_size)


def exponential_noise_ref(keys: torch.Tensor, rows: torch.Tensor, out: torch.Tensor) -> None:
    """Torch version: a generator per row seeded with its key (a different stream than Philox's,
    with the same guarantee). CPU generators keep only the key's low 32 bits."""
    generator = torch.Generator(device=out.device)
    for key, row in zip(keys.tolist(), rows.tolist()):
        generator.manual_seed(key & 0xFFFF_FFFF_FFFF_FFFF)
        # A fresh contiguous tensor per row, so the draw cannot depend on where the row sits.
        out[row] = torch.empty(out.shape[1], device=out.device).exponential_(generator=generator).clamp_min_(_TINY)
