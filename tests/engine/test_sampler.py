"""Tests for engine/sampler.py: exact masks, seeded determinism, batch independence and logprobs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import sampler as sampler_module
from engine.sampler import Sampler, SamplerOutput, SamplingBatch, _top_k_top_p_floor, rng_key
from engine.sampling_params import SamplingParams
from kernels.triton_compat import HAS_TRITON

CPU = torch.device("cpu")
NUM_DRAWS = 2000


def make_logits(vocab_size: int, seed: int = 0) -> torch.Tensor:
    """One row [V] of distinct logits spread over [-2, 2] in a shuffled order."""
    gen = torch.Generator().manual_seed(seed)
    spread = torch.linspace(2.0, -2.0, vocab_size) + 0.01 * torch.rand(vocab_size, generator=gen)
    return spread[torch.randperm(vocab_size, generator=gen)]


def run_sampler(
    logits: torch.Tensor,
    params: list[SamplingParams],
    seeds: list[int] | None = None,
    positions: list[int] | None = None,
    suppressed: list[list[int]] | None = None,
) -> SamplerOutput:
    """Sample logits [B, V] with one SamplingParams per row, on the logits' device."""
    num_rows = len(params)
    batch = SamplingBatch.build(
        params,
        seeds if seeds is not None else list(range(num_rows)),
        positions if positions is not None else [7] * num_rows,
        suppressed if suppressed is not None else [[] for _ in range(num_rows)],
        logits.device,
    )
    return Sampler()(logits, batch)


def draw_set(row: torch.Tensor, params: SamplingParams, suppressed: list[int] | None = None) -> set[int]:
    """The set of tokens drawn from one logits row [V] over NUM_DRAWS seeds and positions."""
    logits = row.expand(NUM_DRAWS, -1)  # [N, V]
    seeds = [1000 + i for i in range(NUM_DRAWS)]
    positions = [i % 13 for i in range(NUM_DRAWS)]
    banned = [suppressed or [] for _ in range(NUM_DRAWS)]
    out = run_sampler(logits, [params] * NUM_DRAWS, seeds, positions, banned)
    return set(out.token_ids.tolist())


def reference_allowed(row: torch.Tensor, params: SamplingParams) -> set[int]:
    """Tokens allowed by top-k, top-p and min-p, in float64 numpy, independently of the sampler."""
    logits = row.double().numpy() / params.temperature
    order = np.argsort(-logits)
    if params.top_k != -1:
        order = order[: params.top_k]
    probs = np.exp(logits[order] - logits[order].max())
    probs /= probs.sum()
    cumulative = np.cumsum(probs)
    if params.top_p < 1.0:
        assert np.abs(cumulative - params.top_p).min() > 1e-4, "test premise: no cumsum near top_p"
        num_kept = int(np.searchsorted(cumulative, params.top_p)) + 1  # first index reaching top_p
        assert num_kept == 1 or cumulative[num_kept - 2] < params.top_p  # minimal
        order, probs = order[:num_kept], probs[:num_kept]
    if params.min_p > 0.0:
        ratios = probs / probs.max()
        assert np.abs(ratios - params.min_p).min() > 1e-4, "test premise: no prob near min_p * max"
        order = order[ratios >= params.min_p]
    return set(order.tolist())


def test_greedy_is_argmax_in_any_float_dtype() -> None:
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(1))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = run_sampler(logits.to(dtype), [SamplingParams(temperature=0.0)] * 8)
        assert torch.equal(out.token_ids, logits.to(dtype).float().argmax(dim=-1))
        assert out.token_ids.dtype == torch.int64
        assert out.logprobs is None and out.top_token_ids is None and out.top_logprobs is None


def test_greedy_rows_stay_greedy_among_sampled_rows() -> None:
    logits = 0.1 * torch.randn(16, 100, generator=torch.Generator().manual_seed(2))  # near flat
    params = [SamplingParams(temperature=0.0 if i % 2 == 0 else 1.0, top_k=50) for i in range(16)]
    out = run_sampler(logits, params)
    argmax = logits.argmax(dim=-1)
    assert torch.equal(out.token_ids[0::2], argmax[0::2])
    assert not torch.equal(out.token_ids[1::2], argmax[1::2])


def test_suppressed_token_is_never_chosen_greedy_or_sampled() -> None:
    row = make_logits(16)
    row[3] = 10.0  # the favourite by far
    logits = row.expand(2, -1).clone()  # [2, V]
    greedy = run_sampler(logits, [SamplingParams(temperature=0.0)] * 2, suppressed=[[3], []])
    assert torch.equal(logits, row.expand(2, -1))  # the caller's logits are left alone
    assert greedy.token_ids.tolist() == [int(row.topk(2).indices[1]), 3]
    drawn = draw_set(row, SamplingParams(temperature=1.0), suppressed=[3])
    assert 3 not in drawn and drawn  # and the other tokens are still reachable
    assert len(drawn) == 15


