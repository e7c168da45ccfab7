"""Part (a) of the router overhead benchmark (`serving_overhead.py`).

(a) Added latency. The same greedy requests, one at a time, (1) sent straight to a replica the way
    router/replica_pool.py drives one (`submit`, then its `events` stream), and (2) sent through
    `python -m router --replicas 1` by a gRPC client in a process of its own. Each path has a stand-in
    replica of its own (`overhead_router.py`: the real replica and engine, a model that takes `step_ms`
    a step), so each prompt is a cache miss on both. Reported: TTFT and per-token latency p50 / p99
    of both, and the router's difference. (3) The same client against a bare gRPC server with the
    router's API that answers at once (`echo`): the floor any Python gRPC front door adds.

    Two regimes, each over the same prompts. "one after another": each path gets blocks of
    BLOCK_SIZE requests, the next sent as soon as the last one ended (a client sending requests in
    sequence; the paths take turns by block). "after idle": the paths take turns request by request, so
    each one sat idle for the other two paths' requests (~2 requests' time) before each of its own. On a
    VM an idle process's caches go cold: the same Python code then runs several times slower (the
    router's request validation: ~30 us back to back, ~0.2-0.8 ms after 50 ms asleep on the 2-core VM).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from overhead_router import REPO_ROOT, ROUTER_REPLICA_NAME, OverheadConfig, RouterProcess, start_model_free_replica
from serving_workloads import random_tokens, stream_request

from router.client import AsyncClient
from router.config import RouterConfig
from worker import ReplicaHandle, RequestSpec
from worker.messages import RequestDelta

HEALTH_INTERVAL_S = RouterConfig().health_interval_s  # as often as the router checks
BLOCK_SIZE = 10  # "one after another": requests in a row on one path before the next path's turn
REGIMES = {"one after another": BLOCK_SIZE, "after idle": 1}  # regime -> requests in a row per path
PATHS = ("direct", "router", "grpc floor")


@dataclass(slots=True)
class Timing:
    """One request's latencies in seconds: time to first token, and per-token gaps after it."""

    ttft_s: float
    token_gaps_s: list[float]


class DirectReplica:
    """A `worker.Replica` driven as router/replica_pool.py drives one: submit, read its batched event
    stream, and call `health` every second (the replica aborts the requests of a silent router)."""

    def __init__(self, handle: ReplicaHandle) -> None:
        self.handle = handle
        self._deltas: dict[str, asyncio.Queue[RequestDelta]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Subscribe to the replica's events and start the heartbeat; returns once the stream is open."""
        opened = asyncio.get_running_loop().create_future()
        self._tasks = [asyncio.create_task(self._read_events(opened)), asyncio.create_task(self._heartbeat())]
        await opened

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            await self.handle.health()

    async def _read_events(self, opened: asyncio.Future[None]) -> None:
        async for batch in self.handle.events():
            if not opened.done():
                opened.set_result(None)
            for delta in batch.outputs:
                if (queue := self._deltas.get(delta.request_id)) is not None:
                    queue.put_nowait(delta)

    async def generate(self, prompt_ids: list[int], max_tokens: int) -> Timing:
        """One greedy request to max_tokens, timed from the submit call."""
        request_id = uuid.uuid4().hex
        queue = self._deltas[request_id] = asyncio.Queue()
        sampling = dict(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, seed=0)
        sent = time.perf_counter()
        [error] = await self.handle.submit([RequestSpec(request_id, prompt_ids, sampling)])
        if error is not None:
            raise RuntimeError(f"submit refused: {error}")
        timing, last = Timing(0.0, []), sent
        while True:
            delta = await queue.get()
            now = time.perf_counter()
            if delta.new_token_ids and not timing.ttft_s:
                timing.ttft_s = now - sent
            elif delta.new_token_ids:
                timing.token_gaps_s += [(now - last) / len(delta.new_token_ids)] * len(delta.new_token_ids)
            last = now if delta.new_token_ids else last
            if delta.finished:
                del self._deltas[request_id]
                return timing

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.handle.kill(wait=False)


async def start_direct_replica(config: OverheadConfig) -> DirectReplica:
    """A stand-in replica of its own (cold cache), driven directly; the same kind as the router's."""
    handle = await asyncio.to_thread(start_model_free_replica, config, f"bench-direct-{uuid.uuid4().hex[:6]}")
    replica = DirectReplica(handle)
    await replica.start()
    return replica


class EchoServerProcess:
    """A bare grpc.aio server with the router's API: each Generate streams max_tokens one-token chunks at once."""

    def __init__(self) -> None:
        path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))  # not pip-installed
        self.process = subprocess.Popen([sys.executable, __file__, "echo"], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                        text=True, env={**os.environ, "PYTHONPATH": path})
        assert self.process.stdout is not None
        self.address = f"127.0.0.1:{int(self.process.stdout.readline())}"

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


async def serve_echo() -> None:
    """The echo process: print the port, then serve until killed."""
    from proto import nanoserve_pb2 as pb
    from proto import nanoserve_pb2_grpc

    class Echo(nanoserve_pb2_grpc.NanoServeServicer):
        async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):  # noqa: N802
            n = max(1, request.params.max_tokens)
            for i in range(n):
                yield pb.GenerateResponse(token_ids=[i], finish_reason=pb.FINISH_REASON_LENGTH if i == n - 1 else 0)

    server = grpc.aio.server()
    nanoserve_pb2_grpc.add_NanoServeServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


