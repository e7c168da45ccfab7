"""Scenario 11 for a replica: SIGTERM to its process, or its `drain` call, under a steady streaming load.

It takes no new request at once (health says draining; the router routes elsewhere), its streams finish
there, it exits and is replaced; requests still running at its drain timeout continue on another replica.
Zero client errors either way, and every stream equals an undisturbed run.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from pathlib import Path

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
from tests.engine.tp.test_lifecycle import pid_alive
from tests.serving import RouterThread, handle_of


@pytest.mark.parametrize("how, drain_timeout_s", [("SIGTERM", 60.0), ("drain call", 0.5)])
def test_draining_replica_finishes_its_streams_and_is_replaced(
    start_router: Callable[..., RouterThread], model_dir: Path, how: str, drain_timeout_s: float
) -> None:
    router = start_router(num_replicas=2, policy="least-load", drain_timeout_s=drain_timeout_s)
    pool = router.router.pool
    requests = mixed_requests(48, seed=13, max_tokens=100)
    expected = expected_outputs(model_dir, requests)
    load = Load(router, requests, concurrency=32)
    load.wait_until_streaming(fraction=0.5)
    victim = max(pool.slots, key=lambda s: len(s.inflight))
    assert victim.inflight
    handle = handle_of(router, victim.name)
    pid = asyncio.run(handle.run(lambda replica: os.getpid(), timeout_s=30))
    if how == "SIGTERM":
        os.kill(pid, signal.SIGTERM)
    else:
        asyncio.run(handle.run(lambda replica: replica.drain(), timeout_s=30))
    wait_for(lambda: asyncio.run(handle.health(timeout_s=30)).draining, 2, "the replica reporting draining")
    wait_for(lambda: victim.state != "serving", 10, "the router seeing the replica drain")
    if how == "SIGTERM":  # the long drain timeout: still draining, reported, and routed around
        assert victim.state == "draining"
        [status] = [r for r in router.status().replicas if r.name == victim.name]
        assert status.state == pb.REPLICA_STATE_DRAINING
        with Client(router.address) as client:
            for i in range(4):
                answer = client.complete([i + 1, 2, 3], timeout=30, max_tokens=2)
                assert answer.replica != victim.name
    outcomes = load.finish()
    assert_no_lost_request(outcomes)
    assert_identical_outputs(outcomes, expected)
    num_failovers = router.router.metrics.failovers._value.get()
    if how == "SIGTERM":
        assert num_failovers == 0  # every stream on the draining replica finished there
        assert any(o.replica == victim.name for o in outcomes)
    else:
        assert num_failovers > 0  # its drain timeout cut them short; they continued elsewhere, exactly
    wait_for(lambda: victim.num_restarts == 1 and victim.state == "serving", 90, "the drained replica replaced")
    wait_for(lambda: not pid_alive(pid), 30, "the drained replica's process exiting")
    assert_kv_conserved(router)