def test_logit_bias_moves_the_choice_and_not_the_logprobs() -> None:
    row = make_logits(16)
    row[3] = 10.0  # the favourite by far
    second = int(row.topk(2).indices[1])
    greedy = [SamplingParams(temperature=0.0, logit_bias=b, logprobs=1) for b in ({5: 100.0}, {3: -100.0}, {})]
    out = run_sampler(row.expand(3, -1).clone(), greedy)
    assert out.token_ids.tolist() == [5, second, 3]
    assert torch.equal(out.top_token_ids[:, 0], torch.tensor([3, 3, 3]))  # of the raw distribution
    assert 3 not in draw_set(row, SamplingParams(temperature=1.0, logit_bias={3: -100.0}))
    assert draw_set(row, SamplingParams(temperature=1.0, logit_bias={9: 100.0})) == {9}


def test_allowed_token_ids_leave_only_those_tokens() -> None:
    row = make_logits(16)
    allowed = [1, 4, 9]
    assert draw_set(row, SamplingParams(temperature=1.0, allowed_token_ids=allowed)) == set(allowed)
    [token] = run_sampler(row[None], [SamplingParams(temperature=0.0, allowed_token_ids=allowed)]).token_ids.tolist()
    assert token == max(allowed, key=lambda t: float(row[t]))


@pytest.mark.parametrize("top_k", [1, 3, 7])
def test_top_k_draws_exactly_the_k_largest(top_k: int) -> None:
    row = make_logits(32)
    params = SamplingParams(temperature=1.0, top_k=top_k)
    assert draw_set(row, params) == set(row.topk(top_k).indices.tolist())


def test_top_k_keeps_every_token_tied_at_the_kth_value() -> None:
    row = torch.tensor([3.0, 2.0, 2.0, 2.0, 0.0, -1.0])
    assert draw_set(row, SamplingParams(top_k=2)) == {0, 1, 2, 3}


@pytest.mark.parametrize("top_k", [8, 9, 1000])
def test_top_k_of_at_least_the_vocab_is_off(top_k: int) -> None:
    assert draw_set(make_logits(8), SamplingParams(top_k=top_k)) == set(range(8))


@pytest.mark.parametrize("top_p", [0.01, 0.3, 0.62, 0.9])
def test_top_p_draws_exactly_the_minimal_nucleus(top_p: float) -> None:
    row = make_logits(32)
    params = SamplingParams(temperature=0.7, top_p=top_p)
    expected = reference_allowed(row, params)
    assert draw_set(row, params) == expected
    if top_p == 0.01:
        assert expected == {int(row.argmax())}  # never fewer than one token


def test_top_p_of_one_keeps_the_tail_that_float32_rounds_away() -> None:
    # p(token 0) rounds to 1.0 in float32, so the exclusive cumsum already "reaches" 1.0 at token 1.
    row = torch.cat([torch.tensor([30.0]), torch.zeros(999)])
    params = [SamplingParams(top_p=1.0), SamplingParams(top_p=0.5)]  # the second turns top-p on
    batch = SamplingBatch.build(params, [0, 0], [0, 0], [[], []], CPU)
    floor = _top_k_top_p_floor(row.expand(2, -1), batch)  # [2, 1]
    assert floor.squeeze(1).tolist() == [0.0, 30.0]


@pytest.mark.parametrize("min_p", [0.05, 0.3, 0.9])
def test_min_p_draws_exactly_the_tokens_above_the_floor(min_p: float) -> None:
    row = make_logits(32)
    params = SamplingParams(temperature=1.3, min_p=min_p)
    assert draw_set(row, params) == reference_allowed(row, params)


@pytest.mark.parametrize(("top_k", "top_p", "min_p"), [(10, 0.7, 0.3), (20, 0.95, 0.12), (5, 0.5, 0.0)])
def test_top_k_top_p_min_p_combined_match_the_reference(top_k: int, top_p: float, min_p: float) -> None:
    row = make_logits(64, seed=3)
    params = SamplingParams(temperature=0.8, top_k=top_k, top_p=top_p, min_p=min_p)
    expected = reference_allowed(row, params)
    assert draw_set(row, params) == expected
    assert 1 < len(expected) < top_k  # each stage cut something


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_scales_the_empirical_distribution(temperature: float) -> None:
    row = torch.tensor([0.0, 1.0, 2.0, 0.5])
    logits = row.expand(4000, -1)
    out = run_sampler(logits, [SamplingParams(temperature=temperature)] * 4000, seeds=list(range(4000)))
    freqs = torch.bincount(out.token_ids, minlength=4).double() / 4000
    expected = (row.double() / temperature).softmax(dim=-1)
    # Binomial std <= 0.008 at n=4000; the draws are seeded, so this cannot flake.
    assert (freqs - expected).abs().max() < 0.03


