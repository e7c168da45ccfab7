"""LLMEngine's public API: its constructor, generate(), the streaming core, abort, stats, KV events and overlapped
steps. Seeds, logprobs and stops are in test_llm_engine_sampling.py."""

from __future__ import annotations

import inspect
import logging
import re
import weakref
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from engine import LLMEngine, SamplingParams
from engine.block_hash import hash_blocks
from engine.config import EngineConfig
from engine.default_model import default_model_dir
from engine.outputs import RequestOutput
from engine.prompt import Prompt
from tests.engine.llm_engine_runs import (
    HELLO,
    assert_idle,
    drain,
    greedy,
    many,
    one,
    random_ids,
    tokens_of,
)

README = Path(__file__).resolve().parents[2] / "README.md"


# --- the constructor ---


def test_constructor_parameters_are_engine_config_s() -> None:
    # EngineConfig.create holds the one definition of the arguments and defaults; LLMEngine spells them out
    # for help() and editors. Adding one to either alone fails here.
    assert list(inspect.signature(LLMEngine).parameters.values()) == list(
        inspect.signature(EngineConfig.create).parameters.values()
    )


class _Created(Exception):
    """EngineConfig.create was reached (the test's spy stops the engine there)."""


def test_every_argument_reaches_engine_config(monkeypatch: pytest.MonkeyPatch) -> None:
    received: dict[str, object] = {}

    def spy(cls: type[EngineConfig], model: object, **kwargs: object) -> EngineConfig:
        received.update(model=model, **kwargs)
        raise _Created

    monkeypatch.setattr(EngineConfig, "create", classmethod(spy))
    given = {name: object() for name in inspect.signature(LLMEngine).parameters}  # each one recognisable
    with pytest.raises(_Created):
        LLMEngine(**given)  # type: ignore[arg-type]
    assert received == given


def test_readme_shows_the_constructor_s_defaults() -> None:
    bare = inspect.signature(LLMEngine).replace(return_annotation=inspect.Signature.empty)
    bare = bare.replace(parameters=[p.replace(annotation=p.empty) for p in bare.parameters.values()])
    assert f"LLMEngine{bare}" in re.sub(r"\s+", " ", README.read_text())


def test_no_model_is_the_embedded_random_model_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="engine.config"):
        embedded = LLMEngine(device="cpu", max_model_len=64)
    assert embedded.config.model == default_model_dir()
    assert "RANDOM weights" in caplog.text
    result = embedded.generate("Hello", max_tokens=2, ignore_eos=True, use_tqdm=False)
    assert isinstance(result, dict) and len(result["token_ids"]) == 2
    embedded.close()


# --- generate() ---


def test_generate_text_prompt_returns_a_result_dict(engine: LLMEngine) -> None:
    result = engine.generate("Hello, how are you?", max_tokens=100, use_tqdm=False)
    assert isinstance(result, dict)
    assert {"text", "token_ids", "finish_reason", "num_prompt_tokens", "num_cached_tokens"} <= set(result)
    assert isinstance(result["text"], str) and result["text"]
    assert result["num_prompt_tokens"] == len(engine.tokenizer.encode(HELLO))
    assert result["num_cached_tokens"] == 0  # 6 tokens: not one full block to share
    assert 1 <= len(result["token_ids"]) <= 100
    assert result["finish_reason"] in ("stop", "length")
    if result["finish_reason"] == "length":
        assert len(result["token_ids"]) == 100
    assert_idle(engine)


def test_generate_list_keeps_input_order(engine: LLMEngine) -> None:
    prompts: list[Prompt] = [HELLO, random_ids(1, 70), "Short", random_ids(2, 33)]
    params = [greedy(n) for n in (25, 3, 12, 1)]  # finish in the order 4, 2, 3, 1
    singles = [one(engine, p, sp)["token_ids"] for p, sp in zip(prompts, params)]
    results = many(engine, prompts, params)
    assert [r["token_ids"] for r in results] == singles
    assert [len(r["token_ids"]) for r in results] == [25, 3, 12, 1]
    assert [r["num_prompt_tokens"] for r in results][1::2] == [70, 33]
    assert many(engine, [HELLO], greedy(4))[0]["token_ids"] == singles[0][:4]


