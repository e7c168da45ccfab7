"""Part (b) of the router overhead benchmark (`serving_overhead.py`).

(b) Streaming capacity. Many concurrent long streams through a router whose replica is fast: a real
    `worker.Replica` and engine (scheduler, block manager, outbox), but the model is replaced by a
    stand-in that sleeps `step_ms` per step (a GPU decode step) and samples fixed tokens, so each
    step hands the router one token per running request, as a GPU replica does. The replica is
    registered under the name the router gives its replica 0, so the router re-attaches to it.
    Reported: tokens/s and chunks/s received, and the router process's CPU time read from
    /proc/<pid>/stat (all its threads: asyncio loop, gRPC, Ray's core worker) over the streaming
    window; tokens per router CPU-second is what one fully busy router core would stream.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import grpc
import ray
from overhead_router import (
    ROUTER_NAMESPACE,
    ROUTER_REPLICA_NAME,
    OverheadConfig,
    RouterProcess,
    machine_busy_ticks,
    router_max_len,
)
from ray.actor import ActorHandle
from serving_workloads import random_tokens
from stand_in_runner import FixedTokenRunner

from router.client import AsyncClient
from worker.launch import MAX_CONCURRENCY
from worker.replica import CONCURRENCY_GROUPS, Replica


class ModelFreeReplica(Replica):
    """`worker.Replica` with the real engine around a model that costs only `step_s` of sleep per step."""

    def __init__(self, name: str, model: str, engine_kwargs: dict[str, Any], step_s: float) -> None:
        super().__init__(name, model, engine_kwargs, max_queued_requests=engine_kwargs["max_num_seqs"] + 16)
        self._loop.call(lambda engine: self._replace_model(engine, step_s, engine_kwargs["max_num_seqs"]))

    @staticmethod
    def _replace_model(engine: Any, step_s: float, max_batch: int) -> None:
        # Tokens that decode to whole characters: a lone UTF-8 byte token (~15% of ids below 1000)
        # repeated forever would keep the router's detokenizer from ever advancing its window.
        whole = [i for i in range(1000, 2000) if "\ufffd" not in engine.tokenizer.decode([i])]
        engine.model_runner = FixedTokenRunner(whole, max_batch, step_s)


def start_model_free_replica(config: OverheadConfig) -> ActorHandle:
    """The stand-in replica, under the name `python -m router` will look for (so it re-attaches to it)."""
    actor_class = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(ModelFreeReplica)  # type: ignore[call-overload]
    kwargs = dict(device="cpu", max_model_len=router_max_len(config), max_num_seqs=config.num_streams,
                  num_kv_blocks=config.num_streams * (-(-router_max_len(config) // 16) + 1))
    actor = actor_class.options(name=ROUTER_REPLICA_NAME, namespace=ROUTER_NAMESPACE, lifetime="detached",
                                max_concurrency=MAX_CONCURRENCY).remote(
        ROUTER_REPLICA_NAME, str(config.model), kwargs, config.step_ms / 1e3)
    ray.get(actor.describe.remote())
    return actor


async def stream_many(address: str, config: OverheadConfig) -> dict[str, float]:
    """All streams at once; counts what arrives between the first send and the last stream's end."""
    rng = random.Random(config.seed)
    counts = {"tokens": 0, "chunks": 0, "failures": 0}

    async def one(client: AsyncClient) -> None:
        prompt = random_tokens(rng, 8, 1024)
        try:
            async for chunk in client.generate(prompt, max_tokens=config.stream_len, ignore_eos=True):
                counts["tokens"] += len(chunk.token_ids)
                counts["chunks"] += 1
        except grpc.aio.AioRpcError:
            counts["failures"] += 1

    async with AsyncClient(address) as client:
        await client.complete([1, 2, 3], max_tokens=4, ignore_eos=True)  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(one(client) for _ in range(config.num_streams)))
        return {**counts, "seconds": time.perf_counter() - started}


def measure_streaming(config: OverheadConfig) -> dict[str, Any]:
    start_model_free_replica(config)
    router = RouterProcess(config, config.out_dir / "router_streaming.log")
    try:
        cpu0, busy0, client0 = router.cpu_seconds(), machine_busy_ticks(), time.process_time()
        threads0 = router.cpu_seconds_by_thread()
        counts = asyncio.run(stream_many(router.address, config))
        cpu1, busy1, client1 = router.cpu_seconds(), machine_busy_ticks(), time.process_time()
        threads1 = router.cpu_seconds_by_thread()
    finally:
        router.stop()
    seconds, router_cpu_s = counts["seconds"], cpu1 - cpu0
    by_thread = {name: cpu - threads0.get(name, 0.0) for name, cpu in threads1.items()}
    return {
        **counts,
        "offered_tokens_per_s": config.num_streams * 1e3 / config.step_ms,
        "tokens_per_s": counts["tokens"] / seconds,
        "chunks_per_s": counts["chunks"] / seconds,
        "tokens_per_chunk": counts["tokens"] / max(1, counts["chunks"]),
        "router_cpu_s": router_cpu_s,
        "router_core_share": router_cpu_s / seconds,
        "tokens_per_router_cpu_s": counts["tokens"] / max(1e-9, router_cpu_s),
        "router_cpu_us_per_chunk": 1e6 * router_cpu_s / max(1, counts["chunks"]),
        "client_core_share": (client1 - client0) / seconds,
        "machine_busy_share": (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]),
        "router_cpu_s_by_thread": dict(sorted(by_thread.items(), key=lambda item: -item[1])),
    }


def print_streaming(s: dict[str, Any], config: OverheadConfig) -> None:
    print(f"(b) {config.num_streams} streams x {config.stream_len} tokens, replica step {config.step_ms:g} ms "
          f"(offered {s['offered_tokens_per_s']:,.0f} tok/s): received {s['tokens_per_s']:,.0f} tok/s in "
          f"{s['chunks_per_s']:,.0f} chunks/s ({s['tokens_per_chunk']:.2f} tok/chunk), {s['failures']} failures")
    print(f"    router CPU {s['router_core_share']:.0%} of a core ({s['router_cpu_us_per_chunk']:.0f} µs per chunk) "
          f"-> {s['tokens_per_router_cpu_s']:,.0f} tokens per router CPU-second; client {s['client_core_share']:.0%}"
          f" of a core; machine {s['machine_busy_share']:.0%} busy")
    threads = ", ".join(f"{name} {cpu:.1f}" for name, cpu in s["router_cpu_s_by_thread"].items() if cpu >= 0.05)
    print(f"    router CPU seconds by thread: {threads}")
