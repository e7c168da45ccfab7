"""The I4 and I5 checks themselves fail on what they are meant to catch: a leak in the router's process, a
leftover rank process of this cluster, a shared-memory segment whose replica is gone."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import ray

from tests.chaos.leaks import (
    ROUTER_BUDGET_MIB,
    TP_SEGMENT_PREFIX,
    MemoryBaseline,
    _raylet_pid,
    assert_memory_flat,
    assert_no_leaks,
    tp_segments,
)
from tests.serving import RouterThread


def test_memory_check_catches_a_router_leak(start_router: Callable[..., RouterThread]) -> None:
    router = start_router(num_replicas=1)
    baseline = MemoryBaseline.take(router)
    assert_memory_flat(router, baseline)
    leaked = bytearray(int(ROUTER_BUDGET_MIB + 16) << 20)  # zero-filled: resident at once
    with pytest.raises(AssertionError, match="router"):
        assert_memory_flat(router, baseline)
    del leaked


def test_leak_check_catches_a_rank_process_and_a_segment(ray_cluster: None, tmp_path: Path) -> None:
    before = tp_segments()
    env = {**os.environ, "RAY_RAYLET_PID": str(ray.get(_raylet_pid.remote(), timeout=60))}
    # Stands in for a rank left behind: a multiprocessing child of one of this cluster's workers.
    rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "multiprocessing.spawn"], env=env)
    try:
        with pytest.raises(AssertionError, match=f"rank processes \\[{rank.pid}\\]"):
            assert_no_leaks(before, timeout_s=1.0)
    finally:
        rank.kill()
        rank.wait()
    segment = Path("/dev/shm") / f"{TP_SEGMENT_PREFIX}{rank.pid}-leaked"  # its creator has exited
    segment.write_bytes(b"")
    try:
        with pytest.raises(AssertionError, match="segments"):
            assert_no_leaks(before, timeout_s=1.0)
    finally:
        segment.unlink()
    assert_no_leaks(before, timeout_s=5.0)
