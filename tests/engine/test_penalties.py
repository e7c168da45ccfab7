"""Presence, frequency and repetition penalties: the sampler's formula, Hugging Face parity through the
engine (overlapped steps, so the newest output token is still pending when the batch is built),
failover resumption, and bad values naming the field."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from engine import LLMEngine, SamplingParams
from engine.sampler import Sampler, SamplingBatch
from tests.engine.test_hf_parity import VOCAB, hf_greedy, random_prompts

CPU = torch.device("cpu")
NEW_TOKENS = 24


def test_sampler_applies_the_formula() -> None:
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(3, 40, generator=g)
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.7, presence_penalty=0.5, frequency_penalty=0.25),
              SamplingParams(temperature=0.0),  # no penalty: untouched
              SamplingParams(temperature=0.0, frequency_penalty=-1.0)]
    histories = [([1, 2, 3], [3, 5, 5, 7]), None, ([9], [4, 4, 4])]
    batch = SamplingBatch.build(params, [0] * 3, [0] * 3, [[]] * 3, CPU, histories)
    expected = logits.clone()
    for row, (p, history) in enumerate(zip(params, histories)):
        if history is None:
            continue
        prompt, output = history
        counts = Counter(output)
        for token in set(prompt) | set(output) if p.repetition_penalty != 1.0 else ():
            x = expected[row, token]
            expected[row, token] = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        for token, n in counts.items():
            expected[row, token] -= p.frequency_penalty * n + p.presence_penalty
    torch.testing.assert_close(Sampler()(logits, batch).token_ids, expected.argmax(dim=1), rtol=0, atol=0)
    from engine.sampler import _penalize

    torch.testing.assert_close(_penalize(logits, batch), expected)


def test_output_tokens_added_on_the_device_count_as_output() -> None:
    # The model runner adds a penalised row's newest output token, still pending on the host, this way.
    logits = 3 * torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25),
              SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.0, frequency_penalty=-1.0)]
    whole = SamplingBatch.build(params, [0] * 3, [0] * 3, [[]] * 3, CPU, [([1, 2], [3, 5, 5, 7]), None, ([9], [4, 4])])
    known = SamplingBatch.build(params, [0] * 3, [0] * 3, [[]] * 3, CPU, [([1, 2], [3, 5, 5]), None, ([9], [4])])
    added = known.with_output_tokens([0, 2], torch.tensor([7, 4]))
    from engine.sampler import _penalize

    torch.testing.assert_close(_penalize(logits, added), _penalize(logits, whole), rtol=0, atol=0)
    assert not torch.equal(_penalize(logits, known), _penalize(logits, whole))


class OutputPenalties(LogitsProcessor):
    """vLLM's presence and frequency penalties, on the generated tokens only (after `prompt_len`)."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        counts = torch.zeros_like(scores).scatter_add_(
            1, input_ids[:, self.prompt_len :], torch.ones_like(input_ids[:, self.prompt_len :], dtype=scores.dtype)
        )
        return scores - self.frequency * counts - self.presence * (counts > 0)


def hf_penalised_greedy(model_dir: Path, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    return hf_greedy(model_dir, prompts, NEW_TOKENS, lambda ids: dict(
        repetition_penalty=params.repetition_penalty,
        logits_processor=LogitsProcessorList([OutputPenalties(len(ids), params.presence_penalty,
                                                              params.frequency_penalty)]),
    ))


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=0.0, repetition_penalty=1.8, max_tokens=NEW_TOKENS, ignore_eos=True),
     SamplingParams(temperature=0.0, repetition_penalty=0.7, max_tokens=NEW_TOKENS, ignore_eos=True),
     SamplingParams(temperature=0.0, presence_penalty=1.5, frequency_penalty=0.7, max_tokens=NEW_TOKENS,
                    ignore_eos=True)],
    ids=["repetition", "repetition-below-1", "presence-frequency"],
)
def test_greedy_with_penalties_equals_hugging_face(
    params: SamplingParams, tiny_checkpoint: Callable[..., Path]
) -> None:
    model_dir = tiny_checkpoint("tied-gqa2-hd16", vocab_size=VOCAB)
    prompts = random_prompts(5, [3, 20, 47])
    expected = hf_penalised_greedy(model_dir, prompts, params)
    with LLMEngine(model_dir, device="cpu", dtype="float32", max_model_len=256) as engine:
        plain = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
        results = engine.generate(prompts + prompts[:1], [params] * len(prompts) + [plain], use_tqdm=False)
        assert [r["token_ids"] for r in results[:-1]] == expected
        assert results[-1]["token_ids"] != expected[0]  # the penalties changed something: this test can fail


@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "seeded"])
def test_penalised_request_resumes_identically(temperature: float, tiny_checkpoint: Callable[..., Path]) -> None:
    """A failover resubmits prompt + the tokens already streamed; `resumed_tokens` keeps them output."""
    model_dir = tiny_checkpoint("tied-gqa2-hd16", vocab_size=VOCAB)
    prompt = random_prompts(6, [30])[0]
    n = 24

    def params(max_tokens: int) -> SamplingParams:
        return SamplingParams(temperature=temperature, seed=5, presence_penalty=1.0, frequency_penalty=0.5,
                              repetition_penalty=1.1, max_tokens=max_tokens, ignore_eos=True)

    with LLMEngine(model_dir, device="cpu", dtype="float32", max_model_len=256) as engine:
        full = engine.generate([prompt], params(n), use_tqdm=False)[0]["token_ids"]
        for k in (1, 15):
            request_id = engine.add_request(prompt + full[:k], params(n - k), resumed_tokens=k)
            tokens: list[int] = []
            while engine.has_unfinished():
                tokens += [t for out in engine.step() if out.request_id == request_id for t in out.new_token_ids]
            assert tokens == full[k:], f"resumed after {k} tokens"
        if temperature == 0.0:  # the first 15 tokens hold a repeat that greedy would take again unpenalised
            unmarked = engine.generate([prompt + full[:15]], params(n - 15), use_tqdm=False)[0]["token_ids"]
            assert unmarked != full[15:]


@pytest.mark.parametrize(
    "field,value",
    [("presence_penalty", 2.5), ("frequency_penalty", -3.0), ("repetition_penalty", 0.0),
     ("presence_penalty", float("nan")), ("repetition_penalty", "1.2")],
)
def test_bad_penalty_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})  # type: ignore[arg-type]
