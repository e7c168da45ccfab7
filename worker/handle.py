"""`ReplicaHandle`: one replica actor as its callers see it, and the only code that calls Ray for a replica.

Replicas are detached, named Ray actors: they outlive the router that started them, and a new router finds
them again by name. Every failure to reach one, a Ray error or a call past its timeout, is one `ReplicaGone`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayError, RayTaskError

from worker.messages import EngineInfo, KVSnapshot, ReplicaHealth, ReplicaStats, RequestSpec, StepEvents, SubmitError
from worker.replica import CONCURRENCY_GROUPS, DRAIN_TIMEOUT_S, ORPHAN_TIMEOUT_S, Replica
from worker.resources import ReplicaResources

T = TypeVar("T")
NAMESPACE = "nanoserve"
# Threads for the router's submit / abort / stats / snapshot calls; each waits for at most one step.
MAX_CONCURRENCY = 16
# Defined once, so that restarting replicas does not export the class to the cluster again each time.
# Ray's stubs omit `concurrency_groups`, a documented ray.remote argument that .options() refuses.
_ReplicaActor = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(Replica)  # type: ignore[call-overload]
ONE_CPU = ReplicaResources(1.0, 0.0, None, "one CPU")
KILL_TIMEOUT_S = 30.0


class ReplicaGone(Exception):
    """The replica could not be reached: its actor died or failed, or a call to it ran past its timeout."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason  # one line, for the log: which call, and what happened to it


class ReplicaHandle:
    """A replica actor by name. Calls return its `worker.messages` types or raise `ReplicaGone`."""

    def __init__(self, name: str, actor: ActorHandle, namespace: str = NAMESPACE) -> None:
        self.name, self.namespace, self._actor = name, namespace, actor

    @classmethod
    def start(cls, name: str, model: str | Path | None, engine_kwargs: dict[str, Any] | None = None, *,
              resources: ReplicaResources = ONE_CPU, max_queued_requests: int = 256,
              drain_timeout_s: float = DRAIN_TIMEOUT_S, orphan_timeout_s: float = ORPHAN_TIMEOUT_S,
              namespace: str = NAMESPACE) -> ReplicaHandle:
        """Create the replica actor with the Ray resources of `resources` (see worker/resources.py).

        Returns at once, before Ray has placed it; the engine then loads in the actor (its `health` answers
        meanwhile) and its errors surface on the first engine call, such as `describe`. `model` None serves
        the embedded tiny random Qwen3.
        """
        engine_kwargs = dict(engine_kwargs or {})
        if resources.gpu_memory_utilization is not None:
            engine_kwargs["gpu_memory_utilization"] = resources.gpu_memory_utilization
        options = _ReplicaActor.options(name=name, namespace=namespace, lifetime="detached",
                                        num_cpus=resources.num_cpus, num_gpus=resources.num_gpus,
                                        max_concurrency=MAX_CONCURRENCY)
        # Ray's stubs type ActorClass.remote() as `ActorHandle | type`; it returns a handle.
        actor = cast(ActorHandle, options.remote(name, None if model is None else str(model), engine_kwargs,
                                                 max_queued_requests, orphan_timeout_s=orphan_timeout_s,
                                                 drain_timeout_s=drain_timeout_s))
        return cls(name, actor, namespace)

    @classmethod
    def find(cls, name: str, namespace: str = NAMESPACE) -> ReplicaHandle | None:
        """The running replica of that name (a router before this one may have started it), or None."""
        try:
            return cls(name, ray.get_actor(name, namespace=namespace), namespace)
        except ValueError:
            return None

    async def describe(self, timeout_s: float | None = None) -> EngineInfo:
        """The engine's model and limits; waits for the engine to load, and raises (as ReplicaGone) why it did not."""
        return await self._call("describe", self._actor.describe.remote(), timeout_s)

    async def submit(self, specs: list[RequestSpec], timeout_s: float | None = None) -> list[SubmitError | None]:
        """Queue each request; per spec, None if queued or why not."""
        return await self._call("submit", self._actor.submit.remote(specs), timeout_s)

    def abort(self, request_ids: list[str]) -> None:
        """Stop these requests and free their KV blocks, without waiting: a replica that is gone frees them anyway."""
        self._actor.abort.remote(request_ids)

    async def abort_all(self, timeout_s: float | None = None) -> int:
        """Abort every request it holds (they belonged to a router before this one); how many there were."""
        return await self._call("abort_all", self._actor.abort_all.remote(), timeout_s)

    async def events(self) -> AsyncIterator[StepEvents]:
        """Its step batches, from a new subscription that replaces the previous one (see `Replica.events`). Ends
        when the replica stops streaming (drained or shut down); ReplicaGone when the stream breaks."""
        try:
            async for ref in self._actor.events.remote():
                yield await ref
        except RayError as e:
            raise ReplicaGone(f"event stream broke: {why(e)}") from e

    async def kv_snapshot(self, timeout_s: float | None = None) -> KVSnapshot:
        return await self._call("kv_snapshot", self._actor.kv_snapshot.remote(), timeout_s)

    async def stats(self, timeout_s: float | None = None) -> ReplicaStats:
        return await self._call("stats", self._actor.stats.remote(), timeout_s)

    async def health(self, timeout_s: float | None = None) -> ReplicaHealth:
        """Its step thread's heartbeat; answers as soon as Ray has placed the actor, and while a step hangs."""
        return await self._call("health check", self._actor.health.remote(), timeout_s)

    async def run(self, fn: Callable[[Replica], T], timeout_s: float | None = None) -> T:
        """`fn(replica)` run inside the actor (Ray's `__ray_call__`): how tests inject faults and read a replica's
        process, with no hook in the replica's code."""
        return await self._call("run", self._actor.__ray_call__.remote(fn), timeout_s)

    async def kill(self, wait: bool = True, timeout_s: float = KILL_TIMEOUT_S) -> None:
        """Kill the actor (no restart). With `wait`, return once its name is free for a replacement (whatever
        holds the name meanwhile is killed too); ReplicaGone if it is still held after timeout_s."""
        with contextlib.suppress(RayError):  # already dead
            ray.kill(self._actor, no_restart=True)
        deadline = time.monotonic() + timeout_s
        while wait:
            holder = ReplicaHandle.find(self.name, self.namespace)
            if holder is None:
                return
            if time.monotonic() > deadline:
                raise ReplicaGone(f"{self.name}: the old actor still holds its name after {timeout_s:.0f} s")
            with contextlib.suppress(RayError):
                ray.kill(holder._actor, no_restart=True)
            await asyncio.sleep(0.2)

    async def _call(self, call: str, ref: Any, timeout_s: float | None) -> Any:
        try:
            return await (ref if timeout_s is None else asyncio.wait_for(ref, timeout_s))
        except asyncio.TimeoutError:
            raise ReplicaGone(f"{call} took over {timeout_s:g} s") from None
        except RayError as e:
            raise ReplicaGone(f"{call} failed: {why(e)}") from e


def why(error: RayError) -> str:
    """A Ray error in one line: the replica's own exception rather than Ray's wrapper with its remote traceback."""
    cause = error.cause if isinstance(error, RayTaskError) else None
    shown = cause if isinstance(cause, Exception) else error
    lines = str(shown).splitlines()
    return f"{shown.__class__.__name__}: {lines[0]}" if lines else shown.__class__.__name__
