"""The Philox noise kernel: Exp(1)-distributed, a pure function of each row's key."""

from __future__ import annotations

import pytest
import torch

from kernels.exponential_noise import exponential_noise, exponential_noise_ref, exponential_race
from kernels.triton_compat import HAS_TRITON

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VOCAB = 9000 if DEVICE == "cpu" else 151936  # on CPU: 3 chunks of 4,096, the last one partial


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
    # Draws that share a generator call (the kernel's four quarters of a chunk) are distinct and uncorrelated.
    # (Float32 Exp(1) draws repeat by chance, about n^2 / 2^25 of n: ~5 of the 12,288 in a chunk of 3 rows.)
    first_chunk = sampled[:, :4096]
    assert first_chunk.unique().numel() > first_chunk.numel() - 30
    quarters = first_chunk.reshape(3, 4, 1024)
    for j in range(1, 4):
        r = torch.corrcoef(torch.stack([quarters[:, 0].flatten(), quarters[:, j].flatten()]))[0, 1]
        assert abs(r.item()) < 0.05
    # The same key gives the same row wherever it sits; different keys differ.
    moved = noise(fn, [keys[2], keys[0]], [0, 1], num_rows=2)
    torch.testing.assert_close(moved[0], out[3], rtol=0, atol=0)
    torch.testing.assert_close(moved[1], out[0], rtol=0, atol=0)
    assert not torch.equal(out[0], out[2])


@pytest.mark.skipif(not HAS_TRITON, reason="no Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_race_in_one_pass_is_the_race_in_log_space(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(4, VOCAB, generator=g)).to(DEVICE, dtype)
    keys, rows = [11, -(2**63), 2**40 + 3], [3, 0, 2]  # row 1 is not sampled
    temperatures = torch.tensor([0.6, 1.0, 1.7], device=DEVICE)
    tokens = exponential_race(logits, torch.tensor(keys, device=DEVICE), torch.tensor(rows, device=DEVICE),
                              temperatures)
    e = noise(exponential_noise, keys, rows, num_rows=4)[rows]  # the same Philox draws
    expected = (logits[rows].float() / temperatures[:, None] - e.log()).argmax(dim=1)
    assert tokens.tolist() == expected.tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a draw per program: too slow interpreted (the CPU run "
                    "checks the race's formula above, and the noise's distribution)")
def test_race_in_one_pass_samples_the_softmax() -> None:
    num_draws, temperature = 20000, 0.7
    row = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 3.0, -4.0, 1.5], device=DEVICE)
    logits = row.expand(num_draws, -1).contiguous()
    keys = torch.arange(num_draws, device=DEVICE) * 7919 + 13
    tokens = exponential_race(logits, keys, torch.arange(num_draws, device=DEVICE),
                              torch.full((num_draws,), temperature, device=DEVICE))
    frequencies = torch.bincount(tokens, minlength=len(row)).float() / num_draws
    expected = (row / temperature).softmax(0)
    torch.testing.assert_close(frequencies, expected, rtol=0, atol=0.012)  # 3.4 standard deviations
