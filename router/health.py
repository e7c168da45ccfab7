"""Progress-based health of one replica: answering is not enough, a replica with work must be stepping."""

from __future__ import annotations

import asyncio

from ray.actor import ActorHandle
from ray.exceptions import RayError

from router.config import RouterConfig
from worker.messages import ReplicaHealth


async def check_health(actor: ActorHandle, cfg: RouterConfig) -> ReplicaHealth | str:
    """The replica's health, or why it is down (no answer within health_timeout_s, a failed engine, or work
    but no step for stall_timeout_s)."""
    try:
        health: ReplicaHealth = await asyncio.wait_for(actor.health.remote(), cfg.health_timeout_s)
    except asyncio.TimeoutError:
        return f"health check took over {cfg.health_timeout_s:g} s"
    except RayError as e:
        return f"health check failed: {e.__class__.__name__}"
    if health.state == "stopped" and health.draining:
        return health  # drained: its event stream ends after its last batch, and that takes it down
    if health.state != "running":
        return f"engine {health.state}: {health.error}"
    idle_s = health.seconds_since_last_step
    if health.has_work and idle_s is not None and idle_s > cfg.stall_timeout_s:
        return f"has work but made no step for {idle_s:.1f} s"
    return health
