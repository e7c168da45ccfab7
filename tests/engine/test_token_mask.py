"""Tests for engine/token_mask.py: a bitmask's bits are the tokens a row may take, on every sampling path."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from engine.sampler import Sampler, SamplingBatch
from engine.sampling_params import SamplingParams
from engine.token_mask import TokenMask
from tests.engine.test_sampler import make_logits, sampler_device  # noqa: F401 - a fixture

VOCAB = 100


def mask_of(rows: list[int], allowed: list[list[int]], num_tokens: int, device: torch.device) -> TokenMask:
    """The TokenMask that allows `allowed[j]` in row `rows[j]`, built by numpy's bit packing (little-endian)."""
    bits = np.zeros((len(rows), -(-num_tokens // 32) * 32), np.uint8)
    for j, ids in enumerate(allowed):
        bits[j, ids] = 1
    words = np.packbits(bits, axis=1, bitorder="little").view(np.int32)
    return TokenMask(torch.tensor(rows, device=device), torch.from_numpy(words.copy()).to(device))


def test_apply_leaves_exactly_the_allowed_tokens() -> None:
    logits = torch.randn(3, VOCAB)
    allowed = [[0, 31, 32, 63, 99], [5]]
    masked = mask_of([2, 0], allowed, VOCAB, logits.device).apply(logits)
    assert torch.equal(masked[1], logits[1])  # an unmasked row is untouched
    for row, ids in zip([2, 0], allowed):
        assert (masked[row] > float("-inf")).nonzero().flatten().tolist() == ids
        assert torch.equal(masked[row, ids], logits[row, ids])


def test_tokens_past_the_mask_are_not_allowed_and_words_past_the_vocab_are_ignored() -> None:
    logits = torch.randn(1, VOCAB)
    narrow = mask_of([0], [[3, 40]], 64, logits.device).apply(logits)  # 2 words for 100 tokens
    assert (narrow[0] > float("-inf")).nonzero().flatten().tolist() == [3, 40]
    wide = mask_of([0], [[3, 99, 150]], 160, logits.device).apply(logits)  # bits past the vocabulary
    assert (wide[0] > float("-inf")).nonzero().flatten().tolist() == [3, 99]


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0), SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_k=3),
    SamplingParams(temperature=1.2, top_p=0.5), SamplingParams(temperature=1.0, min_p=0.3),
    SamplingParams(temperature=1.0, logit_bias={7: 5.0}),
], ids=["greedy", "sampled", "top-k", "top-p", "min-p", "bias"])
def test_every_sampling_path_draws_inside_the_mask(params: SamplingParams, sampler_device: torch.device) -> None:  # noqa: F811
    """Many rows, each its own seed; the control: without the mask, the same rows draw outside it."""
    num_rows, allowed = 24, [2, 17, 33, 64, 90]
    logits = make_logits(VOCAB).expand(num_rows, -1).to(sampler_device)  # [N, V]
    batch = SamplingBatch.build([params] * num_rows, list(range(num_rows)), [4] * num_rows, [[]] * num_rows,
                                sampler_device)
    mask = mask_of(list(range(num_rows)), [allowed] * num_rows, VOCAB, sampler_device)
    free = set(Sampler()(logits, batch).token_ids.tolist())
    masked = set(Sampler()(logits, dataclasses.replace(batch, token_mask=mask)).token_ids.tolist())
    assert masked <= set(allowed) and not free <= set(allowed)
    if params.is_greedy:
        assert masked == {max(allowed, key=lambda t: float(logits[0, t]))}
