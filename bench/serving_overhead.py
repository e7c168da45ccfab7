"""The router's own cost, for `python bench/serving_bench.py --overhead`.

(a) Added latency. The same greedy requests, one at a time, (1) sent straight to a `worker.Replica`
    actor the way router/replica_pool.py drives one (`submit`, then its `events` stream), and (2)
    sent through `python -m router --replicas 1` with the same engine settings by a gRPC client in a
    process of its own, alternating between the two paths request by request. Each path has its own
    replica, so each prompt is a cache miss on both. Reported: TTFT and per-token latency p50 / p99
    of both, and the router's difference. (3) The same client against a bare gRPC server with the
    router's API that answers at once (`echo`): the floor any Python gRPC front door adds, idle between
    requests as the router is here.
(b) Streaming capacity. Many concurrent long streams through a router whose replica is fast: a real
    `worker.Replica` and engine (scheduler, block manager, outbox), but the model is replaced by a
    stand-in that sleeps `step_ms` per step (a GPU decode step) and samples fixed tokens, so each
    step hands the router one token per running request, as a GPU replica does. The replica is
    registered under the name the router gives its replica 0, so the router re-attaches to it.
    Reported: tokens/s and chunks/s received, and the router process's CPU time read from
    /proc/<pid>/stat (all its threads: asyncio loop, gRPC, Ray's core worker) over the streaming
    window; tokens per router CPU-second is what one fully busy router core would stream.

The router runs as a subprocess joined to this process's Ray cluster, so its CPU time is its own
and it does not share the client's interpreter lock. Both run on the same machine: on a 2-core VM
the client, the router and the replica compete for the cores (the machine's busy share is reported).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import ray
from ray.actor import ActorHandle
from serving_workloads import random_tokens, stream_request
from stand_in_runner import FixedTokenRunner

from router.client import AsyncClient
from router.config import RouterConfig
from worker import RequestSpec, get_replica, start_replica
from worker.launch import MAX_CONCURRENCY
from worker.messages import RequestDelta
from worker.replica import CONCURRENCY_GROUPS, Replica

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
ROUTER_NAMESPACE = "nanoserve"  # python -m router's namespace and replica names (not configurable)
ROUTER_REPLICA_NAME = "nanoserve-replica-0"
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
HEALTH_INTERVAL_S = RouterConfig().health_interval_s  # as often as the router checks


@dataclass(frozen=True, slots=True)
class OverheadConfig:
    """What `run_overhead` measures, and with which engine."""

    model: Path
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    out_dir: Path = Path("bench-out/serving")
    num_requests: int = 100  # (a): sequential requests on each path
    prompt_len: int = 64
    output_len: int = 32
    num_streams: int = 256  # (b): concurrent streams
    stream_len: int = 500  # (b): tokens each stream generates
    step_ms: float = 10.0  # (b): the stand-in model's step time
    seed: int = 0


# --- the router as a process ---------------------------------------------------------------------


class RouterProcess:
    """`python -m router` in a subprocess on this process's Ray cluster; stopped with SIGTERM like in production."""

    def __init__(self, config: OverheadConfig, log_path: Path) -> None:
        kwargs = config.engine_kwargs
        args = ["--replicas", "1", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1",
                "--ray-address", ray.get_runtime_context().gcs_address, "--model", str(config.model),
                "--device", kwargs.get("device", "cpu"), "--dtype", kwargs.get("dtype", "auto"),
                "--max-num-seqs", str(max(config.num_streams, kwargs.get("max_num_seqs", 256))),
                "--max-model-len", str(config.prompt_len + max(config.stream_len, config.output_len) + 16),
                "--log-level", "WARNING"]
        if "num_kv_blocks" in kwargs:
            args += ["--num-kv-blocks", str(kwargs["num_kv_blocks"])]
        self._log = log_path.open("w")
        # bench/ on the path: Ray builds the handle of a re-attached actor from its class, which for the
        # stand-in replica lives here (without it, `events` would not be known as a streaming method).
        python_path = os.pathsep.join(filter(None, [str(BENCH_DIR), os.environ.get("PYTHONPATH")]))
        self.process = subprocess.Popen([sys.executable, "-m", "router", *args], cwd=REPO_ROOT,
                                        env={**os.environ, "PYTHONPATH": python_path},
                                        stdout=subprocess.PIPE, stderr=self._log, text=True)
        self.address = f"127.0.0.1:{self._wait_for_port(timeout_s=300)}"

    def _wait_for_port(self, timeout_s: float) -> int:
        """Read stdout until the router prints its address ("... listening on host:port")."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.process.poll() is None:
            ready, _, _ = select.select([self.process.stdout], [], [], 1.0)
            line = self.process.stdout.readline() if ready else ""
            if "listening on" in line:
                return int(line.rsplit(":", 1)[1])
        self.stop()
        raise RuntimeError(f"the router did not start within {timeout_s:.0f} s; see {self._log.name}")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the router process, all threads."""
        return stat_cpu_seconds(Path(f"/proc/{self.process.pid}/stat"))

    def cpu_seconds_by_thread(self) -> dict[str, float]:
        """CPU time of the router's threads, summed by thread name (the main one runs the asyncio loop)."""
        by_name: dict[str, float] = {}
        for task in Path(f"/proc/{self.process.pid}/task").iterdir():
            name = "main (asyncio loop)" if task.name == str(self.process.pid) else (task / "comm").read_text().strip()
            by_name[name] = by_name.get(name, 0.0) + stat_cpu_seconds(task / "stat")
        return by_name

    def stop(self) -> None:
        """SIGTERM (drain, then kill the replicas) and wait until the replica's name is free."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._log.close()
        wait_until_gone(ROUTER_REPLICA_NAME)


def stat_cpu_seconds(stat_path: Path) -> float:
    """User + system CPU seconds from a /proc stat file (fields 14 and 15)."""
    fields = stat_path.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)"; fields[0] is field 3
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S


def wait_until_gone(name: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            get_replica(name, ROUTER_NAMESPACE)
        except ValueError:
            return
        time.sleep(0.2)


def machine_busy_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine since boot, from /proc/stat's first line."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


# --- (a) added latency ---------------------------------------------------------------------------


@dataclass(slots=True)
class Timing:
    """One request's latencies in seconds: time to first token, and per-token gaps after it."""

    ttft_s: float
    token_gaps_s: list[float]


