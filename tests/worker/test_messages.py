"""The Ray-boundary messages are plain data, and importing the worker package does not load torch."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import msgpack

from engine.outputs import EngineStats
from worker.messages import KVSnapshot, ReplicaStats, RequestDelta, StepEvents

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_messages_round_trip_through_msgpack() -> None:
    batch = StepEvents(
        replica="r0", epoch="e1", seq=3, num_steps=2,
        outputs=[RequestDelta("a", [1, 2], True, "stop", 5, 0, [{"token_id": 1, "logprob": -0.1, "top_logprobs": {}}])],
        kv_stored=[2**64 - 1], kv_evicted=[5],
    )
    stats = ReplicaStats("r0", "e1", 4, 256, EngineStats(1, 0, 20, 0, 3, 32, 16, 40, 0))
    for message in (batch, KVSnapshot("r0", "e1", 3, [1, 2]), stats):
        plain = dataclasses.asdict(message)
        assert msgpack.unpackb(msgpack.packb(plain), strict_map_key=False) == plain


def test_the_router_can_import_the_worker_package_without_torch() -> None:
    code = (
        "import sys, worker, worker.messages; "
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules); "
        "assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
