"""The main loop of tensor-parallel ranks 1..N-1: build the same model runner, then run what rank 0 sends."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import traceback

import torch

from engine.config import EngineConfig
from engine.model_runner import ModelRunner
from engine.step_plan import StepPlan
from engine.tp.channel import ChannelClosed, ControlChannel, Method
from engine.tp.doorbell import Doorbell
from engine.tp.process_group import destroy_process_group, init_process_group, join_store, rank_device

log = logging.getLogger(__name__)

# GPU ranks poll for the next step's message this long before sleeping (longer than a decode step, so
# in steady serving they never sleep); a rank has a core to itself there. CPU ranks share the cores
# with the computation itself, so they sleep at once.
GPU_SPIN_S = 0.05


def run_rank(
    config: EngineConfig,
    eos_token_ids: frozenset[int],
    rank: int,
    port: int,
    channel_name: str,
    wakeups: list[Doorbell],
) -> None:
    """Entry point of a rank process (spawned by RankGroup). Exits when told to, or when rank 0 is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; rank 0 shuts us down
    parent = os.getppid()
    spin_s = GPU_SPIN_S if config.device.type == "cuda" else 0.0
    config = dataclasses.replace(config, device=rank_device(config.device, rank))
    if config.device.type == "cpu":  # ranks share the CPU cores instead of each taking all of them
        torch.set_num_threads(max(1, torch.get_num_threads() // config.tensor_parallel_size))
    channel = ControlChannel.attach(channel_name, wakeups, config.tensor_parallel_size)
    runner: ModelRunner | None = None
    try:
        store = join_store(rank, config.tensor_parallel_size, port)
        init_process_group(config.device, rank, config.tensor_parallel_size, store)
        runner = ModelRunner(config, eos_token_ids, rank)
        while True:
            method, args, arrays = channel.receive(rank, lambda: os.getppid() == parent, spin_s)
            if method is Method.SHUTDOWN:
                break
            runner.execute(StepPlan.from_arrays(args[0], arrays))
    except ChannelClosed:
        log.warning("tensor-parallel rank %d: rank 0 exited; leaving", rank)
    finally:
        channel.close()
        if runner is not None:
            runner.close()  # its CUDA graphs must go before the NCCL communicator
        if config.device.type == "cuda":
            _exit_leaving_nccl_to_the_os()
        destroy_process_group()


def _exit_leaving_nccl_to_the_os() -> None:
    """End a GPU rank now: tearing NCCL down after CUDA-graph capture can hang (see destroy_process_group),
    and the driver frees a process's communicators and memory when it exits. Exit code 1 on an exception."""
    failed = sys.exc_info()[0] is not None
    if failed:
        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if failed else 0)
