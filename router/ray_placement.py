"""The router's own calls to Ray, apart from those to its replicas (worker/handle.py): joining or starting the
cluster, what it has, and waiting for Ray to place a new replica actor, saying why while it cannot."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable

import ray

from worker.handle import ReplicaHandle
from worker.resources import ReplicaResources

log = logging.getLogger(__name__)

FIRST_REPORT_AFTER_S = 3.0  # a placed replica answers within about a second, however long its model loads
REPORT_EVERY_S = 30.0


def start_ray(address: str | None, namespace: str) -> None:
    """Join the Ray cluster at `address`, or start a local one (address None) that operators can inspect: with
    its dashboard (`ray list actors` and the state API need it; on 127.0.0.1 only), and the command that reaches
    it in the log. Ray gives a local cluster token authentication and warns so at every start; the log line here
    says instead what a shell needs to use the token. Nothing when this process has joined one already."""
    if ray.is_initialized():
        return
    local = address is None
    if local:
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # Ray starts the dashboard when its packages (ray[default], the cluster extra) are installed.
    ray.init(address=address, namespace=namespace, dashboard_host="127.0.0.1", logging_level=logging.WARNING)
    if local:
        gcs = ray.get_runtime_context().gcs_address
        token = "RAY_AUTH_MODE=token " if os.environ.get("RAY_AUTH_MODE") == "token" else ""
        log.info("Ray: a local cluster at %s. Inspect it from a shell with `%sRAY_ADDRESS=%s ray status` (or `ray "
                 "list actors`)%s", gcs, token, gcs, "; its token is in ~/.ray/auth_token" if token else "")


def cluster_resources() -> dict[str, float]:
    """What the cluster has in all (CPU, GPU, memory, ...), placed or not."""
    return ray.cluster_resources()


async def wait_until_placed(handle: ReplicaHandle, resources: ReplicaResources, on_report: Callable[[], None]) -> None:
    """Return once the actor runs (it answers `health` while its engine loads); ReplicaGone if it failed to start.

    Until then, after FIRST_REPORT_AFTER_S and every REPORT_EVERY_S, log what it asks Ray for and what the
    cluster has (an actor Ray cannot place otherwise waits silently, for ever), and call `on_report`.
    """
    started = time.monotonic()
    answered = asyncio.ensure_future(handle.health())
    wait_s = FIRST_REPORT_AFTER_S
    try:
        while not answered.done():
            await asyncio.wait({answered}, timeout=wait_s)
            if not answered.done():
                log.warning("%s: not running after %.0f s: %s", handle.name, time.monotonic() - started,
                            _why_not_placed(resources))
                on_report()
                wait_s = REPORT_EVERY_S
    finally:
        answered.cancel()  # a no-op once answered; else the caller was cancelled, and so is the wait
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
