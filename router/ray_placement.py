"""Waiting for Ray to place a new replica actor, and saying why while it cannot."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import ray
from ray.actor import ActorHandle

from worker.resources import ReplicaResources

log = logging.getLogger(__name__)

FIRST_REPORT_AFTER_S = 3.0  # a placed replica answers within about a second, however long its model loads
REPORT_EVERY_S = 30.0


async def wait_until_placed(
    actor: ActorHandle, name: str, resources: ReplicaResources, on_report: Callable[[], None]
) -> None:
    """Return once the actor runs (it answers `health` while its engine loads); raise its creation error.

    Until then, after FIRST_REPORT_AFTER_S and every REPORT_EVERY_S, log what it asks Ray for and what the
    cluster has (an actor Ray cannot place otherwise waits silently, for ever), and call `on_report`.
    """
    started = time.monotonic()
    answered = asyncio.wrap_future(actor.health.remote().future())
    wait_s = FIRST_REPORT_AFTER_S
    while not answered.done():
        await asyncio.wait({answered}, timeout=wait_s)
        if not answered.done():
            log.warning("%s: not running after %.0f s: %s", name, time.monotonic() - started,
                        _why_not_placed(resources))
            on_report()
            wait_s = REPORT_EVERY_S
    answered.result()


def _why_not_placed(resources: ReplicaResources) -> str:
    ask = resources.ray_resources
    total, free = ray.cluster_resources(), ray.available_resources()
    shown = {key: (total.get(key, 0.0), free.get(key, 0.0)) for key in ask}
    have = ", ".join(f"{key} {t:g} in all, {f:g} free" for key, (t, f) in shown.items())
    if all(free.get(key, 0.0) >= amount for key, amount in ask.items()):
        return f"Ray has room for it ({have}) but has not started it yet"
    return (f"Ray cannot place it yet: it asks for {_format(ask)}, and the cluster has {have} (other actors hold "
            "the rest; `ray status` lists them)")


def _format(resources: dict[str, float]) -> str:
    return ", ".join(f"{key} {amount:g}" for key, amount in resources.items())