def test_token_id_prompt_matches_text_prompt(engine: LLMEngine, hello_greedy: dict[str, Any]) -> None:
    ids = engine.tokenizer.encode(HELLO)
    result = one(engine, ids, greedy(10))
    assert result["token_ids"] == hello_greedy["token_ids"][:10]
    assert result["num_prompt_tokens"] == len(ids)


def test_per_prompt_sampling_params(engine: LLMEngine) -> None:
    results = many(engine, ["a", "b", "c"], [greedy(2), greedy(5), greedy(1)])
    assert [len(r["token_ids"]) for r in results] == [2, 5, 1]
    with pytest.raises(ValueError, match="sampling_params"):
        many(engine, ["a", "b"], [greedy(2)])
    assert_idle(engine)


def test_sampling_params_and_kwargs_together_is_an_error(engine: LLMEngine) -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        engine.generate(HELLO, greedy(3), max_tokens=3, use_tqdm=False)
    assert_idle(engine)


def test_max_tokens_finishes_with_length(engine: LLMEngine) -> None:
    result = one(engine, HELLO, greedy(7))
    assert len(result["token_ids"]) == 7 and result["finish_reason"] == "length"


def test_max_tokens_beyond_max_model_len_is_refused_and_up_to_it_runs(engine: LLMEngine) -> None:
    with pytest.raises(ValueError, match=r"^max_tokens: 100 exceeds the 6 tokens left after the 250-token prompt "
                                         r"\(max_model_len=256 is prompt \+ output\)"):
        one(engine, random_ids(3, 250), greedy(100))
    with pytest.raises(ValueError, match="max_tokens: 1000000000 exceeds"):
        engine.add_request(HELLO, SamplingParams(max_tokens=10**9))
    result = one(engine, random_ids(3, 250), greedy(6))
    assert len(result["token_ids"]) == 256 - 250 and result["finish_reason"] == "length"
    assert_idle(engine)


# --- streaming core ---


def test_streamed_deltas_concatenate_to_generate(engine: LLMEngine, hello_greedy: dict[str, Any]) -> None:
    ids = [engine.add_request(HELLO, greedy(20)), engine.add_request(random_ids(4, 40), greedy(9))]
    deltas = drain(engine)
    assert tokens_of(deltas[ids[0]]) == hello_greedy["token_ids"][:20]
    assert tokens_of(deltas[ids[1]]) == one(engine, random_ids(4, 40), greedy(9))["token_ids"]
    for request_id, n in zip(ids, (20, 9)):
        outs = deltas[request_id]
        assert [o.finished for o in outs] == [False] * (n - 1) + [True]
        assert outs[-1].finish_reason == "length"
        assert all(len(o.new_token_ids) == 1 for o in outs)
    assert deltas[ids[0]][0].num_prompt_tokens == len(engine.tokenizer.encode(HELLO))
    assert_idle(engine)


def test_request_ids_are_unique(engine: LLMEngine) -> None:
    auto = {engine.add_request("x", greedy(1)) for _ in range(5)}
    assert len(auto) == 5
    engine.add_request("x", greedy(2), request_id="mine")
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request("y", greedy(2), request_id="mine")
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request("y", greedy(2), request_id="")
    deltas = drain(engine)
    assert set(deltas) == auto | {"mine"}
    assert engine.add_request("y", greedy(1), request_id="mine") == "mine"  # free again once finished
    drain(engine)
    assert_idle(engine)


def test_abort_waiting_request(engine: LLMEngine, hello_greedy: dict[str, Any]) -> None:
    keep = engine.add_request(HELLO, greedy(6))
    gone = engine.add_request(random_ids(5, 40), greedy(6))
    assert engine.stats().num_waiting == 2
    assert engine.abort(gone)
    assert engine.stats().num_waiting == 1
    assert engine.abort(gone) is False  # already finished
    deltas = drain(engine)
    assert len(deltas[gone]) == 1
    final = deltas[gone][0]
    assert (final.finished, final.finish_reason, final.new_token_ids) == (True, "abort", [])
    assert tokens_of(deltas[keep]) == hello_greedy["token_ids"][:6]
    assert_idle(engine)


