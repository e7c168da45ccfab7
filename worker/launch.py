"""Start a replica as a detached, named Ray actor, or re-attach to one that is already running."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import ray
from ray.actor import ActorHandle

from worker.replica import CONCURRENCY_GROUPS, DRAIN_TIMEOUT_S, Replica

NAMESPACE = "nanoserve"
# Threads for the router's submit / abort / stats / snapshot calls; each waits for at most one step.
MAX_CONCURRENCY = 16
# Defined once, so that restarting replicas does not export the class to the cluster again each time.
# Ray's stubs omit `concurrency_groups`, a documented ray.remote argument that .options() refuses.
_ReplicaActor = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(Replica)  # type: ignore[call-overload]


def start_replica(
    name: str,
    model: str | Path | None,
    engine_kwargs: dict[str, Any] | None = None,
    *,
    on_gpu: bool,
    tensor_parallel_size: int = 1,
    max_queued_requests: int = 256,
    drain_timeout_s: float = DRAIN_TIMEOUT_S,
    namespace: str = NAMESPACE,
) -> ActorHandle:
    """Create the replica actor. It outlives its creator, so a restarted router re-attaches with `get_replica`.

    Returns at once; the engine loads in the actor, and its errors surface on the first call. `model`
    None serves the embedded tiny random Qwen3.
    """
    engine_kwargs = dict(engine_kwargs or {})
    if engine_kwargs.setdefault("tensor_parallel_size", tensor_parallel_size) != tensor_parallel_size:
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} disagrees with engine_kwargs "
            f"tensor_parallel_size={engine_kwargs['tensor_parallel_size']}"
        )
    actor = _ReplicaActor.options(
        name=name,
        namespace=namespace,
        lifetime="detached",
        num_gpus=tensor_parallel_size if on_gpu else 0,
        max_concurrency=MAX_CONCURRENCY,
    )
    # Ray's stubs type ActorClass.remote() as `ActorHandle | type`; it returns a handle.
    return cast(ActorHandle, actor.remote(name, None if model is None else str(model), engine_kwargs,
                                          max_queued_requests, drain_timeout_s=drain_timeout_s))


def get_replica(name: str, namespace: str = NAMESPACE) -> ActorHandle:
    """The running replica of that name; ValueError if there is none."""
    return ray.get_actor(name, namespace=namespace)
