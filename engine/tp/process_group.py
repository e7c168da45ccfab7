"""The torch.distributed group of one engine's ranks: NCCL between GPUs, gloo on CPU."""

from __future__ import annotations

import datetime
import logging
import socket
import threading

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Collectives only ever wait for the slowest rank of the same step; a rank that dies closes its
# sockets, which fails the collective at once (gloo), so this bound is only a last resort.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_store(rank: int, world_size: int, port: int) -> dist.TCPStore:
    """The group's rendezvous store on 127.0.0.1:`port`. Rank 0 serves it without waiting for the others (so
    it can watch them start: `RankGroup`); the others connect and record that they started."""
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=rank == 0, timeout=COLLECTIVE_TIMEOUT,
                          wait_for_workers=False)
    if rank > 0:
        store.set(started_key(rank), "1")
    return store


def started_key(rank: int) -> str:
    return f"nanoserve/started/{rank}"


def init_process_group(device: torch.device, rank: int, world_size: int, store: dist.TCPStore) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", store=store, rank=rank, world_size=world_size,
        timeout=COLLECTIVE_TIMEOUT,
    )


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r of a GPU group runs on the r-th GPU after the engine's own; CPU ranks share the CPU."""
    return torch.device("cuda", (device.index or 0) + rank) if device.type == "cuda" else device


def destroy_process_group(timeout_s: float = 10.0) -> None:
    """Leave the group. gloo: destroy it. NCCL: `destroy_process_group` hangs once collectives were captured
    in CUDA graphs (pytorch/pytorch#115388, seen on two H200s), so abort the communicators instead, on a
    daemon thread, and stop waiting after `timeout_s`: close() must not hang, and process exit frees them."""
    if not dist.is_initialized():
        return
    if dist.get_backend() != "nccl":
        dist.destroy_process_group()
        return
    aborting = threading.Thread(target=dist.distributed_c10d._abort_process_group, daemon=True,
                                name="nanoserve-nccl-abort")
    aborting.start()
    aborting.join(timeout_s)
    if aborting.is_alive():
        log.warning("NCCL did not shut down within %.0f s; its communicators go with the process", timeout_s)