def test_same_seed_and_position_give_the_same_token() -> None:
    logits = torch.zeros(1, 1000)  # flat: every difference comes from the noise
    params = [SamplingParams()]
    first = run_sampler(logits, params, seeds=[42], positions=[5]).token_ids
    assert torch.equal(run_sampler(logits, params, seeds=[42], positions=[5]).token_ids, first)
    by_seed = {int(run_sampler(logits, params, [s], [5]).token_ids) for s in range(20)}
    by_position = {int(run_sampler(logits, params, [42], [p]).token_ids) for p in range(20)}
    assert len(by_seed) >= 18 and len(by_position) >= 18


@pytest.fixture(params=["torch", "gpu-kernels"])
def sampler_device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> torch.device:
    """Where a test runs the sampler: its CPU code, and its GPU code (Triton kernels, on the GPU where there is
    one, else interpreted on the CPU)."""
    if request.param == "torch":
        return CPU
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not HAS_TRITON:
        pytest.skip("Triton is not installed")
    monkeypatch.setattr(sampler_module, "_on_gpu", lambda device: True)
    return CPU


def test_a_row_does_not_depend_on_the_rest_of_the_batch(sampler_device: torch.device) -> None:
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.9, top_k=4),
        SamplingParams(temperature=1.2, top_p=0.8),
        SamplingParams(temperature=1.0, min_p=0.2, logprobs=2),
        SamplingParams(temperature=0.6, top_k=9, top_p=0.9, min_p=0.05),
        SamplingParams(temperature=1.0, logit_bias={3: 2.5, 7: -1.0}),
        SamplingParams(temperature=0.0, allowed_token_ids=[4, 8, 15]),
    ]
    logits = torch.stack([make_logits(40, seed=i) for i in range(8)]).to(sampler_device)  # [8, 40]
    seeds, positions = [11, 22, 33, 44, 55, 66, 77, 88], [3, 9, 0, 14, 2, 30, 5, 6]
    banned = [[1], [], [2, 5], [], [0], [], [], [8]]
    full = run_sampler(logits, params, seeds, positions, banned).token_ids
    assert all(int(token) not in ban for token, ban in zip(full, banned))
    assert int(full[0]) == int(logits[0].cpu().index_fill(0, torch.tensor(banned[0]), float("-inf")).argmax())
    assert int(full[7]) in (4, 15)
    for rows in ([5, 3, 1, 7, 0, 4, 6, 2], [2], [4, 0], [1, 2, 3], [6], [7, 6]):
        subset = run_sampler(
            logits[rows],
            [params[r] for r in rows],
            [seeds[r] for r in rows],
            [positions[r] for r in rows],
            [banned[r] for r in rows],
        ).token_ids
        assert torch.equal(subset, full[rows])


def generate(transitions: torch.Tensor, prefix: list[int], num_new: int, seed: int) -> list[int]:
    """Extend prefix by num_new tokens, one step at a time; next-token logits are transitions[last]."""
    tokens = list(prefix)
    params = [SamplingParams(temperature=1.0, top_p=0.95)]
    for _ in range(num_new):
        logits = transitions[tokens[-1]][None]  # [1, V]
        tokens.append(int(run_sampler(logits, params, [seed], [len(tokens)]).token_ids))
    return tokens


def test_resuming_from_any_position_reproduces_the_sequence() -> None:
    transitions = torch.randn(50, 50, generator=torch.Generator().manual_seed(4))  # [V, V]
    prompt = [1, 2, 3]
    full = generate(transitions, prompt, 20, seed=9)
    for cut in (3, 4, 10, 22):
        assert generate(transitions, full[:cut], 23 - cut, seed=9) == full
    assert generate(transitions, prompt, 20, seed=10) != full


def test_logprobs_are_of_the_raw_distribution() -> None:
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(5)).bfloat16()
    params = [
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(temperature=0.5, top_k=3),
        SamplingParams(temperature=2.0, top_p=0.5, min_p=0.1, logprobs=1),
    ]
    out = run_sampler(logits, params, suppressed=[[0], [int(logits[1].argmax())], []])
    raw = logits.float().log_softmax(dim=-1)  # unscaled, unsuppressed
    assert out.logprobs is not None and out.top_token_ids is not None and out.top_logprobs is not None
    assert out.logprobs.dtype == torch.float32
    assert torch.equal(out.logprobs, raw.gather(1, out.token_ids[:, None]).squeeze(1))
    top = raw.topk(3, dim=-1)
    assert torch.equal(out.top_token_ids, top.indices) and torch.equal(out.top_logprobs, top.values)


