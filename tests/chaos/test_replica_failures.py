"""Replicas dying, hanging, or all going away under a steady streaming load: no request is lost,
every stream equals an undisturbed run, and the cluster heals without a router restart."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from proto import nanoserve_pb2 as pb
from router.client import Client
from tests.chaos.load import (
    Load,
    assert_identical_outputs,
    assert_kv_conserved,
    assert_no_lost_request,
    expected_outputs,
    mixed_requests,
    wait_for,
)
from tests.faults import hang_step_loop
from tests.serving import ENGINE_KWARGS, RouterThread, handle_of


def actor_call(router: RouterThread, name: str, fn: Callable) -> object:
    """Run fn(replica) inside the replica actor: fault injection without test hooks."""
    return asyncio.run(handle_of(router, name).run(fn, timeout_s=30))


def busiest_replica(router: RouterThread) -> str:
    return max(router.router.pool.slots, key=lambda s: len(s.inflight)).name


def all_serving(router: RouterThread) -> bool:
    return all(slot.state == "serving" for slot in router.router.pool.slots)


@pytest.mark.parametrize(("how", "kv_cache_dtype"), [("ray.kill", "auto"), ("SIGKILL", "auto"), ("ray.kill", "fp8")])
def test_replica_killed_mid_stream(start_router: Callable[..., RouterThread], model_dir: Path, how: str,
                                   kv_cache_dtype: str) -> None:
    """Also with an FP8 KV cache: a stream resumed on another replica re-quantises its tokens there, alike."""
    engine_kwargs = {**ENGINE_KWARGS, "kv_cache_dtype": kv_cache_dtype}
    router = start_router(num_replicas=2, policy="least-load", engine_kwargs=engine_kwargs)
    requests = mixed_requests(48, seed=1, max_tokens=80)
    expected = expected_outputs(model_dir, requests, engine_kwargs)
    load = Load(router, requests, concurrency=32)
    load.wait_until_streaming(fraction=0.5)
    victim = busiest_replica(router)
    if how == "ray.kill":
        asyncio.run(handle_of(router, victim).kill(wait=False))
    else:
        os.kill(int(actor_call(router, victim, lambda self: os.getpid())), signal.SIGKILL)
    outcomes = load.finish()
    assert_no_lost_request(outcomes)
    assert_identical_outputs(outcomes, expected)
    wait_for(lambda: all_serving(router), 60, "the killed replica serving again")
    assert next(s for s in router.router.pool.slots if s.name == victim).num_restarts == 1
    assert router.router.metrics.failovers._value.get() > 0
    assert_kv_conserved(router)


def test_replica_dying_before_the_first_token_is_retried(
    start_router: Callable[..., RouterThread], model_dir: Path
) -> None:
    router = start_router(num_replicas=2, policy="round-robin")
    requests = mixed_requests(8, seed=2, max_tokens=20, prompt_len=(300, 400))  # long prefills
    expected = expected_outputs(model_dir, requests)
    victim = router.router.pool.slots[0]
    actor_call(router, victim.name, lambda self: self._loop.call(lambda engine: None))  # replica is idle
    asyncio.run(handle_of(router, victim.name).kill(wait=False))  # dies before it gets or streams anything
    load = Load(router, requests, concurrency=8)
    outcomes = load.finish()
    assert_no_lost_request(outcomes)
    assert_identical_outputs(outcomes, expected)
    wait_for(lambda: all_serving(router), 60, "the killed replica serving again")


def test_hung_replica_is_marked_down_and_its_streams_move(
    start_router: Callable[..., RouterThread], model_dir: Path
) -> None:
    stall_timeout_s = 4.0
    # Generous health timeouts, so a loaded CI machine does not also mark the healthy replica down.
    router = start_router(num_replicas=2, policy="least-load", stall_timeout_s=stall_timeout_s,
                          health_timeout_s=15.0)
    requests = mixed_requests(16, seed=3, max_tokens=150)
    expected = expected_outputs(model_dir, requests)
    load = Load(router, requests, concurrency=16)
    load.wait_until_streaming()
    victim = busiest_replica(router)
    slot = next(s for s in router.router.pool.slots if s.name == victim)
    # The step loop stops (a hung kernel, a deadlock); RPCs such as health still answer.
    actor_call(router, victim, hang_step_loop(60))
    hung_at = time.monotonic()

    def stalled_since() -> float | None:
        """When the replica's step thread last beat, on our clock, once it is clearly hung (a loaded machine
        may start the stall a while after we asked for it)."""
        if slot.state != "serving":
            return None
        silent_s = asyncio.run(handle_of(router, victim).health(timeout_s=30)).seconds_since_heartbeat
        return time.monotonic() - silent_s if silent_s > 1.0 else None

    stall_start = None
    while stall_start is None and slot.state == "serving":
        stall_start = stalled_since()
        time.sleep(0.1)
    wait_for(lambda: slot.state != "serving", 60, "the hung replica marked down")
    if stall_start is not None:  # the stated bound: stall timeout + a health interval (+ the health call)
        assert time.monotonic() - stall_start < stall_timeout_s + 2 * router.router.config.health_interval_s + 3
    outcomes = load.finish()
    assert_no_lost_request(outcomes)
    assert_identical_outputs(outcomes, expected)
    assert time.monotonic() - hung_at < 60  # the streams moved; they did not wait for the stall to end
    wait_for(lambda: all_serving(router), 60, "the hung replica replaced")


def test_two_of_four_then_all_replicas_die(start_router: Callable[..., RouterThread], model_dir: Path) -> None:
    router = start_router(num_replicas=4, policy="least-load")
    pool = router.router.pool
    requests = mixed_requests(32, seed=4, max_tokens=60)
    expected = expected_outputs(model_dir, requests)
    load = Load(router, requests, concurrency=32)
    load.wait_until_streaming(fraction=0.5)
    for slot in pool.slots[:2]:
        asyncio.run(handle_of(router, slot.name).kill(wait=False))
    outcomes = load.finish()
    assert_no_lost_request(outcomes)
    assert_identical_outputs(outcomes, expected)
    wait_for(lambda: all_serving(router), 90, "the two killed replicas serving again")

    for slot in pool.slots:
        asyncio.run(handle_of(router, slot.name).kill(wait=False))
    wait_for(lambda: not pool.serving(), 10, "all replicas marked down")
    started = time.monotonic()
    with Client(router.address) as client, pytest.raises(grpc.RpcError) as info:
        client.complete([1, 2, 3], timeout=30, max_tokens=2)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 2.0
    wait_for(lambda: all_serving(router), 120, "every replica back without a router restart")
    with Client(router.address) as client:
        assert client.complete([1, 2, 3], timeout=30, max_tokens=2).finish_reason == pb.FINISH_REASON_LENGTH
    assert_kv_conserved(router)