class DirectReplica:
    """A `worker.Replica` driven as router/replica_pool.py drives one: submit, read its batched event
    stream, and call `health` every second (the replica aborts the requests of a silent router)."""

    def __init__(self, actor: ActorHandle) -> None:
        self.actor = actor
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
            await self.actor.health.remote()

    async def _read_events(self, opened: asyncio.Future[None]) -> None:
        async for ref in self.actor.events.remote():
            batch = await ref
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
        [error] = await self.actor.submit.remote([RequestSpec(request_id, prompt_ids, sampling)])
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

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        ray.kill(self.actor, no_restart=True)


async def start_direct_replica(config: OverheadConfig) -> DirectReplica:
    """A fresh replica of its own (cold cache), driven directly; same engine settings as the router's."""
    name = f"bench-direct-{uuid.uuid4().hex[:6]}"
    actor = start_replica(name, config.model, dict(config.engine_kwargs, max_model_len=router_max_len(config)),
                          on_gpu=on_gpu(config), namespace=ROUTER_NAMESPACE)
    await actor.describe.remote()
    replica = DirectReplica(actor)
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


async def time_all(address: str, config: OverheadConfig, prompts: list[list[int]]) -> dict[str, list[Timing]]:
    """Each prompt straight to the direct replica, then through the router, then to the echo server: in
    turn, so drift in the machine's speed hits every path alike."""
    direct = await start_direct_replica(config)
    echo = EchoServerProcess()
    client, echo_client = ClientProcess(address), ClientProcess(echo.address)
    timings: dict[str, list[Timing]] = {"direct": [], "router": [], "grpc floor": []}
    try:
        await direct.generate(prompts[0][:8], 4)  # warm-up
        await asyncio.to_thread(client.request, prompts[0][:8], 4)
        await asyncio.to_thread(echo_client.request, prompts[0][:8], 4)
        for prompt in prompts:
            timings["direct"].append(await direct.generate(prompt, config.output_len))
            timings["router"].append(await asyncio.to_thread(client.request, prompt, config.output_len))
            timings["grpc floor"].append(await asyncio.to_thread(echo_client.request, prompt, config.output_len))
    finally:
        direct.stop()
        for process in (client, echo_client, echo):
            process.stop()
    return timings


