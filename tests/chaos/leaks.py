"""I4 and I5, checked at the end of every chaos scenario (tests/chaos/conftest.py runs them).

I4 flat memory: the router's and each replica's RSS end within a stated budget of their level when the
router started (before the scenario's first request). The in-process router shares the test process, so
its figure also holds the test's clients and its reference engine: the budget allows for them.
I5 no leaks: once the scenario's routers are stopped, the Ray cluster has every resource back
(available == total), no tensor-parallel rank process of this cluster is left, and every shared-memory
segment created during the scenario is gone.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import ray

from tests.serving import RouterThread, serving_handles

log = logging.getLogger(__name__)

# RSS growth allowed over a scenario, after `settle_memory`. Growth seen over the chaos suite on the 2-core
# CI box (all 18 scenarios, 2026-11-30): router (the test process) up to 20 MiB, a replica up to 15 MiB.
ROUTER_BUDGET_MIB = 64.0
REPLICA_BUDGET_MIB = 64.0
TP_SEGMENT_PREFIX = "nanoserve-tp-"  # /dev/shm/nanoserve-tp-<replica pid>-...: a TP engine's control channel


def rss_mib(pid: int) -> float:
    """Resident memory of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"/proc/{pid}/status has no VmRSS line")


def settle_memory() -> int:
    """Collect garbage and hand the allocator's free pages back to the OS, so RSS counts live memory rather
    than what malloc keeps cached (which swings by hundreds of MiB with the last burst); returns our pid."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return os.getpid()


def settled_replica_pids(router: RouterThread) -> dict[str, int]:
    """The process of each replica the router now serves from, by replica name, its memory settled."""
    return {name: asyncio.run(handle.run(lambda replica: settle_memory(), timeout_s=30))
            for name, handle in serving_handles(router).items()}


@dataclass(frozen=True)
class MemoryBaseline:
    """RSS in MiB of the router's process and of each replica's (by name) when the router started."""

    router_mib: float
    replica_mib: dict[str, float]

    @classmethod
    def take(cls, router: RouterThread) -> MemoryBaseline:
        return cls(rss_mib(settle_memory()), {name: rss_mib(pid) for name, pid in settled_replica_pids(router).items()})


def assert_memory_flat(router: RouterThread, baseline: MemoryBaseline) -> None:
    """I4: the router and each serving replica (a replaced one too: it starts lower) grew within budget."""
    grown = {"router": rss_mib(settle_memory()) - baseline.router_mib}
    for name, pid in settled_replica_pids(router).items():
        if name in baseline.replica_mib:
            grown[name] = rss_mib(pid) - baseline.replica_mib[name]
    log.info("I4: RSS growth over the scenario (MiB): %s", {k: round(v, 1) for k, v in grown.items()})
    over = {k: v for k, v in grown.items() if v > (ROUTER_BUDGET_MIB if k == "router" else REPLICA_BUDGET_MIB)}
    assert not over, f"RSS grew past the budget ({ROUTER_BUDGET_MIB:g} / {REPLICA_BUDGET_MIB:g} MiB): {over}"


def tp_segments() -> set[str]:
    """Names of the TP control-channel segments in /dev/shm (any cluster's)."""
    return {name for name in os.listdir("/dev/shm") if name.startswith(TP_SEGMENT_PREFIX)}


@ray.remote(num_cpus=0)
def _raylet_pid() -> int:
    return int(os.environ["RAY_RAYLET_PID"])


def cluster_rank_processes(raylet_pid: int) -> list[int]:
    """Pids of TP rank processes started under this Ray cluster: multiprocessing children of its workers
    (they inherit the worker's RAY_RAYLET_PID), so another cluster on the same machine is not counted."""
    found = []
    marker = f"RAY_RAYLET_PID={raylet_pid}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if b"multiprocessing.spawn" not in Path(f"/proc/{entry}/cmdline").read_bytes():
                continue
            if marker in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                found.append(int(entry))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def assert_no_leaks(segments_before: set[str], timeout_s: float = 20.0) -> None:
    """I5, once the scenario's replicas are gone: resources back, no rank process, no new segment left."""
    raylet_pid = ray.get(_raylet_pid.remote(), timeout=60)
    deadline = time.monotonic() + timeout_s
    while True:
        total, available = ray.cluster_resources(), ray.available_resources()
        held = {k: total[k] - available.get(k, 0.0) for k in total if total[k] - available.get(k, 0.0) > 1e-6}
        ranks = cluster_rank_processes(raylet_pid)
        segments = {s for s in tp_segments() - segments_before if not _creator_alive(s)}
        if not (held or ranks or segments):
            return
        assert time.monotonic() < deadline, (
            f"left after the scenario: Ray resources held {held}, rank processes {ranks}, segments {segments}")
        time.sleep(0.2)


def _creator_alive(segment: str) -> bool:
    """Whether the replica process that created a TP segment still runs (another cluster's may)."""
    pid = segment.removeprefix(TP_SEGMENT_PREFIX).split("-", 1)[0]
    stat = Path(f"/proc/{pid}/stat")
    try:
        return pid.isdigit() and stat.read_text().split(") ", 1)[1][0] != "Z"  # a zombie has exited
    except OSError:
        return False
