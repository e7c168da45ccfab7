"""Scenario 3: a tensor-parallel rank (TP=2, gloo) of one replica is SIGKILLed mid-load."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from tests.chaos.load import (
    Load,
    assert_identical_outputs,
    assert_kv_conserved,
    assert_no_lost_request,
    expected_outputs,
    mixed_requests,
    wait_for,
)
from tests.engine.tp.test_lifecycle import pid_alive, tp_segments
from tests.serving import ENGINE_KWARGS, RouterThread, handle_of


def test_killed_rank_takes_its_replica_down_and_its_requests_move(
    start_router: Callable[..., RouterThread], model_dir: Path
) -> None:
    router = start_router(num_replicas=2, policy="least-load", tensor_parallel_size=2,
                          engine_kwargs={**ENGINE_KWARGS, "tensor_parallel_size": 2})
    requests = mixed_requests(24, seed=5, max_tokens=80)
    expected = expected_outputs(model_dir, requests)
    segments_before = tp_segments()
    load = Load(router, requests, concurrency=24)
    load.wait_until_streaming(fraction=0.5)
    victim = max(router.router.pool.slots, key=lambda s: len(s.inflight))
    rank_pids, replica_pid = asyncio.run(handle_of(router, victim.name).run(
        lambda replica: (replica._loop.call(lambda engine: [p.pid for p in engine.ranks.processes]), os.getpid()),
        timeout_s=30))
    # Its control channel's name was unlinked once the ranks attached: nothing in /dev/shm to leak.
    assert not any(seg.startswith(f"nanoserve-tp-{replica_pid}-") for seg in tp_segments())
    os.kill(rank_pids[0], signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for(lambda: victim.state != "serving", 5.0, "the replica with a dead rank marked down")
    outcomes = load.finish()
    assert_no_lost_request(outcomes)  # zero errors anywhere: the other replica's clients included
    assert_identical_outputs(outcomes, expected)
    assert time.monotonic() - killed_at < 60
    wait_for(lambda: all(s.state == "serving" for s in router.router.pool.slots), 90, "the replica recreated")
    assert not any(pid_alive(pid) for pid in rank_pids)
    assert_kv_conserved(router)
    assert tp_segments() <= segments_before  # no segment, the recreated replica's included (I5 checks again)