def test_abort_running_request_frees_its_blocks(engine: LLMEngine, hello_greedy: dict[str, Any]) -> None:
    gone = engine.add_request(random_ids(6, 40), greedy(20))  # 40 prompt tokens: 3 blocks
    keep = engine.add_request(HELLO, greedy(20))  # 1 block
    deltas: dict[str, list[RequestOutput]] = defaultdict(list)
    for _ in range(2):
        for out in engine.step():
            deltas[out.request_id].append(out)
    assert engine.stats().num_running == 2
    assert engine.block_manager.num_used_blocks == 4
    assert engine.abort(gone)
    assert engine.block_manager.num_used_blocks == 1  # freed now, not at the next step
    assert engine.stats().num_running == 1
    for request_id, outs in drain(engine).items():
        deltas[request_id] += outs
    assert deltas[gone][-1].finish_reason == "abort" and deltas[gone][-1].finished
    assert len(tokens_of(deltas[gone])) == 1  # 2 steps launched, the first one's token returned
    assert tokens_of(deltas[keep]) == hello_greedy["token_ids"][:20]
    assert deltas[keep][-1].finish_reason == "length"
    assert_idle(engine)


def test_abort_unknown_request_returns_false(engine: LLMEngine) -> None:
    assert engine.abort("no-such-request") is False
    assert_idle(engine)


# --- stats and KV events ---


def test_stats_track_queues_blocks_and_prefix_hits(engine: LLMEngine) -> None:
    before = engine.stats()
    assert before.num_kv_blocks_total == engine.block_manager.num_blocks
    a, b = random_ids(7, 40), random_ids(8, 20)
    engine.add_request(a, greedy(3))
    engine.add_request(b, greedy(3))
    waiting = engine.stats()
    assert (waiting.num_waiting, waiting.num_running, waiting.num_kv_blocks_used) == (2, 0, 0)
    engine.step()
    running = engine.stats()
    assert (running.num_waiting, running.num_running, running.num_kv_blocks_used) == (0, 2, 3 + 2)
    assert running.num_prompt_tokens == before.num_prompt_tokens + 60
    assert running.num_prefix_hit_tokens == before.num_prefix_hit_tokens
    drain(engine)
    assert_idle(engine)
    again = one(engine, a + [1, 2, 3], greedy(2))  # shares a's 2 full blocks
    assert again["num_cached_tokens"] == 32
    after = engine.stats()
    assert after.num_prefix_hit_tokens == before.num_prefix_hit_tokens + 32
    assert after.num_prompt_tokens == before.num_prompt_tokens + 60 + 43
    assert after.num_preemptions == before.num_preemptions


def test_kv_events_report_the_hash_chain(engine: LLMEngine) -> None:
    engine.take_kv_events()
    prompt = random_ids(9, 40)
    result = one(engine, prompt, greedy(24))
    events = engine.take_kv_events()
    # 63 computed tokens (the last sampled token has no K/V yet): 3 full blocks.
    all_tokens = prompt + result["token_ids"]
    assert len(all_tokens) == 64
    assert events.stored == hash_blocks(all_tokens[:-1], engine.config.block_size)
    assert len(events.stored) == 3 and events.evicted == []
    assert engine.take_kv_events().stored == []  # drained
    again = one(engine, prompt, greedy(24))
    assert again["token_ids"] == result["token_ids"]
    assert again["num_cached_tokens"] == 32
    assert engine.take_kv_events().stored == []  # every block was already cached


def test_preemption_under_a_tiny_kv_cache(model_dir: Path, engine: LLMEngine) -> None:
    small = LLMEngine(model_dir, device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=6)
    prompts = [random_ids(10 + i, 20) for i in range(3)]  # 2 blocks each at admission, 3 to finish
    results = many(small, prompts, greedy(20))
    assert small.stats().num_preemptions > 0
    assert [r["token_ids"] for r in results] == [r["token_ids"] for r in many(engine, prompts, greedy(20))]
    assert_idle(small)


def test_close_aborts_requests_frees_the_model_and_refuses_new_work(model_dir: Path) -> None:
    closing = LLMEngine(model_dir, device="cpu", dtype="float32", max_model_len=256)
    request_id = closing.add_request(HELLO, greedy(50))
    closing.step()
    model = weakref.ref(closing.model_runner.model)
    closing.close()
    closing.close()  # idempotent
    assert model() is None  # the weights (and with them the KV cache bound to the layers) are freed now
    assert [(out.request_id, out.finish_reason) for out in drain(closing)[request_id][-1:]] == [(request_id, "abort")]
    assert closing.block_manager.num_used_blocks == 0
    with pytest.raises(RuntimeError, match="closed"):
        closing.add_request(HELLO, greedy(1))


