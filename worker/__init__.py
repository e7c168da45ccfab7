"""nanoserve's worker layer: `Replica`, a Ray actor that runs one LLMEngine and streams its steps.

The router starts replicas, re-attaches to running ones and calls them only through `ReplicaHandle` (a Ray
error or a timeout is one `ReplicaGone`), with the typed messages of `worker.messages`. Importing this
package does not load torch: the engine is built inside the actor.
"""

from worker.handle import ReplicaGone, ReplicaHandle
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
    "ReplicaGone",
    "ReplicaHandle",
    "ReplicaHealth",
    "ReplicaStats",
    "RequestDelta",
    "RequestSpec",
    "StepEvents",
    "SubmitError",
]
