"""Failure handling: a replica's health from its heartbeat, taking a failed one out of service, moving its
requests through the fleet-wide retry budget (stopping a query of death), restarting it with backoff."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import grpc

from router.config import RouterConfig
from router.errors import PoolError
from router.health import check_health
from router.inflight import InFlightRequest
from router.metrics import RouterMetrics
from router.replica_slot import ReplicaSlot, SlotState, serving
from router.request_state import RequestState
from router.retry_budget import MAX_REPLICA_DEATHS, RetryBudget
from router.tasks import TaskSet
from worker.handle import ReplicaGone, ReplicaHandle

log = logging.getLogger(__name__)


class Places(Protocol):  # router/placement.py's Placement
    def place(self, request: InFlightRequest, tried: set[str]) -> tuple[ReplicaSlot, int]: ...

    async def submit_placed(self, request: InFlightRequest, slot: ReplicaSlot, num_cached_blocks: int) -> bool: ...


class Supervisor:
    """Watches the replicas of `slots` and handles their failures: `set_state(slot, state)` records a replica's
    new state, `replace(slot)` brings up a new replica in a dead one's place."""

    def __init__(self, slots: list[ReplicaSlot], config: RouterConfig, metrics: RouterMetrics, tasks: TaskSet,
                 placement: Places, set_state: Callable[[ReplicaSlot, SlotState], None],
                 replace: Callable[[ReplicaSlot], Awaitable[None]]) -> None:
        self.slots, self.config, self.metrics, self.tasks = slots, config, metrics, tasks
        self.placement, self.set_state, self.replace = placement, set_state, replace
        self.budget = RetryBudget()

    async def watch_health(self, slot: ReplicaSlot, handle: ReplicaHandle) -> None:
        """A replica that does not answer, failed, or whose step thread stopped beating is down."""
        while slot.handle is handle and slot.state != "down":
            await asyncio.sleep(self.config.health_interval_s)
            health = await check_health(handle, self.config)
            if isinstance(health, str):
                self.mark_down(slot, health)
                return
            if health.draining and slot.state == "serving":
                log.info("%s: draining: new requests go elsewhere; its %d in flight finish there", slot.name,
                         len(slot.inflight))
                self.set_state(slot, "draining")

    def mark_down(self, slot: ReplicaSlot, reason: str, died: bool = True) -> None:
        """Take the replica out of service, move its requests (through the retry budget) and restart it.
        `died`: it failed, so the requests it was running count it as a death (not when it drained)."""
        if slot.state == "down" or self.tasks.closed:
            return
        log.warning("%s: down (%s); failing over %d requests", slot.name, reason, len(slot.inflight))
        restarting = slot.state == "starting"  # its restart loop (or first start) tries again by itself
        self.set_state(slot, "down")
        slot.cancel_tasks()
        requests = list(slot.inflight.values())
        for request in requests:
            slot.remove(request.engine_request_id)
            if died and request.state is not RequestState.PLACING:  # queued there, not on its way
                request.replica_deaths.append(slot.name)
        self.metrics.inflight.labels(slot.name).set(0)
        self.fail_over(requests, exclude=frozenset({slot.name}))
        if not restarting:
            self.tasks.spawn(self.restart(slot), f"{slot.name}-restart")

    def fail_over(self, requests: list[InFlightRequest], exclude: frozenset[str] = frozenset()) -> None:
        """Move the requests elsewhere (never to a replica in `exclude`), as the retry budget lets them; stop those
        that look like what kills replicas, and those moved too often."""
        limit = self.config.max_failovers_per_request
        for request in requests:
            if request.state in (RequestState.DONE, RequestState.PLACING):  # a submit in progress places it again
                continue
            if len(request.replica_deaths) >= MAX_REPLICA_DEATHS:
                self.metrics.queries_of_death.inc()
                self._stop(request, grpc.StatusCode.ABORTED, f"replicas {' and '.join(request.replica_deaths)} died "
                           "while running this request, with no token in between: it may be what kills them, so it "
                           "was stopped instead of moved again")
                continue
            request.num_failovers += 1
            if request.num_failovers > limit:
                self._stop(request, grpc.StatusCode.UNAVAILABLE, f"the replicas serving this request failed "
                           f"{request.num_failovers} times (max_failovers_per_request={limit})")
                continue
            self.metrics.failovers.inc()
            self.budget.wait(request, exclude)
        self.admit_failovers()
        if self.budget:
            log.info("retry budget: %d failovers wait for a replica with none in progress", len(self.budget))

    def _stop(self, request: InFlightRequest, code: grpc.StatusCode, message: str) -> None:
        """End a request that is not moved again; one warning says why."""
        log.warning("request %s stopped: %s (%d tokens sent)", request.request_id, message,
                    request.num_output_tokens)
        request.fail(code, message)

    def admit_failovers(self) -> None:
        """Start the failovers the retry budget lets start now; with no replica serving, they fail."""
        if not self.budget:
            return
        for request, exclude, busy in self.budget.admit(serving(self.slots)):
            try:
                slot, num_cached_blocks = self.placement.place(request, set(exclude | busy))
            except PoolError as e:
                request.fail(e.code, f"{e.message} (after its replica failed)")
                continue
            self.tasks.spawn(self._fail_over_to(request, slot, num_cached_blocks, exclude),
                             f"failover-{request.request_id}")
        self.metrics.failovers_waiting.set(len(self.budget))

    async def _fail_over_to(
        self, request: InFlightRequest, slot: ReplicaSlot, num_cached_blocks: int, exclude: frozenset[str]
    ) -> None:
        """Submit a moved request where the budget placed it; refused there, it waits in the budget again."""
        try:
            if not await self.placement.submit_placed(request, slot, num_cached_blocks):
                self.budget.wait(request, exclude | {slot.name})
                self.admit_failovers()
        except PoolError as e:
            request.fail(e.code, f"{e.message} (after its replica failed)")

    async def restart(self, slot: ReplicaSlot) -> None:
        """Replace the dead replica with a new actor of the same name; retry with backoff until it serves."""
        delay = 1.0
        while not self.tasks.closed:
            self.set_state(slot, "starting")
            try:
                await self.replace(slot)
                slot.num_restarts += 1
                self.metrics.replica_restarts.labels(slot.name).inc()
                return
            except (ReplicaGone, RuntimeError, ValueError) as e:
                log.warning("%s: restart failed (%s); retrying in %.0f s", slot.name, e, delay)
                self.set_state(slot, "down")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
