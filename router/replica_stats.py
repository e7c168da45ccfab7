"""Each replica's load and cache counters, for GetClusterStatus and the metrics: asked for every health interval."""

from __future__ import annotations

import asyncio
import logging

from router.config import RouterConfig
from router.metrics import RouterMetrics
from router.replica_slot import ReplicaSlot
from worker.handle import ReplicaGone, ReplicaHandle

log = logging.getLogger(__name__)


async def watch_stats(slot: ReplicaSlot, handle: ReplicaHandle, metrics: RouterMetrics, config: RouterConfig) -> None:
    """Refresh the replica's stats until it is replaced or down. A stats call waits for a step (a health check must
    not), so this runs beside the health checks, never in their way."""
    while slot.handle is handle and slot.state != "down":
        await asyncio.sleep(config.health_interval_s)
        try:
            slot.stats = await handle.stats()
        except ReplicaGone as gone:
            log.info("%s: no stats (%s); its health check tells whether it is down", slot.name, gone.reason)
            continue
        metrics.publish_stats(slot.stats)
