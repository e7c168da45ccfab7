"""The Philox noise kernel: Exp(1)-distributed, a pure function of each row's key."""

from __future__ import annotations

import pytest
import torch

from kernels.exponential_noise import exponential_noise, exponential_noise_ref
from kernels.triton_compat import HAS_TRITON

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VOCAB = 3000 if DEVICE == "cpu" else 151936


def noise(fn, keys: list[int], rows: list[int], num_rows: int) -> torch.Tensor:
    out = torch.full((num_rows, VOCAB), -1.0, device=DEVICE)  # rows not named must stay -1
    fn(torch.tensor(keys, device=DEVICE), torch.tensor(rows, device=DEVICE), out)
    return out


@pytest.mark.parametrize(
    "fn", [pytest.param(exponential_noise, marks=pytest.mark.skipif(not HAS_TRITON, reason="no Triton")),
           exponential_noise_ref],
)
def test_noise_is_exponential_and_keyed(fn) -> None:
    keys = [7, -(2**62), 2**40 + 3]  # int64 bit patterns, including a negative one
    out = noise(fn, keys, [0, 2, 3], num_rows=4)
    assert (out[1] == -1).all()  # untouched row
    sampled = out[[0, 2, 3]]
    assert (sampled > 0).all() and torch.isfinite(sampled).all()
    assert abs(sampled.mean().item() - 1.0) < 0.05 and abs(sampled.std().item() - 1.0) < 0.08
    # The same key gives the same row wherever it sits; different keys differ.
    moved = noise(fn, [keys[2], keys[0]], [0, 1], num_rows=2)
    torch.testing.assert_close(moved[0], out[3], rtol=0, atol=0)
    torch.testing.assert_close(moved[1], out[0], rtol=0, atol=0)
    assert not torch.equal(out[0], out[2])
