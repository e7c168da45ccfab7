"""A request that crashes every replica it runs on (a "query of death") takes down at most two of them: then it
is stopped (ABORTED), while the 32 streams around it move and complete, each equal to an undisturbed run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

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
from tests.faults import DEADLY_PROMPT, die_on
from tests.serving import RouterThread


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
