"""n > 1 through the router over real replicas: a request's n choices, whole and streamed, equal the offline
engine's n choices, and a replica killed mid-stream leaves every choice equal to an undisturbed run."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from engine import LLMEngine, SamplingParams
from proto import nanoserve_pb2 as pb
from tests.serving import RouterThread, kill_mid_stream, prompt

SAMPLED: dict[str, Any] = dict(temperature=0.9, top_p=0.95, seed=5, ignore_eos=True, n=3)


@pytest.fixture(scope="module")
def router(start_module_router: Callable[..., RouterThread]) -> RouterThread:
    return start_module_router(num_replicas=2)


def offline_choices(engine: LLMEngine, token_ids: list[int], **params: Any) -> list[list[int]]:
    results = engine.generate(token_ids, SamplingParams(**params), use_tqdm=False)
    return [choice["token_ids"] for choice in results]  # type: ignore[index]


def by_choice(chunks: list[pb.GenerateResponse], n: int) -> list[list[int]]:
    return [[t for c in chunks if c.index == i for t in c.token_ids] for i in range(n)]


def test_n_choices_whole_and_streamed_equal_the_offline_engines(router: RouterThread, offline: LLMEngine) -> None:
    params = dict(SAMPLED, max_tokens=12)
    expected = offline_choices(offline, prompt(1, 40), **params)
    assert len({tuple(c) for c in expected}) == 3
    with router.client() as client:
        chunks = list(client.generate(prompt(1, 40), timeout=60, **params))
        whole = client.complete(prompt(1, 40), timeout=60, **params)
    assert by_choice(chunks, 3) == expected
    last = chunks[-1]
    assert last.HasField("usage") and not any(c.HasField("usage") for c in chunks[:-1])
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (40, 36)  # the prompt once, 3 x 12 tokens
    assert sorted(c.index for c in chunks if c.finish_reason) == [0, 1, 2]
    assert [list(c.token_ids) for c in whole.choices] == expected and [c.index for c in whole.choices] == [0, 1, 2]
    assert list(whole.token_ids) == expected[0] and whole.usage.completion_tokens == 36
    assert all(c.finish_reason == pb.FINISH_REASON_LENGTH for c in whole.choices)


def test_n_below_one_is_invalid_argument_naming_n(router: RouterThread) -> None:
    with router.client() as client, pytest.raises(grpc.RpcError) as info:
        client.complete([1, 2, 3], timeout=10, n=0)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "params.n" in info.value.details()


def killed_mid_stream(router: RouterThread, requests: list[tuple[list[int], dict[str, Any]]]) -> list[list[list[int]]]:
    """Stream the requests (n = 3 each), kill a replica once every choice of each has begun, and return each
    request's tokens by choice; checks that a later choice (its own seed) was resumed alone on another replica."""
    streams, running = kill_mid_stream(router, requests, lambda chunks: all(len(c) >= 3 for c in by_choice(chunks, 3)))
    assert any(index for r in running for index in r.engine_choices.values()), (
        "no choice but 0 was mid-way on the killed replica; make the streams longer")
    return [by_choice(chunks, 3) for chunks in streams]


def sampled_requests() -> list[tuple[list[int], dict[str, Any]]]:
    return [(prompt(100 + i, 30), dict(SAMPLED, seed=i, max_tokens=150)) for i in range(4)]


def test_choices_moved_mid_stream_equal_an_undisturbed_run(
    start_router: Callable[..., RouterThread], offline: LLMEngine
) -> None:
    """Each unfinished choice continues alone on another replica with its own seed (SamplingParams.for_choice);
    test_a_choice_resumed_with_another_seed_diverges is the control."""
    requests = sampled_requests()
    expected = [offline_choices(offline, p, **params) for p, params in requests]
    streams = killed_mid_stream(start_router(num_replicas=2, policy="round-robin"), requests)
    assert streams == expected


def test_a_choice_resumed_with_another_seed_diverges(
    start_router: Callable[..., RouterThread], offline: LLMEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control of the test above: a router that resumes choice i with the request's seed instead of choice i's
    (choice_seed) hands back streams that differ from an undisturbed run after the failover."""
    requests = sampled_requests()
    expected = [offline_choices(offline, p, **params) for p, params in requests]
    monkeypatch.setattr(SamplingParams, "for_choice", lambda self, index: dataclasses.replace(self, n=1))
    streams = killed_mid_stream(start_router(num_replicas=2, policy="round-robin"), requests)
    assert streams != expected