# --- overlapped steps: step() launches step n+1, then returns step n's progress ---


def test_step_returns_the_progress_of_the_step_before(engine: LLMEngine, hello_greedy: dict[str, Any]) -> None:
    request_id = engine.add_request(HELLO, greedy(3))
    assert engine.step() == []  # the prefill is launched; its token is not known yet
    first = engine.step()  # the first decode is launched, the prefill's token comes back
    assert [(out.request_id, out.new_token_ids) for out in first] == [(request_id, hello_greedy["token_ids"][:1])]
    rest = drain(engine)[request_id]
    assert tokens_of(first + rest) == hello_greedy["token_ids"][:3]
    assert rest[-1].finish_reason == "length"
    assert_idle(engine)


def test_stop_on_a_sampled_token_caches_only_real_tokens(model_dir: Path, engine: LLMEngine) -> None:
    """The step after a stop token still computes the stopped request's row (its stop is not known at
    launch): that row's K/V is of the real stop token, and no pending token reaches an output or a block."""
    prompt, other_prompt = random_ids(12, 40), random_ids(13, 20)
    reference = one(engine, prompt, greedy(40))["token_ids"]
    j = next(i for i in range(24, 40) if reference[i] not in reference[:i])  # 40 + j + 1 tokens: past 4 blocks
    fresh = LLMEngine(model_dir, device="cpu", dtype="float32", max_model_len=256)
    other = fresh.add_request(other_prompt, greedy(40))
    stopping = fresh.add_request(prompt, greedy(40, stop_token_ids=[reference[j]]))
    deltas = drain(fresh)
    assert tokens_of(deltas[stopping]) == reference[: j + 1] and deltas[stopping][-1].finish_reason == "stop"
    assert tokens_of(deltas[other]) == one(engine, other_prompt, greedy(40))["token_ids"]
    stored = set(fresh.take_kv_events().stored)
    block_size = fresh.config.block_size
    stopped_tokens = prompt + reference[: j + 1]  # all computed: the wasted row computed the stop token
    assert set(hash_blocks(stopped_tokens, block_size)) <= stored
    assert stored <= set(hash_blocks(stopped_tokens, block_size)) | set(
        hash_blocks(other_prompt + tokens_of(deltas[other]), block_size))
    assert all(min(block.token_ids) >= 0 for block in fresh.block_manager.blocks if block.hash is not None)
    assert_idle(fresh)


def test_sequences_hold_only_the_tokens_streamed_so_far(model_dir: Path, engine: LLMEngine) -> None:
    """Between steps a request's token_ids are its prompt and exactly the tokens step() has returned for it: the
    token its running step samples is only counted (num_pending), never stood in for. Through preemption, a stop
    token, a last token by length, penalties and an abort."""
    prompts = [random_ids(20 + i, 20) for i in range(4)]
    reference = one(engine, prompts[0], greedy(20))["token_ids"]
    j = next(i for i in range(14, 20) if reference[i] not in reference[:i])  # past its second block
    params = [greedy(20, stop_token_ids=[reference[j]]), greedy(20, presence_penalty=0.5, repetition_penalty=1.2),
              greedy(20), greedy(40)]
    small = LLMEngine(model_dir, device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=6)
    seqs = []
    for prompt, p in zip(prompts, params):
        small.add_request(prompt, p)
        seqs.append(small.scheduler.waiting[-1])
    streamed: dict[str, list[int]] = defaultdict(list)
    while small.has_unfinished():
        for out in small.step():
            streamed[out.request_id] += out.new_token_ids
        for prompt, seq in zip(prompts, seqs):
            assert seq.token_ids == prompt + streamed[seq.request_id]
            assert seq.num_pending == (seq in small.scheduler.running and seq.num_computed_tokens == seq.num_tokens - 1)
        if seqs[3].num_pending and len(streamed[seqs[3].request_id]) == 3:  # abort it with a token in flight
            assert small.abort(seqs[3].request_id) and seqs[3].num_pending == 0
    assert small.stats().num_preemptions > 0
    assert streamed[seqs[0].request_id] == reference[: j + 1] and seqs[0].finish_reason == "stop"
    assert [seq.finish_reason for seq in seqs[1:]] == ["length", "length", "abort"]
    assert_idle(small)
