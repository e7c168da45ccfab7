"""Bringing replicas up: planning what each asks Ray for, re-attaching to a live replica of its name or starting
one, then attaching to it (Ray placed it, its engine loaded, its events subscribed, its health watched), and
replacing a dead one. `start` returns once every replica serves, except those that cannot yet."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from router.config import RouterConfig
from router.errors import StartupError
from router.event_pump import EventPump
from router.kv_view import KVView
from router.metrics import RouterMetrics
from router.ray_placement import cluster_resources, wait_until_placed
from router.replica_slot import ReplicaSlot, SlotState, serving
from router.replica_stats import watch_stats
from router.supervisor import Supervisor
from router.tasks import TaskSet
from worker.handle import ReplicaGone, ReplicaHandle
from worker.messages import EngineInfo
from worker.resources import ReplicaResources, plan_replicas

log = logging.getLogger(__name__)


class Lifecycle:
    """Starts and replaces the replicas of `slots`; `set_state(slot, state)` records a replica's new state."""

    def __init__(self, slots: list[ReplicaSlot], config: RouterConfig, metrics: RouterMetrics, tasks: TaskSet,
                 pump: EventPump, supervisor: Supervisor, set_state: Callable[[ReplicaSlot, SlotState], None]) -> None:
        self.slots, self.config, self.metrics, self.tasks = slots, config, metrics, tasks
        self.pump, self.supervisor, self.set_state = pump, supervisor, set_state
        self.info: EngineInfo | None = None
        self.resources: ReplicaResources | None = None  # what each replica asks Ray for, planned at start
        self._engine_kwargs: dict[str, Any] = {}  # the config's, with what the plan adds
        self._started: asyncio.Future[None] | None = None  # done once start() may return (see check_started)
        self._late: set[str] = set()  # replicas the start does not wait for: not placed by Ray, or failed
        self._start_errors: list[str] = []

    async def start(self) -> EngineInfo:
        """Plan the replicas' resources, bring each one up (re-attaching to live ones of the same name), and
        return once every replica serves, except those Ray has not placed within seconds or that failed to start
        (the log says why): those join when they can, and do not keep the ports closed while one serves.
        StartupError when none can start, ValueError when they cannot all be placed."""
        self.resources = self._plan()
        self._started = asyncio.get_running_loop().create_future()
        for slot in self.slots:
            self.tasks.spawn(self._bring_up(slot), f"{slot.name}-start")
        await self._started
        assert self.info is not None
        return self.info

    def _plan(self) -> ReplicaResources:
        cfg = self.config
        cluster = cluster_resources()
        device = str(cfg.engine_kwargs.get("device", "auto"))
        on_gpu = device.startswith("cuda") or (device == "auto" and cluster.get("GPU", 0) > 0)
        resources = plan_replicas(cfg.num_replicas, cfg.tensor_parallel_size, on_gpu, cluster,
                                  cfg.engine_kwargs.get("gpu_memory_utilization"))
        batch_invariant = on_gpu if cfg.batch_invariant is None else cfg.batch_invariant
        self._engine_kwargs = {**cfg.engine_kwargs, "batch_invariant": batch_invariant}
        log.info("placement: %s; each replica asks Ray for %s; batch-invariant numerics %s", resources.summary,
                 ", ".join(f"{key} {amount:g}" for key, amount in resources.ray_resources.items()),
                 "on" if batch_invariant else "off")
        return resources

    async def _bring_up(self, slot: ReplicaSlot) -> None:
        """Re-attach to the live replica of that name, or start one; when that fails, keep restarting it."""
        try:
            await self._attach_or_start(slot)
        except (ReplicaGone, RuntimeError, ValueError) as e:
            self._start_errors.append(f"{slot.name}: {e}")
            assert self._started is not None
            if len(self._start_errors) == len(self.slots) and not self._started.done():
                self._started.set_exception(StartupError("no replica could start; " + "; ".join(self._start_errors)))
                return
            self._mark_late(slot)
            log.warning("%s: failed to start (%s); retrying", slot.name, e)
            await self.supervisor.restart(slot)

    def check_started(self) -> None:
        """Let start() return once one replica serves and each other one serves or is late."""
        if self._started is None or self._started.done() or not serving(self.slots):
            return
        if all(slot.state == "serving" or slot.name in self._late for slot in self.slots):
            self._started.set_result(None)

    def _mark_late(self, slot: ReplicaSlot) -> None:
        """start() goes on without this replica (Ray has not placed it, or it failed): it joins when it can."""
        self._late.add(slot.name)
        self.check_started()

    async def _attach_or_start(self, slot: ReplicaSlot) -> None:
        leftover = ReplicaHandle.find(slot.name, self.config.namespace)
        if leftover is None:
            await self._start(slot)
            return
        try:
            num_orphans = await leftover.abort_all()  # they belonged to the router before us
            log.info("%s: re-attaching to the running replica (%d orphaned requests aborted)", slot.name, num_orphans)
            await self._attach(slot, leftover)
        except ReplicaGone:
            log.warning("%s: the running replica did not answer; starting a new one", slot.name)
            await leftover.kill()
            await self._start(slot)

    async def _start(self, slot: ReplicaSlot) -> None:
        """Start a new replica actor and attach to it."""
        cfg = self.config
        assert self.resources is not None
        log.info("%s: starting a replica (model %s)", slot.name, cfg.model or "embedded tiny random Qwen3")
        handle = ReplicaHandle.start(
            slot.name, cfg.model, dict(self._engine_kwargs), resources=self.resources,
            max_queued_requests=cfg.max_queued_per_replica, drain_timeout_s=cfg.drain_timeout_s,
            orphan_timeout_s=cfg.replica_orphan_timeout_s, namespace=cfg.namespace,
        )
        try:
            await self._attach(slot, handle)
        except asyncio.CancelledError:  # the pool closed while it was starting: it must not live on
            await handle.kill()
            raise

    async def _attach(self, slot: ReplicaSlot, handle: ReplicaHandle) -> None:
        """Wait for Ray to place it and for its engine, subscribe to its events (the pump takes the first
        snapshot), start health checks and stats."""
        assert self.resources is not None
        await wait_until_placed(handle, self.resources, on_report=lambda: self._mark_late(slot))
        info = await handle.describe()
        self.info = self.info or info
        self.metrics.describe_replica(slot.name, info)
        slot.handle, slot.kv, slot.next_seq = handle, KVView(), None
        subscribed = asyncio.get_running_loop().create_future()
        slot.tasks = [
            self.tasks.spawn(self.pump.run(slot, handle, subscribed), f"{slot.name}-events"),
            self.tasks.spawn(self.supervisor.watch_health(slot, handle), f"{slot.name}-health"),
            self.tasks.spawn(watch_stats(slot, handle, self.metrics, self.config), f"{slot.name}-stats"),
        ]
        await subscribed
        self.set_state(slot, "serving")
        log.info("%s: serving (%d KV blocks, %d cached)", slot.name, info.num_kv_blocks, len(slot.kv.hashes))

    async def replace(self, slot: ReplicaSlot) -> None:
        """A new actor in place of the replica of that name (killed first, and its name freed), attached."""
        old = ReplicaHandle.find(slot.name, self.config.namespace)
        if old is not None:
            await old.kill()
        slot.handle = None
        await self._start(slot)
