"""LLMEngine's sampling options end to end: seeds (the failover guarantee), logprobs, stop strings, stop ids,
EOS and min_tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from engine import LLMEngine, SamplingParams
from engine.prompt import Prompt
from tests.engine.llm_engine_runs import (
    HELLO,
    LONG_GREEDY,
    assert_idle,
    drain,
    greedy,
    many,
    one,
    random_ids,
    tokens_of,
)

# --- seeds: the failover guarantee ---


def sampled(seed: int | None, max_tokens: int = 24) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens, ignore_eos=True)


def test_same_seed_same_tokens_and_different_seeds_differ(engine: LLMEngine) -> None:
    first, again, other = (one(engine, HELLO, sampled(s))["token_ids"] for s in (11, 11, 12))
    assert first == again
    assert first != other


def test_unseeded_requests_differ(engine: LLMEngine) -> None:
    a, b = many(engine, [HELLO, HELLO], sampled(None))
    assert a["token_ids"] != b["token_ids"]
    assert a["token_ids"] != one(engine, HELLO, sampled(None))["token_ids"]


def test_seeded_output_does_not_depend_on_the_batch(engine: LLMEngine) -> None:
    alone = one(engine, HELLO, sampled(1234, 30))["token_ids"]
    others: list[Prompt] = [random_ids(13, 45), "The quick brown fox jumps over the lazy dog."]
    batch = many(engine, [others[0], HELLO, others[1]], [sampled(7, 50), sampled(1234, 30), greedy(10)])
    assert batch[1]["token_ids"] == alone


def test_seeded_request_resumes_identically(engine: LLMEngine) -> None:
    n = 20
    full = one(engine, HELLO, sampled(99, n))["token_ids"]
    for k in (1, 7, 16):  # failover: resubmit prompt + the k tokens already streamed
        resumed = one(engine, engine.tokenizer.encode(HELLO) + full[:k], sampled(99, n - k))
        assert resumed["token_ids"] == full[k:], f"resumed after {k} tokens"


def test_greedy_request_resumes_identically(engine: LLMEngine, hello_greedy: dict[str, Any]) -> None:
    full = hello_greedy["token_ids"]
    resumed = one(engine, engine.tokenizer.encode(HELLO) + full[:30], greedy(10))
    assert resumed["token_ids"] == full[30:40]


# --- logprobs ---


def test_logprobs_greedy_chosen_is_top1(engine: LLMEngine, hello_greedy: dict[str, Any]) -> None:
    result = one(engine, HELLO, greedy(8, logprobs=3))
    assert result["token_ids"] == hello_greedy["token_ids"][:8]
    entries = result["logprobs"]
    assert [e["token_id"] for e in entries] == result["token_ids"]
    for entry in entries:
        top = entry["top_logprobs"]
        assert len(top) == 3
        assert max(top, key=top.get) == entry["token_id"]
        assert entry["logprob"] == pytest.approx(top[entry["token_id"]])
        assert all(lp <= 0.0 for lp in top.values())


def test_logprobs_of_sampled_tokens(engine: LLMEngine) -> None:
    result = one(engine, HELLO, SamplingParams(temperature=1.0, seed=5, max_tokens=6, ignore_eos=True, logprobs=2))
    assert result["token_ids"] == one(engine, HELLO, sampled(5, 6))["token_ids"]
    for entry in result["logprobs"]:
        assert len(entry["top_logprobs"]) == 2
        assert entry["logprob"] <= max(entry["top_logprobs"].values()) + 1e-6
    zero = one(engine, HELLO, greedy(2, logprobs=0))
    assert [e["top_logprobs"] for e in zero["logprobs"]] == [{}, {}]
    assert "logprobs" not in one(engine, HELLO, greedy(2))


def test_streamed_logprobs(engine: LLMEngine) -> None:
    request_id = engine.add_request(HELLO, greedy(3, logprobs=1))
    outs = drain(engine)[request_id]
    assert all(len(o.new_logprobs) == 1 for o in outs)
    assert [next(iter(o.new_logprobs[0].top)) for o in outs] == tokens_of(outs)


# --- stops ---


def token_pieces(engine: LLMEngine, token_ids: list[int]) -> list[str]:
    """Each token's text, as long as the decoded text grows cleanly (no split UTF-8 characters)."""
    pieces: list[str] = []
    for i in range(len(token_ids)):
        before, after = engine.tokenizer.decode(token_ids[:i]), engine.tokenizer.decode(token_ids[: i + 1])
        piece = after[len(before) :] if after.startswith(before) else ""
        pieces.append("" if "\ufffd" in piece else piece)
    return pieces


def clean(piece: str) -> bool:
    return len(piece) >= 3 and piece.isascii() and piece.isprintable()


