"""n choices of one prompt (SamplingParams.n, engine/choices.py): their prefill runs once, their prompt blocks are
shared, each samples its own seed's stream and runs alone (or resumed) to the same tokens, and nothing leaks."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from engine import LLMEngine, SamplingParams
from engine.invalid_request import InvalidRequest
from engine.outputs import RequestOutput
from engine.scheduler import ScheduledBatch
from tests.engine.llm_engine_runs import HELLO, assert_idle, drain, greedy, many, one, random_ids, tokens_of

PROMPT = random_ids(31, 40)  # 2 full blocks of 16 to share, and a tail of 8 that each choice computes
TAIL = 8


def sampled(max_tokens: int = 12, **kwargs: Any) -> SamplingParams:
    return SamplingParams(**{"temperature": 1.0, "max_tokens": max_tokens, "seed": 7, "ignore_eos": True, **kwargs})


def choices(engine: LLMEngine, prompt: Any, params: SamplingParams) -> list[dict[str, Any]]:
    """generate() of one prompt with n > 1: a list of n results, by choice index."""
    results = engine.generate(prompt, params, use_tqdm=False)
    assert isinstance(results, list) and len(results) == params.n
    return results


def by_index(deltas: list[RequestOutput]) -> dict[int, list[RequestOutput]]:
    grouped: dict[int, list[RequestOutput]] = defaultdict(list)
    for delta in deltas:
        grouped[delta.index].append(delta)
    return grouped


@pytest.fixture
def prompt_tokens_computed(engine: LLMEngine, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """A one-item list: the prompt tokens the engine's steps compute from now on (cache hits excluded)."""
    computed = [0]
    schedule = engine.scheduler.schedule

    def counting() -> ScheduledBatch:
        batch = schedule()
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            computed[0] += max(0, min(seq.num_computed_tokens + n, seq.num_prompt_tokens) - seq.num_computed_tokens)
        return batch

    monkeypatch.setattr(engine.scheduler, "schedule", counting)
    yield computed


def test_sampled_choices_differ_and_each_runs_alone_to_the_same_tokens(engine: LLMEngine) -> None:
    """Choice i samples with seed (seed + i * 0x9E3779B97F4A7C15) mod 2**63, as SamplingParams documents: run
    alone with that seed (`for_choice`) it gives the same tokens; choice 0 is the n = 1 request."""
    params = sampled(n=3)
    results = choices(engine, PROMPT, params)
    token_ids = [r["token_ids"] for r in results]
    assert len({tuple(t) for t in token_ids}) == 3
    for i in range(3):
        alone = params.for_choice(i)
        assert (alone.n, alone.seed) == (1, (7 + i * 0x9E3779B97F4A7C15) % 2**63)
        assert one(engine, PROMPT, alone)["token_ids"] == token_ids[i]
    assert one(engine, PROMPT, replace(params, n=1))["token_ids"] == token_ids[0]
    assert_idle(engine)


def test_greedy_choices_are_equal(engine: LLMEngine) -> None:
    for prompt in (HELLO, PROMPT):  # too short to share a block (all queued at once), and long enough
        results = choices(engine, prompt, greedy(10, n=3))
        assert [r["token_ids"] for r in results] == [one(engine, prompt, greedy(10))["token_ids"]] * 3
    assert_idle(engine)


def test_the_prompt_is_prefilled_once_and_its_full_blocks_shared(
    engine: LLMEngine, prompt_tokens_computed: list[int]
) -> None:
    """Choice 0 computes the prompt; the others share its 2 full blocks (a reference each) and compute the tail.
    The prompt counts once in the stats, and every choice reports the request's (cold) cache hit."""
    prompt = random_ids(32, 40)
    before = engine.stats()
    request_id = engine.add_request(prompt, sampled(20, n=3))
    deltas: list[RequestOutput] = []
    for _ in range(4):  # prefill; its token read (the others released); the others admitted; all decoding
        deltas += engine.step()
    seqs = [seq for seq in engine.scheduler.running if seq.request_id == request_id]
    assert [seq.index for seq in seqs] == [0, 1, 2]
    shared = seqs[0].block_table[:2]
    assert all(seq.block_table[:2] == shared for seq in seqs)
    assert [engine.block_manager.blocks[b].ref_count for b in shared] == [3, 3]
    assert len({seq.block_table[2] for seq in seqs}) == 3  # each choice's tail block is its own
    deltas += drain(engine)[request_id]
    assert prompt_tokens_computed[0] == 40 + 2 * TAIL
    after = engine.stats()
    assert after.num_prompt_tokens - before.num_prompt_tokens == 40
    assert after.num_prefix_hit_tokens == before.num_prefix_hit_tokens
    assert {(d.num_prompt_tokens, d.num_cached_tokens) for d in deltas} == {(40, 0)}
    assert_idle(engine)


