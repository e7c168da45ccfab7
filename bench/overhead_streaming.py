"""Part (b) of the router overhead benchmark (`serving_overhead.py`).

(b) Streaming capacity. Many concurrent long streams through a router whose replica is the stand-in
    (`overhead_router.py`), registered under the name the router gives its replica 0, so the router
    re-attaches to it.
    The router process (all its threads: asyncio loop, gRPC's, Ray's core worker) is pinned to one
    core, and the replica offers more than that core can stream (by default 256 streams x a token
    every 2 ms = 128k tok/s), so tokens/s received is the router's ceiling on one core; a router that
    lags sends what waits for a client as one chunk, so chunks then carry several tokens. Reported:
    tokens/s and chunks/s received, the router's CPU time from /proc/<pid>/stat over the streaming
    window (its share of the core says whether the router or the replica was the limit), and
    tokens per router CPU-second.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from typing import Any

import grpc
from overhead_router import (
    ROUTER_REPLICA_NAME,
    OverheadConfig,
    RouterProcess,
    machine_busy_ticks,
    start_model_free_replica,
)
from serving_workloads import random_tokens

from router.client import AsyncClient


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


def router_core() -> int:
    """The core the router runs on: the last one this process may use (Ray's and the client's threads start
    on the others; on a 2-core machine they share them)."""
    return max(os.sched_getaffinity(0))


def measure_streaming(config: OverheadConfig) -> dict[str, Any]:
    start_model_free_replica(config, ROUTER_REPLICA_NAME)
    core = router_core()
    router = RouterProcess(config, config.out_dir / "router_streaming.log", cpus={core})
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
        "router_core": core,
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
    print(f"    router pinned to core {s['router_core']}: CPU {s['router_core_share']:.0%} of it "
          f"({s['router_cpu_us_per_chunk']:.0f} µs per chunk) -> {s['tokens_per_router_cpu_s']:,.0f} tokens per router "
          f"CPU-second; client {s['client_core_share']:.0%} of a core; machine {s['machine_busy_share']:.0%} busy")
    threads = ", ".join(f"{name} {cpu:.1f}" for name, cpu in s["router_cpu_s_by_thread"].items() if cpu >= 0.05)
    print(f"    router CPU seconds by thread: {threads}")
