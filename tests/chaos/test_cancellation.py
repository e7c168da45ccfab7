"""Scenarios 7 and 8: cancellation at random points of a request's life (an abort storm) and deadlines
shorter than the generation. No crash, the right status, every block back; the next requests are exact."""

from __future__ import annotations

import random
import threading
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
from tests.serving import ENGINE_KWARGS, RouterThread

STORM_SIZE = 300  # the full 2,000-request storm runs by hand: bench/soak.py


def test_abort_storm_leaves_nothing_behind(start_router: Callable[..., RouterThread], model_dir: Path) -> None:
    # A small KV cache and chunked prefill, so cancellations land while queued, mid-prefill, preempted,
    # between steps, in the final step and after completion.
    router = start_router(num_replicas=2, policy="round-robin",
                          engine_kwargs={**ENGINE_KWARGS, "num_kv_blocks": 48, "max_num_batched_tokens": 64})
    rng = random.Random(9)
    requests = mixed_requests(STORM_SIZE, seed=9, max_tokens=30, prompt_len=(4, 120))
    statuses: list[grpc.StatusCode] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        request, cancel = requests[i], rng.random() < 0.5
        delay = rng.choice([0.0, 0.001, 0.01, 0.05, 0.2, 1.0])
        with Client(router.address) as client:
            call = client.generate(request.prompt, timeout=60, **request.params)
            if cancel:
                threading.Timer(delay, call.cancel).start()
            try:
                for _ in call:
                    pass
                code = grpc.StatusCode.OK
            except grpc.RpcError as e:
                code = e.code()
        with lock:
            statuses.append(code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(STORM_SIZE)]
    for batch_start in range(0, STORM_SIZE, 50):  # 50 clients at a time
        for t in threads[batch_start : batch_start + 50]:
            t.start()
        for t in threads[batch_start : batch_start + 50]:
            t.join(120)
    assert len(statuses) == STORM_SIZE
    assert set(statuses) <= {grpc.StatusCode.OK, grpc.StatusCode.CANCELLED}, set(statuses)
    assert statuses.count(grpc.StatusCode.CANCELLED) > STORM_SIZE // 4
    assert all(slot.state == "serving" for slot in router.router.pool.slots)
    assert_kv_conserved(router)
    after = mixed_requests(30, seed=10, max_tokens=20)
    outcomes = Load(router, after, concurrency=30).finish()
    assert_no_lost_request(outcomes)
    assert_identical_outputs(outcomes, expected_outputs(model_dir, after))


def test_deadline_shorter_than_the_generation(start_router: Callable[..., RouterThread]) -> None:
    router = start_router(num_replicas=1, policy="least-load")
    requests = mixed_requests(8, seed=11, max_tokens=400)
    started = time.monotonic()
    outcomes = Load(router, requests, concurrency=8, timeout_s=0.5).finish()
    assert all(o.code == grpc.StatusCode.DEADLINE_EXCEEDED for o in outcomes)
    assert time.monotonic() - started < 10
    assert_kv_conserved(router, timeout_s=5)  # the replica aborted them (one step after the router did)