def test_streamed_outputs_carry_each_choice_s_index(engine: LLMEngine) -> None:
    params = sampled(n=3, logprobs=1)
    results = choices(engine, PROMPT, params)
    request_id = engine.add_request(PROMPT, params)
    grouped = by_index(drain(engine)[request_id])
    assert sorted(grouped) == [0, 1, 2]
    for i, deltas in grouped.items():
        assert tokens_of(deltas) == results[i]["token_ids"]
        assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]
        assert [lp.logprob for d in deltas for lp in d.new_logprobs] == [lp["logprob"] for lp in results[i]["logprobs"]]
    engine.add_request(PROMPT, params, request_id=request_id)  # the id is free once every choice has finished
    drain(engine)
    assert_idle(engine)


def test_a_first_choice_done_at_once_still_shares_its_prompt(
    engine: LLMEngine, prompt_tokens_computed: list[int]
) -> None:
    """Choice 0 stops on its first token: its blocks are back in the cache, where the others find them."""
    prompt = random_ids(33, 40)
    results = choices(engine, prompt, sampled(1, n=3))
    assert [len(r["token_ids"]) for r in results] == [1, 1, 1]
    assert prompt_tokens_computed[0] == 40 + 2 * TAIL
    assert_idle(engine)


def test_a_resumed_choice_equals_the_undisturbed_one(engine: LLMEngine) -> None:
    """A failover resubmits an unfinished choice alone: prompt + its tokens sent, for_choice's params."""
    params = sampled(16, n=3, frequency_penalty=0.5)
    undisturbed = [r["token_ids"] for r in choices(engine, PROMPT, params)]
    for index, cut in ((1, 5), (2, 11)):
        sent = undisturbed[index][:cut]
        rest = replace(params.for_choice(index), max_tokens=16 - cut)
        engine.add_request(PROMPT + sent, rest, "resumed", resumed_tokens=cut)
        assert sent + tokens_of(drain(engine)["resumed"]) == undisturbed[index]
    assert_idle(engine)


def test_each_choice_follows_its_own_grammar_matcher(engine: LLMEngine) -> None:
    regex = "[0-9]{2}-[a-z]{3}"
    params = sampled(20, n=4, ignore_eos=False, structured_output={"regex": regex})
    results = choices(engine, HELLO, params)
    assert all(re.fullmatch(regex, r["text"]) for r in results)
    assert len({r["text"] for r in results}) > 1
    assert [one(engine, HELLO, params.for_choice(i))["text"] for i in range(4)] == [r["text"] for r in results]
    drain(engine)  # the step launched before the last stop was known
    assert_idle(engine)


def test_abort_stops_every_choice_held_or_running(engine: LLMEngine) -> None:
    for num_steps in (0, 1, 4):  # choices 1.. held (before and after choice 0's prefill), then all running
        request_id = engine.add_request(PROMPT, sampled(20, n=3))
        for _ in range(num_steps):
            engine.step()
        stats = engine.stats()
        if num_steps < 4:  # the held choices count as waiting (the replica's load and queue limit read it)
            waiting = 3 - stats.num_running
            assert (stats.num_waiting, stats.num_waiting_tokens) == (waiting, waiting * len(PROMPT))
        assert engine.abort(request_id) and not engine.abort(request_id)
        finals = [d for d in drain(engine)[request_id] if d.finished]
        assert sorted((d.index, d.finish_reason) for d in finals) == [(i, "abort") for i in range(3)]
        assert_idle(engine)
    engine.add_request(PROMPT, sampled(20, n=3))
    engine.step()
    assert engine.abort_all() == 1  # requests, not choices
    drain(engine)
    assert_idle(engine)


def test_preempting_a_choice_leaves_the_others_and_leaks_nothing(model_dir: Path, engine: LLMEngine) -> None:
    """6 blocks for 3 choices that need 1 shared + 2 each by the end, and another request: choices are
    preempted and recomputed, and every one of them equals its run on a roomy engine."""
    prompts, params = [random_ids(34, 20), random_ids(35, 20)], [sampled(20, n=3), sampled(20, seed=3)]
    small = LLMEngine(model_dir, device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=6)
    results = many(small, prompts, params)
    assert small.stats().num_preemptions > 0
    assert results == many(engine, prompts, params)
    assert_idle(small)
    assert_idle(engine)


@pytest.mark.parametrize("n", [0, 129, -1, 2.0, "3", True])
def test_n_out_of_range_is_refused_by_name(engine: LLMEngine, n: Any) -> None:
    with pytest.raises(InvalidRequest) as error:
        engine.generate(HELLO, n=n, use_tqdm=False)
    assert error.value.field == "n"
    assert_idle(engine)


def test_n_does_not_combine_with_resumed_tokens(engine: LLMEngine) -> None:
    with pytest.raises(InvalidRequest) as error:
        engine.add_request(PROMPT, sampled(n=2), resumed_tokens=3)
    assert error.value.field == "resumed_tokens"
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(n=2).for_choice(1)
    with pytest.raises(ValueError, match="index"):
        sampled(n=2).for_choice(2)
    assert_idle(engine)