def test_zero_logprobs_gives_empty_top_n() -> None:
    logits = torch.randn(2, 10, generator=torch.Generator().manual_seed(6))
    out = run_sampler(logits, [SamplingParams(logprobs=0), SamplingParams()])
    assert out.logprobs is not None and out.logprobs.shape == (2,)
    assert out.top_token_ids is not None and out.top_token_ids.shape == (2, 0)
    assert out.top_logprobs is not None and out.top_logprobs.shape == (2, 0)


def test_build_packs_mixed_params() -> None:
    params = [
        SamplingParams(temperature=0.0, top_k=5, logprobs=2),  # greedy: its top_k sets no flag
        SamplingParams(temperature=0.7, top_p=0.9),
        SamplingParams(temperature=1.0, min_p=0.1, logprobs=4),
    ]
    batch = SamplingBatch.build(params, [1, 2, 3], [10, 20, 30], [[7, 8], [], [9]], CPU)
    assert batch.temperatures.tolist() == pytest.approx([0.0, 0.7, 1.0])
    assert batch.temperatures.dtype == torch.float32 and batch.top_ks.dtype == torch.int64
    assert batch.top_ks.tolist() == [5, -1, -1]
    assert batch.top_ps.tolist() == pytest.approx([1.0, 0.9, 1.0])
    assert batch.min_ps.tolist() == pytest.approx([0.0, 0.0, 0.1])
    assert batch.seeds.tolist() == [1, 2, 3] and batch.positions.tolist() == [10, 20, 30]
    assert batch.suppress_rows.tolist() == [0, 0, 2] and batch.suppress_token_ids.tolist() == [7, 8, 9]
    assert batch.num_logprobs == 4
    assert (batch.all_greedy, batch.any_greedy) == (False, True)
    assert (batch.any_top_k, batch.any_top_p, batch.any_min_p) == (False, True, True)
    assert batch.sampled_rows == (1, 2) and batch.streams[1].tolist() == [1, 2]
    keys = np.array([rng_key(2, 20), rng_key(3, 30)], np.uint64).view(np.int64)
    assert batch.streams[0].tolist() == keys.tolist()


def test_build_of_plain_greedy_rows_sets_no_flags() -> None:
    batch = SamplingBatch.build([SamplingParams(temperature=0.0)] * 2, [0, 0], [0, 1], [[], []], CPU)
    assert batch.all_greedy and batch.num_logprobs == -1 and batch.sampled_rows == ()
    assert batch.suppress_rows.shape == (0,) and batch.suppress_rows.dtype == torch.int64


def test_build_rejects_mismatched_row_counts() -> None:
    with pytest.raises(ValueError, match="row counts differ"):
        SamplingBatch.build([SamplingParams()], [1, 2], [0], [[]], CPU)


def test_rng_keys_are_distinct_64_bit_values() -> None:
    keys = {rng_key(seed, position) for seed in range(100) for position in range(100)}
    assert len(keys) == 10_000
    assert all(0 <= key < 2**64 for key in keys)
    assert rng_key(2**63 - 1, 10**9) == rng_key(2**63 - 1, 10**9)


@pytest.mark.parametrize("params", [SamplingParams(top_p=1e-300), SamplingParams(temperature=1e-40, top_p=0.5)],
                         ids=["top_p rounds to 0 in float32", "scaled logits overflow"])
def test_extreme_top_p_keeps_the_most_likely_token(params: SamplingParams) -> None:
    """Once crashed the step (top-p kept no token); now the most likely token always survives."""
    row = make_logits(64)
    out = run_sampler(row[None, :], [params])
    assert out.token_ids.tolist() == [int(row.argmax())]


@pytest.mark.parametrize("device", ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
def test_a_row_samples_the_same_alone_and_in_any_batch(device: str) -> None:
    """Top-k, top-p and min-p, greedy, logprobs: row 0's token and logprobs bitwise the same beside 1, 7 or 255
    other rows (a lone row once took another cumulative-sum algorithm on CUDA: engine/sampler.py _row_cumsum)."""
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(256, 32000, generator=g) * 3).to(device)
    params = [SamplingParams(temperature=0.8, top_p=0.9, top_k=500, min_p=0.01, seed=7, logprobs=5),
              SamplingParams(temperature=0.0, logprobs=5)]
    for row_params in params:
        outputs = []
        for size in (1, 2, 8, 256):
            batch = SamplingBatch.build([row_params] + [SamplingParams(temperature=1.0, top_p=0.5, seed=i)
                                                        for i in range(size - 1)],
                                        seeds=list(range(size)), positions=[11] * size, suppressed=[[]] * size,
                                        device=torch.device(device), histories=[None] * size)
            out = Sampler()(logits[:size], batch)
            outputs.append((out.token_ids[0].item(), out.logprobs[0].item(), out.top_logprobs[0].tolist()))
        assert outputs == [outputs[0]] * 4, row_params
