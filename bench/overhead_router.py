"""What both parts of the router overhead benchmark (`serving_overhead.py`) share: their settings, the
stand-in replica, and `python -m router` run as a process of its own on this process's Ray cluster, with
its CPU time.

The stand-in replica is a real `worker.Replica` and engine (scheduler, block manager, outbox) whose model
is replaced by a stand-in that sleeps `step_ms` per step (a GPU step: it costs the host nothing) and
samples fixed tokens, so each step hands the router one token per running request, as a GPU replica does.
With no model to compute, what the router adds is not lost in the CPU model's own time and jitter.

The router runs as a subprocess joined to this process's Ray cluster, so its CPU time is its own
and it does not share the client's interpreter lock. Both run on the same machine: on a 2-core VM
the client, the router and the replica compete for the cores (the machine's busy share is reported).
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from stand_in_runner import FixedTokenRunner

from worker.handle import MAX_CONCURRENCY, ReplicaHandle
from worker.replica import CONCURRENCY_GROUPS, Replica

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
ROUTER_NAMESPACE = "nanoserve"  # python -m router's namespace and replica names (not configurable)
ROUTER_REPLICA_NAME = "nanoserve-replica-0"
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class OverheadConfig:
    """What `run_overhead` measures, and with which engine."""

    model: Path
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    out_dir: Path = Path("bench-out/serving")
    num_requests: int = 100  # (a): sequential requests on each path, in each regime
    prompt_len: int = 64
    output_len: int = 32
    num_streams: int = 256  # (b): concurrent streams
    stream_len: int = 500  # (b): tokens each stream generates
    step_ms: float = 2.0  # the stand-in model's step time ((b): 256 streams x 2 ms = 128k tok/s, more than a core)
    seed: int = 0


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


def start_model_free_replica(config: OverheadConfig, name: str) -> ReplicaHandle:
    """A stand-in replica named `name` (ROUTER_REPLICA_NAME: `python -m router` re-attaches to it)."""
    actor_class = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(ModelFreeReplica)  # type: ignore[call-overload]
    kwargs = dict(device="cpu", max_model_len=router_max_len(config), max_num_seqs=config.num_streams,
                  num_kv_blocks=config.num_streams * (-(-router_max_len(config) // 16) + 1))
    actor = actor_class.options(name=name, namespace=ROUTER_NAMESPACE, lifetime="detached",
                                max_concurrency=MAX_CONCURRENCY).remote(name, str(config.model), kwargs,
                                                                        config.step_ms / 1e3)
    handle = ReplicaHandle(name, actor, ROUTER_NAMESPACE)
    asyncio.run(handle.describe())
    return handle


class RouterProcess:
    """`python -m router` in a subprocess on this process's Ray cluster; stopped with SIGTERM like in production."""

    def __init__(self, config: OverheadConfig, log_path: Path, cpus: set[int] | None = None) -> None:
        """`cpus`: the cores the router process (all its threads) may run on; None for any."""
        kwargs = config.engine_kwargs
        args = ["--replicas", "1", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1",
                "--ray-address", ray.get_runtime_context().gcs_address, "--model", str(config.model),
                "--device", kwargs.get("device", "cpu"), "--dtype", kwargs.get("dtype", "auto"),
                "--max-num-seqs", str(max(config.num_streams, kwargs.get("max_num_seqs", 256))),
                "--max-model-len", str(router_max_len(config)),
                "--log-level", "WARNING"]
        if "num_kv_blocks" in kwargs:
            args += ["--num-kv-blocks", str(kwargs["num_kv_blocks"])]
        self._log = log_path.open("w")
        # bench/ on the path: Ray builds the handle of a re-attached actor from its class, which for the
        # stand-in replica lives in bench/ (without it, `events` would not be known as a streaming method).
        python_path = os.pathsep.join(filter(None, [str(BENCH_DIR), os.environ.get("PYTHONPATH")]))
        self.process = subprocess.Popen([sys.executable, "-m", "router", *args], cwd=REPO_ROOT,
                                        env={**os.environ, "PYTHONPATH": python_path},
                                        stdout=subprocess.PIPE, stderr=self._log, text=True,
                                        preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus))
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
        """SIGTERM (drain, then kill the replica and wait until its name is free; here too if that took too long)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._log.close()
        left = ReplicaHandle.find(ROUTER_REPLICA_NAME, ROUTER_NAMESPACE)
        if left is not None:
            asyncio.run(left.kill())


def stat_cpu_seconds(stat_path: Path) -> float:
    """User + system CPU seconds from a /proc stat file (fields 14 and 15)."""
    fields = stat_path.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)"; fields[0] is field 3
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S


def machine_busy_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine since boot, from /proc/stat's first line."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def router_max_len(config: OverheadConfig) -> int:
    return config.prompt_len + max(config.stream_len, config.output_len) + 16

