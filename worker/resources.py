"""What each replica asks Ray for: whole devices when the cluster has enough, else a share of one.

A tiny or small model does not need a device of its own: a Qwen3-0.6B replica uses a few GB of an
H200's 141, and the embedded test model a sliver of a CPU. So when `replicas x tensor_parallel_size`
exceeds the GPUs (or CPUs) Ray has, replicas share them, as vLLM users do with
`--gpu-memory-utilization` and Ray Serve with fractional GPUs. A GPU replica's KV cache is then sized
from its share of the memory. Tensor-parallel replicas keep whole GPUs: their ranks are processes of
their own, one per GPU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

# The default memory share of all replicas on one GPU together, as the engine's own default for a whole
# GPU: the rest is headroom for each process's CUDA context and library workspaces.
GPU_MEMORY_SHARED = 0.9


@dataclass(frozen=True, slots=True)
class ReplicaResources:
    """One replica's request to Ray, and the engine settings that follow from it."""

    num_cpus: float
    num_gpus: float
    gpu_memory_utilization: float | None  # of the whole GPU, per replica; None: the engine's default
    summary: str  # the plan in words, for the router's start-up log

    @property
    def ray_resources(self) -> dict[str, float]:
        """As Ray names them (the part that is not zero)."""
        return {k: v for k, v in (("CPU", self.num_cpus), ("GPU", self.num_gpus)) if v}


def plan_replicas(
    num_replicas: int,
    tensor_parallel_size: int,
    on_gpu: bool,
    cluster: Mapping[str, float],
    gpu_memory_utilization: float | None = None,
) -> ReplicaResources:
    """The resources each of `num_replicas` replicas asks for on a cluster with `cluster` (Ray's
    `cluster_resources()`); ValueError when they cannot all be placed, saying why.

    `gpu_memory_utilization` is per replica, of its whole GPU; None on shared GPUs splits GPU_MEMORY_SHARED
    evenly between the replicas of a GPU.
    """
    if on_gpu:
        return _plan_gpus(num_replicas, tensor_parallel_size, cluster.get("GPU", 0.0), gpu_memory_utilization)
    return _plan_cpus(num_replicas, tensor_parallel_size, cluster.get("CPU", 0.0))


def _plan_gpus(num_replicas: int, tp_size: int, num_gpus: float, memory_share: float | None) -> ReplicaResources:
    whole = num_replicas * tp_size
    gpus = f"{_count(num_gpus)} GPU{'s' if num_gpus != 1 else ''}"
    if whole <= num_gpus:
        return ReplicaResources(1.0, float(tp_size), memory_share,
                                f"{num_replicas} replica(s) on {gpus}, {tp_size} GPU(s) each")
    if tp_size > 1:
        raise ValueError(
            f"{num_replicas} replicas with tensor_parallel_size={tp_size} need {whole} whole GPUs, and the Ray "
            f"cluster has {gpus}: tensor-parallel replicas do not share GPUs (each rank is a process on a GPU "
            "of its own); lower --replicas or --tensor-parallel-size, or add GPUs"
        )
    if num_gpus < 1:
        raise ValueError(f"replicas on GPUs need at least one GPU, and the Ray cluster has {gpus}")
    per_gpu = math.ceil(num_replicas / math.floor(num_gpus))
    if memory_share is None:
        memory_share = round(GPU_MEMORY_SHARED / per_gpu, 4)
    elif memory_share * per_gpu > 1.0:
        raise ValueError(
            f"gpu_memory_utilization={memory_share:g} is per replica, and {per_gpu} replicas share each GPU: "
            f"{per_gpu} x {memory_share:g} exceeds the GPU; use at most {1.0 / per_gpu:.3f}"
        )
    # Ray places a fractional GPU request within one GPU; 1/per_gpu of each keeps per_gpu replicas on it.
    share = _round_down(1.0 / per_gpu)
    return ReplicaResources(
        share, share, memory_share,
        f"{num_replicas} replicas on {gpus}, {per_gpu} to a GPU, {memory_share:.3g} of its memory each",
    )


def _plan_cpus(num_replicas: int, tp_size: int, num_cpus: float) -> ReplicaResources:
    # A CPU replica's tensor-parallel ranks are processes the engine starts itself, outside Ray's accounting.
    cpus = f"{_count(num_cpus)} CPU{'s' if num_cpus != 1 else ''}"
    if num_cpus <= 0:
        raise ValueError("the Ray cluster has no CPU to run a replica on")
    if num_replicas <= num_cpus:
        return ReplicaResources(1.0, 0.0, None, f"{num_replicas} replica(s) on {cpus}, one CPU each")
    share = _round_down(num_cpus / num_replicas)
    return ReplicaResources(share, 0.0, None, f"{num_replicas} replicas share {cpus}, {share:g} CPU each")


def _round_down(share: float) -> float:
    """Ray counts resources in fixed point (1e-4): rounding up could make the shares overflow the device."""
    return math.floor(share * 10_000) / 10_000


def _count(value: float) -> str:
    return f"{value:g}"
