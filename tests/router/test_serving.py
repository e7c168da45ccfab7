"""The router over real replicas: offline-equal output, prefix routing, failover, cancellation, bad input."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from engine import LLMEngine, SamplingParams
from proto import nanoserve_pb2 as pb
from proto import nanoserve_pb2_grpc as pb_grpc
from router.client import Client
from tests.serving import VOCAB, RouterThread, greedy, kill_mid_stream, prompt, served_services


def collect(client: Client, token_ids: list[int], **params: Any) -> tuple[list[int], pb.GenerateResponse]:
    """All token ids of one streamed request, and its last chunk."""
    chunks = list(client.generate(token_ids, timeout=60, **params))
    return [t for c in chunks for t in c.token_ids], chunks[-1]


@pytest.fixture(scope="module")
def router(start_module_router: Callable[..., RouterThread]) -> RouterThread:
    return start_module_router(num_replicas=2)


def offline_ids(engine: LLMEngine, token_ids: list[int], **params: Any) -> list[int]:
    return engine.generate(token_ids, SamplingParams(**params), use_tqdm=False)["token_ids"]  # type: ignore[index]


def test_streams_what_the_offline_engine_generates(router: RouterThread, offline: LLMEngine) -> None:
    with router.client() as client:
        for seed, params in [(1, greedy(24)), (2, dict(temperature=0.8, top_p=0.9, seed=7, max_tokens=24))]:
            ids, last = collect(client, prompt(seed, 40), **params)
            assert ids == offline_ids(offline, prompt(seed, 40), **params)
            assert last.finish_reason == pb.FINISH_REASON_LENGTH
            assert last.usage.prompt_tokens == 40 and last.usage.completion_tokens == 24
            assert last.replica.startswith("test-")


def test_text_and_stop_strings(router: RouterThread, offline: LLMEngine) -> None:
    """The streamed text is the offline text; a stop string cuts it, as offline."""
    with router.client() as client:
        chunks = list(client.generate(prompt(3, 20), timeout=60, **greedy(30)))
        text = "".join(c.text for c in chunks)
        expected = offline.generate(prompt(3, 20), SamplingParams(**greedy(30)), use_tqdm=False)
        assert text == expected["text"]  # type: ignore[index]
        stop = text[10:13]
        stopped = client.complete(prompt(3, 20), timeout=60, stop=[stop], **greedy(30))
        assert stopped.text == text[: text.index(stop)]
        assert stopped.finish_reason == pb.FINISH_REASON_STOP


def test_the_placement_log_line_counts_the_blocks_the_placement_found(
    router: RouterThread, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: the count was taken after the request's own prompt blocks were added to the replica's view, so a
    cold (or just restarted) replica showed every block of the prompt as cached there."""
    caplog.set_level(logging.INFO, logger="router.placement")
    cold = prompt(77, 40)  # 2 full blocks
    with router.client() as client:
        collect(client, cold, **greedy(2))
        collect(client, cold, **greedy(2))
    placed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request ")]
    assert "40 prompt tokens, 0 of its blocks cached there" in placed[-2]
    assert "40 prompt tokens, 2 of its blocks cached there" in placed[-1]


def test_shared_prefix_lands_on_the_replica_that_caches_it(start_router: Callable[..., RouterThread]) -> None:
    prefix = prompt(10, 160)  # 10 blocks
    for policy in ("prefix", "round-robin"):
        router = start_router(num_replicas=2, policy=policy)
        with router.client() as client:
            _, first = collect(client, prefix + prompt(11, 5), **greedy(4))
            lasts = [collect(client, prefix + prompt(20 + i, 5), **greedy(4))[1] for i in range(6)]
        replicas = {last.replica for last in lasts}
        router.stop()
        if policy == "prefix":
            assert replicas == {first.replica}
            assert all(last.usage.cached_prompt_tokens == 160 for last in lasts)
        else:
            assert len(replicas) == 2


def test_replica_killed_mid_stream_loses_no_request(
    start_router: Callable[..., RouterThread], offline: LLMEngine
) -> None:
    router = start_router(num_replicas=2, policy="round-robin")
    requests = [(prompt(100 + i, 30), greedy(300) if i % 2 else dict(temperature=0.9, seed=i, max_tokens=300))
                for i in range(8)]
    expected = [offline_ids(offline, p, **params) for p, params in requests]
    chunks, running = kill_mid_stream(router, requests, lambda chunks: sum(len(c.token_ids) for c in chunks) >= 5)
    victim = router.status().replicas[0].name  # the one killed
    assert len(running) >= 3, "the streams finished before the kill; make them longer"
    for i, (got, want) in enumerate(zip(chunks, expected)):
        assert [t for c in got for t in c.token_ids] == want, f"stream {i} differs from an undisturbed run"
    status = router.wait_for(lambda s: all(r.state == pb.REPLICA_STATE_SERVING for r in s.replicas))
    assert [r.num_restarts for r in status.replicas if r.name == victim] == [1]
    with router.client() as client:  # the restarted replica takes traffic again
        assert victim in {collect(client, prompt(200 + i, 8), **greedy(2))[1].replica for i in range(4)}
    assert router.router.metrics.failovers._value.get() >= 1


def blocks_in_use(router: RouterThread) -> int:
    return sum(r.num_kv_blocks_used for r in router.status().replicas)


