"""Scenarios 9 and 12: ten times more requests than the router admits, and a working set larger than the
KV cache. Excess is refused at once; whatever is admitted completes exactly as it would undisturbed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from router.client import Client
from tests.chaos.load import (
    Load,
    assert_identical_outputs,
    assert_kv_conserved,
    assert_no_lost_request,
    expected_outputs,
    mixed_requests,
)
from tests.serving import ENGINE_KWARGS, RouterThread, handle_of


def test_ten_times_capacity_is_refused_at_once_and_the_rest_completes(
    start_router: Callable[..., RouterThread], model_dir: Path
) -> None:
    router = start_router(num_replicas=2, policy="least-load", max_inflight_per_replica=4)
    requests = mixed_requests(80, seed=7, max_tokens=40)  # capacity: 2 replicas x 4 in flight
    expected = expected_outputs(model_dir, requests)
    started = time.monotonic()
    outcomes = Load(router, requests, concurrency=80).finish()
    assert_no_lost_request(outcomes, allowed=frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED}))
    refused = [o for o in outcomes if o.code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert len(refused) >= 40 and all(not o.token_ids for o in refused)
    assert sum(o.code == grpc.StatusCode.OK for o in outcomes) >= 8
    assert_identical_outputs(outcomes, expected)
    assert time.monotonic() - started < 90
    with Client(router.address) as client:
        assert client.cluster_status(timeout=10).replicas[0].state  # still answering
    assert all(slot.state == "serving" for slot in router.router.pool.slots)
    assert_kv_conserved(router)


def test_working_set_larger_than_the_kv_cache_progresses_by_preemption(
    start_router: Callable[..., RouterThread], model_dir: Path
) -> None:
    # 40 blocks of 16 tokens per replica; 16 requests of up to 80 + 100 tokens need ~3x that at once.
    router = start_router(num_replicas=1, policy="least-load", engine_kwargs={**ENGINE_KWARGS, "num_kv_blocks": 40})
    requests = mixed_requests(16, seed=8, max_tokens=100, prompt_len=(40, 80))
    expected = expected_outputs(model_dir, requests)
    outcomes = Load(router, requests, concurrency=16).finish()
    assert_no_lost_request(outcomes)
    assert_identical_outputs(outcomes, expected)
    [slot] = router.router.pool.slots
    assert_kv_conserved(router)
    assert asyncio.run(handle_of(router, slot.name).stats(timeout_s=10)).engine.num_preemptions > 0