def router_max_len(config: OverheadConfig) -> int:
    return config.prompt_len + max(config.stream_len, config.output_len) + 16


def on_gpu(config: OverheadConfig) -> bool:
    return config.engine_kwargs.get("device", "auto") != "cpu" and ray.cluster_resources().get("GPU", 0) > 0


def latency_summary(timings: list[Timing]) -> dict[str, float]:
    ttft = np.array([t.ttft_s for t in timings]) * 1e3
    gaps = np.array([g for t in timings for g in t.token_gaps_s]) * 1e3
    return {"ttft_p50_ms": float(np.percentile(ttft, 50)), "ttft_p99_ms": float(np.percentile(ttft, 99)),
            "per_token_p50_ms": float(np.percentile(gaps, 50)), "per_token_p99_ms": float(np.percentile(gaps, 99))}


def measure_added_latency(config: OverheadConfig) -> dict[str, Any]:
    rng = random.Random(config.seed)
    prompts = [random_tokens(rng, config.prompt_len, 1024) for _ in range(config.num_requests)]
    router = RouterProcess(config, config.out_dir / "router_latency.log")
    try:
        timings = asyncio.run(time_all(router.address, config, prompts))
    finally:
        router.stop()
    direct, routed = latency_summary(timings["direct"]), latency_summary(timings["router"])
    added = {key: routed[key] - direct[key] for key in direct}
    return {"direct": direct, "router": routed, "added": added, "grpc floor": latency_summary(timings["grpc floor"])}


# --- (b) streaming capacity ----------------------------------------------------------------------


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


def run_overhead(config: OverheadConfig) -> dict[str, Any]:
    """Measure (a) and (b), print them and write OUT/serving_overhead.json."""
    config.out_dir.mkdir(parents=True, exist_ok=True)
    latency = measure_added_latency(config)
    print_latency(latency, config)
    streaming = measure_streaming(config)
    print_streaming(streaming, config)
    result = {"config": {**asdict(config), "model": str(config.model)}, "latency": latency, "streaming": streaming}
    (config.out_dir / "serving_overhead.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {config.out_dir / 'serving_overhead.json'}")
    return result


def print_latency(latency: dict[str, Any], config: OverheadConfig) -> None:
    print(f"(a) {config.num_requests} sequential greedy requests, {config.prompt_len} prompt + "
          f"{config.output_len} output tokens, 1 replica")
    print("    path       | TTFT p50 | TTFT p99 | per-token p50 | per-token p99  (ms)")
    for path in ("direct", "router", "added", "grpc floor"):
        s = latency[path]
        print(f"    {path:10} | {s['ttft_p50_ms']:8.2f} | {s['ttft_p99_ms']:8.2f} | {s['per_token_p50_ms']:13.3f} | "
              f"{s['per_token_p99_ms']:13.3f}")


def print_streaming(s: dict[str, Any], config: OverheadConfig) -> None:
    print(f"(b) {config.num_streams} streams x {config.stream_len} tokens, replica step {config.step_ms:g} ms "
          f"(offered {s['offered_tokens_per_s']:,.0f} tok/s): received {s['tokens_per_s']:,.0f} tok/s in "
          f"{s['chunks_per_s']:,.0f} chunks/s ({s['tokens_per_chunk']:.2f} tok/chunk), {s['failures']} failures")
    print(f"    router CPU {s['router_core_share']:.0%} of a core ({s['router_cpu_us_per_chunk']:.0f} µs per chunk) "
          f"-> {s['tokens_per_router_cpu_s']:,.0f} tokens per router CPU-second; client {s['client_core_share']:.0%}"
          f" of a core; machine {s['machine_busy_share']:.0%} busy")
    threads = ", ".join(f"{name} {cpu:.1f}" for name, cpu in s["router_cpu_s_by_thread"].items() if cpu >= 0.05)
    print(f"    router CPU seconds by thread: {threads}")


if __name__ == "__main__" and sys.argv[1:2] == ["client"]:  # ClientProcess's child
    asyncio.run(serve_client_requests(sys.argv[2]))
elif __name__ == "__main__" and sys.argv[1:2] == ["echo"]:  # EchoServerProcess's child
    asyncio.run(serve_echo())
