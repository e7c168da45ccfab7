"""nanoserve's worker layer: `Replica`, a Ray actor that runs one LLMEngine and streams its steps.

The router starts replicas with `start_replica`, re-attaches to running ones with `get_replica`,
and talks to them only through the typed messages of `worker.messages`. Importing this package
does not load torch: the engine is built inside the actor.
"""

from worker.launch import get_replica, start_replica
from worker.messages import (
    EngineInfo,
    KVSnapshot,
    ReplicaHealth,
    ReplicaStats,
    RequestDelta,
    RequestSpec,
    StepEvents,
    SubmitError,
)
from worker.replica import Replica

__all__ = [
    "EngineInfo",
    "KVSnapshot",
    "Replica",
    "ReplicaHealth",
    "ReplicaStats",
    "RequestDelta",
    "RequestSpec",
    "StepEvents",
    "SubmitError",
    "get_replica",
    "start_replica",
]
