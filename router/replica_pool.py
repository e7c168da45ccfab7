"""The replicas as the router sees them: a facade over starting and replacing them (router/lifecycle.py),
placing requests (router/placement.py), applying their event streams (router/event_pump.py) and handling their
failures (router/supervisor.py). It owns every background task of theirs and cancels them on close.

All of it runs on the router's one asyncio loop, so no locks: state changes between awaits only.
A replica is `serving` from its first snapshot on, `down` from the first sign of failure (its event
stream breaks, a health call fails or times out, or its step thread's heartbeat stops), `starting`
while it is replaced. A replica told to drain (SIGTERM, or its `drain` call) is `draining`: it gets no
new request, its requests finish there, and when it exits it is down (what is left moves) and replaced.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from router.config import RouterConfig
from router.errors import PoolError, StartupError
from router.event_pump import EventPump
from router.inflight import InFlightRequest
from router.lifecycle import Lifecycle
from router.metrics import RouterMetrics
from router.placement import Placement
from router.policies import RoutingPolicy
from router.replica_slot import ReplicaSlot, SlotState, serving
from router.request_state import RequestState
from router.retry_budget import RetryBudget
from router.supervisor import Supervisor
from router.tasks import TaskSet
from worker.messages import EngineInfo
from worker.resources import ReplicaResources

__all__ = ["PoolError", "ReplicaPool", "StartupError"]  # the first and last are router/errors.py's

log = logging.getLogger(__name__)


class ReplicaPool:
    """The router's replicas: placing requests, applying their event streams, health, failover, restarts."""

    def __init__(self, config: RouterConfig, policy: RoutingPolicy, metrics: RouterMetrics) -> None:
        self.config, self.metrics = config, metrics
        self.slots = [ReplicaSlot(name) for name in config.replica_names]
        for slot in self.slots:
            metrics.add_replica(slot.name)
        self.on_serving_changed: Callable[[bool], None] = lambda serving: None
        self.tasks = TaskSet()  # every background task: bring-ups, event pumps, health checks, restarts, failovers
        self.placement = Placement(self.slots, policy, config, metrics,
                                   on_gone=lambda slot, reason: self.supervisor.mark_down(slot, reason))
        self.supervisor = Supervisor(self.slots, config, metrics, self.tasks, self.placement, self.set_state,
                                     replace=lambda slot: self.lifecycle.replace(slot))
        self.pump = EventPump(config, metrics, on_down=self.supervisor.mark_down, on_lost=self.supervisor.fail_over,
                              on_progress=self.supervisor.admit_failovers)
        self.lifecycle = Lifecycle(self.slots, config, metrics, self.tasks, self.pump, self.supervisor, self.set_state)

    @property
    def policy(self) -> RoutingPolicy:
        return self.placement.policy

    @property
    def budget(self) -> RetryBudget:
        return self.supervisor.budget

    @property
    def info(self) -> EngineInfo | None:
        return self.lifecycle.info

    @property
    def resources(self) -> ReplicaResources | None:
        return self.lifecycle.resources

    async def start(self) -> EngineInfo:
        """Bring the replicas up (see Lifecycle.start); on failure, what was started is stopped again."""
        try:
            return await self.lifecycle.start()
        except BaseException:
            await self.close(kill_replicas=True)
            raise

    async def close(self, kill_replicas: bool) -> None:
        """Cancel every background task (a replica being replaced would otherwise come up after we left); with
        `kill_replicas`, kill the replicas and wait until their names are free."""
        await self.tasks.close()
        handles = [slot.handle for slot in self.slots if kill_replicas and slot.handle is not None]
        for handle, result in zip(handles, await asyncio.gather(*(h.kill() for h in handles), return_exceptions=True)):
            if isinstance(result, Exception):
                log.warning("%s: not killed: %s", handle.name, result)

    def serving(self) -> list[ReplicaSlot]:
        return serving(self.slots)

    async def submit(self, request: InFlightRequest, exclude: frozenset[str] = frozenset()) -> None:
        """Place the request on a replica (trying others when one is full or fails); PoolError if none takes it."""
        await self.placement.submit(request, exclude)

    def abort(self, request: InFlightRequest) -> None:
        """Stop the request for good (client gone or deadline passed): its blocks are freed within a step."""
        if not request.done:
            request.set_state(RequestState.DONE)
        self.placement.cancel(request)
        self.supervisor.admit_failovers()

    async def resume(self, request: InFlightRequest) -> None:
        """Place a paused request again (prompt + its output so far); its stream fails if no replica takes it."""
        self.metrics.slow_clients.labels("resumed").inc()
        try:
            await self.submit(request)
        except PoolError as e:
            request.fail(e.code, f"{e.message} (resuming the request after its client caught up)")

    def set_state(self, slot: ReplicaSlot, state: SlotState) -> None:
        """Record a replica's new state, and what follows from it: the replica_up metric, the router's own health
        when the first replica serves or the last one stops, the start's wait, the waiting failovers."""
        was_serving = bool(self.serving())
        slot.state = state
        self.metrics.replica_up.labels(slot.name).set(1 if state == "serving" else 0)
        if bool(self.serving()) != was_serving:
            self.on_serving_changed(not was_serving)
        if state == "serving":
            self.lifecycle.check_started()
            self.supervisor.admit_failovers()  # waiting failovers may go there