class ClientProcess:
    """A gRPC client in a process of its own, as a real client is: not this Ray driver, whose threads
    (Ray's core worker, the direct replica's event pump) would delay its sends and reads. It streams one
    request per `request()` call and returns its timing."""

    def __init__(self, address: str) -> None:
        path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))  # not pip-installed
        self.process = subprocess.Popen([sys.executable, __file__, "client", address], cwd=REPO_ROOT,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        env={**os.environ, "PYTHONPATH": path})

    def request(self, prompt_ids: list[int], max_tokens: int) -> Timing:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"prompt": prompt_ids, "max_tokens": max_tokens}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the client process exited with code {self.process.wait()} (its stderr is above)")
        reply = json.loads(line)
        if reply.get("error") is not None:
            raise RuntimeError(f"request failed through the router: {reply['error']}")
        return Timing(reply["ttft_s"], reply["token_gaps_s"])

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


async def serve_client_requests(address: str) -> None:
    """The client process: one JSON request a line on stdin, its timing as one JSON line on stdout."""
    async with AsyncClient(address) as client:
        for i, line in enumerate(sys.stdin):
            job = json.loads(line)
            record = await stream_request(client, f"r{i}", job["prompt"], job["max_tokens"], time.perf_counter())
            print(json.dumps({"ttft_s": record.ttft_s, "token_gaps_s": record.token_gaps_s, "error": record.error}),
                  flush=True)


async def time_all(
    address: str, config: OverheadConfig, prompts: list[list[int]]
) -> dict[str, dict[str, list[Timing]]]:
    """Per regime, every prompt on each path: straight to the direct replica, through the router, to the echo
    server. The paths take turns (by block or by request), so drift in the machine's speed hits them alike."""
    direct = await start_direct_replica(config)
    echo = EchoServerProcess()
    client, echo_client = ClientProcess(address), ClientProcess(echo.address)
    paths = {"direct": direct.generate,
             "router": lambda prompt, n: asyncio.to_thread(client.request, prompt, n),
             "grpc floor": lambda prompt, n: asyncio.to_thread(echo_client.request, prompt, n)}
    timings: dict[str, dict[str, list[Timing]]] = {regime: {path: [] for path in PATHS} for regime in REGIMES}
    try:
        for generate in paths.values():  # warm-up
            await generate(prompts[0][:8], 4)
        for regime, block in REGIMES.items():
            for start in range(0, len(prompts), block):
                for path, generate in paths.items():
                    for prompt in prompts[start:start + block]:
                        timings[regime][path].append(await generate(prompt, config.output_len))
    finally:
        await direct.stop()
        for process in (client, echo_client, echo):
            process.stop()
    return timings


def latency_summary(timings: list[Timing]) -> dict[str, float]:
    ttft = np.array([t.ttft_s for t in timings]) * 1e3
    gaps = np.array([g for t in timings for g in t.token_gaps_s]) * 1e3
    return {"ttft_p50_ms": float(np.percentile(ttft, 50)), "ttft_p99_ms": float(np.percentile(ttft, 99)),
            "per_token_p50_ms": float(np.percentile(gaps, 50)), "per_token_p99_ms": float(np.percentile(gaps, 99))}


def measure_added_latency(config: OverheadConfig) -> dict[str, Any]:
    rng = random.Random(config.seed)
    prompts = [random_tokens(rng, config.prompt_len, 1024) for _ in range(config.num_requests)]
    start_model_free_replica(config, ROUTER_REPLICA_NAME)
    router = RouterProcess(config, config.out_dir / "router_latency.log")
    try:
        timings = asyncio.run(time_all(router.address, config, prompts))
    finally:
        router.stop()
    return {regime: summarize(by_path) for regime, by_path in timings.items()}


def summarize(timings: dict[str, list[Timing]]) -> dict[str, dict[str, float]]:
    summary = {path: latency_summary(timings[path]) for path in PATHS}
    direct, routed = summary["direct"], summary["router"]
    summary["added"] = {key: routed[key] - direct[key] for key in direct}
    return summary


def print_latency(latency: dict[str, Any], config: OverheadConfig) -> None:
    print(f"(a) {config.num_requests} sequential greedy requests per regime and path, {config.prompt_len} prompt + "
          f"{config.output_len} output tokens, 1 replica")
    for regime, summary in latency.items():
        print(f"    {regime + ':':18} | TTFT p50 | TTFT p99 | per-token p50 | per-token p99  (ms)")
        for path in ("direct", "router", "added", "grpc floor"):
            s = summary[path]
            print(f"      {path:16} | {s['ttft_p50_ms']:8.2f} | {s['ttft_p99_ms']:8.2f} | "
                  f"{s['per_token_p50_ms']:13.3f} | {s['per_token_p99_ms']:13.3f}")


if __name__ == "__main__" and sys.argv[1:2] == ["client"]:  # ClientProcess's child
    asyncio.run(serve_client_requests(sys.argv[2]))
elif __name__ == "__main__" and sys.argv[1:2] == ["echo"]:  # EchoServerProcess's child
    asyncio.run(serve_echo())
