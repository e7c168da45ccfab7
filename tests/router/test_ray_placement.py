"""A replica Ray cannot place is reported within seconds, with what it asks for and what the cluster has, instead
of being waited on in silence; once Ray places it, the router starts serving."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

import pytest
import ray

from tests.serving import RouterThread, greedy


@ray.remote
class CpuHog:
    """Holds CPUs (its num_cpus) while it lives."""

    def ready(self) -> bool:
        return True


def test_an_unplaceable_replica_is_reported_then_serves_once_placed(
    start_router: Callable[..., RouterThread], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="router.ray_placement")
    total = ray.cluster_resources()["CPU"]
    hog = CpuHog.options(num_cpus=math.floor(ray.available_resources()["CPU"])).remote()  # Ray: whole CPUs above 1
    ray.get(hog.ready.remote(), timeout=60)
    started: list[RouterThread] = []
    starting = threading.Thread(target=lambda: started.append(start_router(num_replicas=1)), daemon=True)
    began = time.monotonic()
    starting.start()
    while not any("not running after" in r.getMessage() for r in caplog.records):
        assert time.monotonic() - began < 30, "no report of the replica Ray cannot place"
        time.sleep(0.1)
    [report] = [r.getMessage() for r in caplog.records if "not running after" in r.getMessage()]
    assert f"Ray cannot place it yet: it asks for CPU 1, and the cluster has CPU {total:g} in all, " in report
    assert not started  # the ports stay closed: no replica serves yet
    ray.kill(hog)
    starting.join(120)
    [router] = started
    with router.client() as client:
        assert len(client.complete([1, 2, 3], timeout=60, **greedy(2)).token_ids) == 2
