"""A request that crashes every replica it runs on (a "query of death") takes down at most two of them: then it
is stopped (ABORTED), while the 32 streams around it move and complete, each equal to an undisturbed run."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

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
from tests.chaos.test_replica_failures import actor_call, all_serving
from tests.serving import RouterThread

DEADLY_PROMPT = [1023, 1022, 1021, 1020] + [7] * 28  # no other request's prompt starts like this


def die_on(prompt_start: list[int]) -> Callable[[Any], None]:
    """The test-only fault hook, run inside a replica (Ray's __ray_call__): from then on the replica's process
    dies (as from a kernel crash or an OOM kill) once the prefill of a request starting with `prompt_start` has
    run, after the replica has answered its submit call. Built here, as closures, so Ray ships the code itself
    rather than a test-module name."""
    n = len(prompt_start)

    def arm(engine: Any) -> None:
        step = engine.step

        def step_or_die() -> Any:
            if any(seq.token_ids[:n] == prompt_start and seq.num_computed_tokens
                   for seq in engine._requests.values()):
                time.sleep(0.5)  # the submit's answer is long gone: the router knows the request ran here
                os._exit(1)
            return step()

        engine.step = step_or_die

    return lambda replica: replica._loop.call(arm)


def test_a_query_of_death_kills_at_most_two_replicas_and_is_stopped(
    start_router: Callable[..., RouterThread], model_dir: Path
) -> None:
    router = start_router(num_replicas=4, policy="least-load")
    pool = router.router.pool
    requests = mixed_requests(32, seed=5, max_tokens=60)
    expected = expected_outputs(model_dir, requests)
    for slot in pool.slots:  # the replicas there now; their replacements come up healthy
        actor_call(router, slot.name, die_on(DEADLY_PROMPT[:4]))
    load = Load(router, requests, concurrency=32)
    load.wait_until_streaming(fraction=0.5)
    with Client(router.address) as client, pytest.raises(grpc.RpcError) as stopped:
        client.complete(DEADLY_PROMPT, timeout=120, max_tokens=20, temperature=0.0)
    assert stopped.value.code() == grpc.StatusCode.ABORTED
    assert "died while running this request" in (stopped.value.details() or "")
    outcomes = load.finish()
    assert_no_lost_request(outcomes)
    assert_identical_outputs(outcomes, expected)
    wait_for(lambda: all_serving(router), 90, "the killed replicas serving again")
    assert sum(slot.num_restarts for slot in pool.slots) == 2  # the first replica it landed on, and one more
    assert router.router.metrics.queries_of_death._value.get() == 1
    assert router.router.metrics.failovers_waiting._value.get() == 0
    assert_kv_conserved(router)