def test_cancel_and_deadline_free_the_blocks(router: RouterThread) -> None:
    with router.client() as client:
        call = client.generate(prompt(30, 50), timeout=60, **greedy(400))
        for _ in range(3):
            next(call)
        call.cancel()
        router.wait_for(lambda s: sum(r.num_kv_blocks_used for r in s.replicas) == 0, timeout=15)
        with pytest.raises(grpc.RpcError) as info:
            for _ in client.generate(prompt(31, 50), timeout=0.5, **greedy(400)):
                pass
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        router.wait_for(lambda s: sum(r.num_kv_blocks_used for r in s.replicas) == 0, timeout=15)
        assert sum(r.num_inflight_requests for r in router.status().replicas) == 0


BAD_REQUESTS: list[tuple[str, pb.GenerateRequest]] = [
    ("prompt", pb.GenerateRequest()),
    ("text", pb.GenerateRequest(text="")),
    ("token_ids", pb.GenerateRequest(token_ids=pb.TokenIds())),
    ("token_ids.ids[1]", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, VOCAB]))),
    ("token_ids.ids[0]", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[-1]))),
    ("prompt: 600 tokens", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1] * 600))),
    ("chat.messages", pb.GenerateRequest(chat=pb.ChatMessages())),
    ("chat.messages[0].role", pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="wizard")]))),
    ("request_id", pb.GenerateRequest(request_id="x" * 300, token_ids=pb.TokenIds(ids=[1]))),
] + [
    (f"params.{field}", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1]), params=pb.SamplingParams(**{field: value})))
    for field, value in [
        ("temperature", -1.0), ("temperature", float("nan")), ("temperature", float("inf")), ("top_p", 0.0),
        ("top_k", 0), ("min_p", 2.0), ("max_tokens", 0), ("max_tokens", -5), ("min_tokens", -1),
        ("seed", -1), ("logprobs", 21), ("stop_token_ids", [-3]), ("stop", [""]),
    ]
]


@pytest.mark.parametrize(("field", "request_message"), BAD_REQUESTS, ids=[f for f, _ in BAD_REQUESTS])
def test_bad_input_is_invalid_argument_naming_the_field(
    router: RouterThread, field: str, request_message: pb.GenerateRequest
) -> None:
    with router.client() as client, grpc.insecure_channel(router.address) as channel:
        stub = pb_grpc.NanoServeStub(channel)  # sends the request as it is, unchecked by Client
        for call in (stub.Complete, lambda r, timeout: list(stub.Generate(r, timeout=timeout))):
            with pytest.raises(grpc.RpcError) as info:
                call(request_message, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field in info.value.details()
        assert collect(client, [1, 2, 3], **greedy(2))[1].finish_reason == pb.FINISH_REASON_LENGTH


def test_health_reflection_and_model_info(router: RouterThread) -> None:
    names = served_services(router.address)
    assert {"nanoserve.v1.NanoServe", "grpc.health.v1.Health"} <= names
    with router.client() as client:
        info = client.model_info(timeout=10)
        assert (info.vocab_size, info.block_size, info.max_model_len) == (VOCAB, 16, 512)
        status = client.cluster_status(timeout=10)
        assert status.routing_policy == "prefix" and len(status.replicas) == 2


def test_unavailable_when_no_replica_serves(start_router: Callable[..., RouterThread]) -> None:
    router = start_router(num_replicas=1, policy="least-load")
    router.call(_mark_all_down(router))
    started = time.monotonic()
    with router.client() as client, pytest.raises(grpc.RpcError) as info:
        client.complete([1, 2, 3], timeout=30, **greedy(2))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 2.0


async def _mark_all_down(router: RouterThread) -> None:
    pool = router.router.pool
    for slot in pool.slots:  # the replicas keep running; nothing restarts them
        pool.set_state(slot, "down")


def test_full_router_is_resource_exhausted_at_once(start_router: Callable[..., RouterThread]) -> None:
    router = start_router(num_replicas=1, policy="least-load", max_inflight_per_replica=2)
    with router.client() as client:
        streams = [client.generate(prompt(40 + i, 10), timeout=60, **greedy(400)) for i in range(2)]
        for s in streams:
            next(s)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            client.complete([1, 2, 3], timeout=30, **greedy(2))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - started < 2.0
        for s in streams:
            s.cancel()


def test_a_new_router_reattaches_to_running_replicas(start_router: Callable[..., RouterThread]) -> None:
    first = start_router(num_replicas=2)
    prefix = first.router.config.replica_prefix
    epochs = {slot.name: slot.kv.epoch for slot in first.router.pool.slots}
    with first.client() as client:
        collect(client, prompt(50, 40), **greedy(2))  # leaves cached blocks behind
    first.call(first.router.stop(kill_replicas=False))
    second = start_router(num_replicas=2, replica_prefix=prefix)
    assert {slot.name: slot.kv.epoch for slot in second.router.pool.slots} == epochs  # same engines, no reload
    assert sum(len(slot.kv.hashes) for slot in second.router.pool.slots) >= 2  # the view came from snapshots
    with second.client() as client:
        assert collect(client, prompt(50, 40), **greedy(2))[1].usage.cached_prompt_tokens == 32
