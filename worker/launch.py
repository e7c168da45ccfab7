"""Start a replica as a detached, named Ray actor, or re-attach to one that is already running."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import ray
from ray.actor import ActorHandle

from worker.replica import CONCURRENCY_GROUPS, DRAIN_TIMEOUT_S, Replica
from worker.resources import ReplicaResources

NAMESPACE = "nanoserve"
# Threads for the router's submit / abort / stats / snapshot calls; each waits for at most one step.
MAX_CONCURRENCY = 16
# Defined once, so that restarting replicas does not export the class to the cluster again each time.
# Ray's stubs omit `concurrency_groups`, a documented ray.remote argument that .options() refuses.
_ReplicaActor = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(Replica)  # type: ignore[call-overload]
ONE_CPU = ReplicaResources(1.0, 0.0, None, "one CPU")


def start_replica(
    name: str,
    model: str | Path | None,
    engine_kwargs: dict[str, Any] | None = None,
    *,
    resources: ReplicaResources = ONE_CPU,
    max_queued_requests: int = 256,
    drain_timeout_s: float = DRAIN_TIMEOUT_S,
    namespace: str = NAMESPACE,
) -> ActorHandle:
    """Create the replica actor with the Ray resources of `resources` (see worker/resources.py). It outlives
    its creator, so a restarted router re-attaches with `get_replica`.

    Returns at once, before Ray has placed it; the engine then loads in the actor (its `health` answers
    meanwhile) and its errors surface on the first engine call, such as `describe`. `model` None serves
    the embedded tiny random Qwen3.
    """
    engine_kwargs = dict(engine_kwargs or {})
    if resources.gpu_memory_utilization is not None:
        engine_kwargs["gpu_memory_utilization"] = resources.gpu_memory_utilization
    actor = _ReplicaActor.options(
        name=name,
        namespace=namespace,
        lifetime="detached",
        num_cpus=resources.num_cpus,
        num_gpus=resources.num_gpus,
        max_concurrency=MAX_CONCURRENCY,
    )
    # Ray's stubs type ActorClass.remote() as `ActorHandle | type`; it returns a handle.
    return cast(ActorHandle, actor.remote(name, None if model is None else str(model), engine_kwargs,
                                          max_queued_requests, drain_timeout_s=drain_timeout_s))


def get_replica(name: str, namespace: str = NAMESPACE) -> ActorHandle:
    """The running replica of that name; ValueError if there is none."""
    return ray.get_actor(name, namespace=namespace)
