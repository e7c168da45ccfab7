"""Bad input is a ValueError naming the field, and the engine keeps serving: nothing left running, no block leaked."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine import LLMEngine, SamplingParams
from engine.prompt import Prompt

VOCAB = 151936
MAX_MODEL_LEN = 128
NUM_KV_BLOCKS = 4  # x 16 tokens: smaller than max_model_len, so a long request can outgrow the cache


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint: Callable[..., Path]) -> Path:
    return tiny_checkpoint("tied-gqa2-hd16", vocab_size=VOCAB)  # max_position_embeddings=1024


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> LLMEngine:
    return LLMEngine(
        model_dir, device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN, num_kv_blocks=NUM_KV_BLOCKS
    )


def generate_one(engine: LLMEngine, prompt: Prompt, **kwargs: Any) -> dict[str, Any]:
    result = engine.generate(prompt, use_tqdm=False, **kwargs)
    assert isinstance(result, dict)
    return result


def assert_still_serving(engine: LLMEngine) -> None:
    """Nothing of the rejected request is left, and a valid request still completes."""
    assert not engine.has_unfinished()
    assert engine.block_manager.num_used_blocks == 0
    assert len(generate_one(engine, "Hello", max_tokens=3, ignore_eos=True, temperature=0)["token_ids"]) == 3
    assert not engine.has_unfinished()
    assert engine.block_manager.num_used_blocks == 0


# name -> (prompts, sampling_params, keyword sampling parameters, a pattern the message must contain)
BAD_GENERATE_CALLS: dict[str, tuple[Any, Any, dict[str, Any], str]] = {
    "empty text": ("", None, {}, "prompt"),
    "empty ids": ([], None, {}, "prompt"),
    "negative id": ([5, -1], None, {}, "prompt: token id -1 at index 1"),
    "id == vocab": ([VOCAB], None, {}, f"prompt: token id {VOCAB}"),
    "id > vocab": ([1, 2, 10**9], None, {}, "prompt: token id 1000000000"),
    "float id": ([3, 2.5], None, {}, "prompt: token id 2.5"),
    "str id": ([3, "7"], None, {}, "prompt: token id '7'"),
    "bool id": ([3, True], None, {}, "prompt: token id True"),
    "not a prompt": (42, None, {}, "prompt"),
    "prompt == max_model_len": ([1] * MAX_MODEL_LEN, None, {}, "max_model_len"),
    "prompt > max_model_len": ([1] * 500, None, {}, "max_model_len"),
    "max_tokens 0": ("hi", None, dict(max_tokens=0), "max_tokens"),
    "max_tokens float": ("hi", None, dict(max_tokens=2.0), "max_tokens"),
    "prompt + max_tokens > max_model_len": ([1] * (MAX_MODEL_LEN - 2), None, dict(max_tokens=3), "max_tokens: 3 "
                                            "exceeds the 2 tokens left"),
    "max_tokens a billion": ("hi", None, dict(max_tokens=10**9), "max_tokens: 1000000000 exceeds"),
    "temperature < 0": ("hi", None, dict(temperature=-0.5), "temperature"),
    "temperature NaN": ("hi", None, dict(temperature=float("nan")), "temperature"),
    "temperature inf": ("hi", None, dict(temperature=float("inf")), "temperature"),
    "top_p 0": ("hi", None, dict(top_p=0.0), "top_p"),
    "top_p > 1": ("hi", None, dict(top_p=1.5), "top_p"),
    "top_k 0": ("hi", None, dict(top_k=0), "top_k"),
    "top_k < -1": ("hi", None, dict(top_k=-2), "top_k"),
    "min_p < 0": ("hi", None, dict(min_p=-0.1), "min_p"),
    "min_p > 1": ("hi", None, dict(min_p=1.5), "min_p"),
    "min_tokens > max_tokens": ("hi", None, dict(max_tokens=3, min_tokens=4), "min_tokens"),
    "empty stop string": ("hi", None, dict(stop=["ok", ""]), "stop"),
    "negative stop token id": ("hi", None, dict(stop_token_ids=[-3]), "stop_token_ids"),
    "stop token id >= vocab": ("hi", None, dict(stop_token_ids=[5, 10**7], min_tokens=2), "stop_token_ids\\[1\\]"),
    "seed < 0": ("hi", None, dict(seed=-1), "seed"),
    "logprobs > 20": ("hi", None, dict(logprobs=21), "logprobs"),
    "unknown keyword": ("hi", None, dict(max_token=3), "max_token"),
    "params and kwargs": ("hi", SamplingParams(), dict(max_tokens=3), "max_tokens"),
    "params not SamplingParams": ("hi", [{"max_tokens": 3}], {}, "sampling_params"),
    "params count": (["a", "b"], [SamplingParams()], {}, "sampling_params"),
    "more blocks than the cache": ([1] * 10, None, dict(max_tokens=100), "KV blocks"),
    "bad prompt in a batch": (["Hello there", "Fine", "", "Bye"], None, dict(max_tokens=5), r"prompts\[2\]: prompt"),
    "bad params in a batch": (["Hello", "x"], [SamplingParams(), "nope"], {}, r"prompts\[1\]: sampling_params"),
    "bad ids in a batch": ([[1, 2, 3], [4, VOCAB + 5]], None, dict(max_tokens=5), r"prompts\[1\]: prompt: token id"),
}


@pytest.mark.parametrize("case", list(BAD_GENERATE_CALLS))
def test_bad_generate_call_is_rejected_and_engine_keeps_serving(engine: LLMEngine, case: str) -> None:
    prompts, params, kwargs, field = BAD_GENERATE_CALLS[case]
    with pytest.raises(ValueError, match=field):
        engine.generate(prompts, params, use_tqdm=False, **kwargs)
    assert_still_serving(engine)


def test_request_that_fits_exactly_is_accepted(engine: LLMEngine) -> None:
    result = generate_one(engine, [1] * 10, max_tokens=NUM_KV_BLOCKS * 16 - 10, ignore_eos=True)
    assert len(result["token_ids"]) == NUM_KV_BLOCKS * 16 - 10
    assert_still_serving(engine)


def test_bad_add_request_leaves_no_trace(engine: LLMEngine) -> None:
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request([], SamplingParams(), request_id="r")
    with pytest.raises(ValueError, match="sampling_params"):
        engine.add_request("hi", {"max_tokens": 2}, request_id="r")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request("hi", SamplingParams(), request_id=7)  # type: ignore[arg-type]
    assert engine.stats().num_waiting == 0
    assert engine.add_request("hi", SamplingParams(max_tokens=2), request_id="r") == "r"  # the id is still free
    while engine.has_unfinished():
        engine.step()
    assert_still_serving(engine)


def test_bad_batch_beside_a_streaming_request(engine: LLMEngine) -> None:
    """A rejected generate() batch must not disturb a request already in flight."""
    request_id = engine.add_request("Hello", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    bad_batch: list[Prompt] = ["ok", ""]
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        engine.generate(bad_batch, use_tqdm=False)
    tokens: list[int] = []
    while engine.has_unfinished():
        tokens += [t for out in engine.step() if out.request_id == request_id for t in out.new_token_ids]
    expected = generate_one(engine, "Hello", max_tokens=4, ignore_eos=True, temperature=0)
    assert tokens == expected["token_ids"]
    assert_still_serving(engine)


# --- LLMEngine(...) argument validation ---

# (argument, bad value): the error must name the argument.
BAD_ENGINE_ARGS: list[tuple[str, Any]] = [
    ("tensor_parallel_size", 0),
    ("tensor_parallel_size", 3),  # does not divide the 4 query heads
    ("tensor_parallel_size", 4),  # does not divide the 2 KV heads
    ("max_num_seqs", 0),
    ("max_num_batched_tokens", -1),
    ("block_size", 0),
    ("block_size", 3),
    ("block_size", 512),
    ("gpu_memory_utilization", 0),
    ("gpu_memory_utilization", 1.5),
    ("gpu_memory_utilization", "0.5"),
    ("num_kv_blocks", 0),
    ("dtype", "fp8"),
    ("kv_cache_dtype", "fp16"),
    ("device", "tpu"),
    ("max_model_len", 2048),  # the checkpoint's max_position_embeddings is 1024
    ("max_model_len", 0),
    ("enforce_eager", "yes"),
]


@pytest.mark.parametrize(("field", "value"), BAD_ENGINE_ARGS, ids=[f"{f}={v!r}" for f, v in BAD_ENGINE_ARGS])
def test_bad_engine_argument(model_dir: Path, field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        LLMEngine(model_dir, **{"device": "cpu", field: value})


def test_unknown_engine_argument(model_dir: Path) -> None:
    with pytest.raises(TypeError, match="max_batch"):
        LLMEngine(model_dir, device="cpu", max_batch=3)


def test_missing_model_dir(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model"):
        LLMEngine(tmp_path / "nope", device="cpu")


def test_model_dir_without_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="config.json"):
        LLMEngine(tmp_path, device="cpu")


def test_unsupported_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    with pytest.raises(ValueError, match="model: unsupported architecture.*LlamaForCausalLM.*supported: "
                       "Qwen2ForCausalLM, Qwen3ForCausalLM"):
        LLMEngine(tmp_path, device="cpu")