def test_stop_string_inside_one_token(engine: LLMEngine, hello_greedy: dict[str, Any]) -> None:
    out, full = hello_greedy["token_ids"], hello_greedy["text"]
    pieces = token_pieces(engine, out)

    def inner_stop(i: int) -> str | None:
        """2 chars from the middle of token i's text, if the text first contains them there."""
        stop = pieces[i][1:3]
        return stop if clean(pieces[i]) and full.find(stop) == len(engine.tokenizer.decode(out[:i])) + 1 else None

    j = next(i for i in range(3, len(out)) if inner_stop(i))
    stop = inner_stop(j)
    assert stop is not None
    result = one(engine, HELLO, greedy(LONG_GREEDY, stop=[stop]))
    assert result["finish_reason"] == "stop"
    assert result["text"] == full[: full.index(stop)]
    assert result["token_ids"] == out[: j + 1]


def test_stop_string_spanning_two_tokens(engine: LLMEngine, hello_greedy: dict[str, Any]) -> None:
    out, full = hello_greedy["token_ids"], hello_greedy["text"]
    pieces = token_pieces(engine, out)

    def straddling_stop(i: int) -> str | None:
        """A stop string made of token i's last 2 chars and token i+1's first 2, if it first occurs there."""
        stop = pieces[i][-2:] + pieces[i + 1][:2]
        first_at = len(engine.tokenizer.decode(out[: i + 1])) - 2
        return stop if clean(pieces[i]) and clean(pieces[i + 1]) and full.find(stop) == first_at else None

    j = next(i for i in range(3, len(out) - 1) if straddling_stop(i))
    stop = straddling_stop(j)
    assert stop is not None
    result = one(engine, HELLO, greedy(LONG_GREEDY, stop=["never-generated-xyz", stop]))
    assert result["finish_reason"] == "stop"
    assert result["text"] == full[: full.index(stop)]
    assert result["token_ids"] == out[: j + 2]


def test_stop_token_ids_and_min_tokens(engine: LLMEngine, hello_greedy: dict[str, Any]) -> None:
    out = hello_greedy["token_ids"]
    j = next(i for i in range(2, len(out)) if out[i] not in out[:i])
    result = one(engine, HELLO, greedy(LONG_GREEDY, stop_token_ids=[out[j]]))
    assert result["token_ids"] == out[: j + 1]
    assert result["finish_reason"] == "stop"
    delayed = one(engine, HELLO, greedy(j + 10, stop_token_ids=[out[j]], min_tokens=j + 3))
    assert delayed["token_ids"][:j] == out[:j]
    assert out[j] not in delayed["token_ids"][: j + 3]
    assert_stops_after_min_tokens(delayed, out[j], j + 3, j + 10)


def assert_stops_after_min_tokens(result: dict[str, Any], stop_id: int, min_tokens: int, max_tokens: int) -> None:
    if result["finish_reason"] == "stop":
        assert result["token_ids"][-1] == stop_id and len(result["token_ids"]) > min_tokens
    else:
        assert result["finish_reason"] == "length" and len(result["token_ids"]) == max_tokens


@pytest.fixture(scope="module")
def eos_case(
    model_dir: Path, hello_greedy: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> tuple[LLMEngine, list[int], int]:
    """An engine on the same weights whose EOS is a token greedy HELLO produces at index j."""
    out = hello_greedy["token_ids"]
    j = next(i for i in range(2, len(out)) if out[i] not in out[:i])
    eos_dir = tmp_path_factory.mktemp("eos-model")
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (eos_dir / name).symlink_to(model_dir / name)
    config = json.loads((model_dir / "config.json").read_text())
    (eos_dir / "config.json").write_text(json.dumps({**config, "eos_token_id": out[j]}))
    eos_engine = LLMEngine(eos_dir, device="cpu", dtype="float32", max_model_len=256)
    assert out[j] in eos_engine.eos_token_ids
    return eos_engine, out, j


def test_eos_stops_unless_ignore_eos(eos_case: tuple[LLMEngine, list[int], int]) -> None:
    eos_engine, out, j = eos_case
    stopped = one(eos_engine, HELLO, SamplingParams(temperature=0.0, max_tokens=LONG_GREEDY))
    assert stopped["token_ids"] == out[: j + 1]
    assert stopped["finish_reason"] == "stop"
    ignored = one(eos_engine, HELLO, greedy(j + 5))
    assert ignored["token_ids"] == out[: j + 5]
    assert ignored["finish_reason"] == "length"


def test_min_tokens_suppresses_eos(eos_case: tuple[LLMEngine, list[int], int]) -> None:
    eos_engine, out, j = eos_case
    params = SamplingParams(temperature=0.0, max_tokens=j + 10, min_tokens=j + 3)
    result = one(eos_engine, HELLO, params)
    assert result["token_ids"][:j] == out[:j]
    assert out[j] not in result["token_ids"][: j + 3]
    assert_stops_after_min_tokens(result, out[j], j + 3, j + 10)
    assert_idle(eos_engine)
