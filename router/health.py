"""Health of one replica from its step thread's heartbeat: answering is not enough, that thread must beat."""

from __future__ import annotations

from router.config import RouterConfig
from worker.handle import ReplicaGone, ReplicaHandle
from worker.messages import ReplicaHealth


async def check_health(handle: ReplicaHandle, cfg: RouterConfig) -> ReplicaHealth | str:
    """The replica's health, or why it is down: no answer within health_timeout_s, a failed engine, or no
    heartbeat for stall_timeout_s (its step thread is stuck: a slow step still beats, after every layer)."""
    try:
        health = await handle.health(cfg.health_timeout_s)
    except ReplicaGone as gone:
        return gone.reason
    if health.state == "stopped" and health.draining:
        return health  # drained: its event stream ends after its last batch, and that takes it down
    if health.state != "running":
        return f"engine {health.state}: {health.error}"
    if health.seconds_since_heartbeat > cfg.stall_timeout_s:
        return f"its step thread has not beaten for {health.seconds_since_heartbeat:.1f} s{_doing(health)}"
    return health


def _doing(health: ReplicaHealth) -> str:
    """What the stuck thread was doing, for the log line."""
    if health.step_running_s is not None:
        return f" (inside a step of {health.step_num_tokens} tokens begun {health.step_running_s:.1f} s ago)"
    return " (between steps, with requests)" if health.has_work else " (idle)"
