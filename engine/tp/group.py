"""Rank 0's handle on ranks 1..N-1: spawn them, send them each step, notice a death, shut them down.

What a rank process runs is its creator's choice (LLMEngine: engine/tp/rank.py's `run_rank`), so this module
needs nothing of the model runner, which drives the group.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess

import numpy as np
import torch.distributed as dist

from engine.config import EngineConfig
from engine.tp.channel import ControlChannel, Method
from engine.tp.doorbell import Doorbell
from engine.tp.process_group import (
    COLLECTIVE_TIMEOUT,
    destroy_process_group,
    free_port,
    init_process_group,
    join_store,
    started_key,
)

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_S = 10.0
RANK_DEATH_EXIT_CODE = 70  # an NCCL engine's process exits with this when one of its ranks died
# Room for the largest step plan: ids, positions and slots per token; lengths, block tables, sample indices and
# pending tokens' indices and rows per sequence.
_CHANNEL_HEADROOM = 1 << 16

# A rank process's entry point, called with (config, eos token ids, rank, store port, channel name, doorbells).
RankMain = Callable[[EngineConfig, frozenset[int], int, int, str, list[Doorbell]], None]


class RankDiedError(RuntimeError):
    """A tensor-parallel rank process exited while the engine was using it."""


class RankGroup:
    """Ranks 1..N-1 of one engine's tensor-parallel group, seen from rank 0."""

    def __init__(self, config: EngineConfig, eos_token_ids: frozenset[int], main: RankMain) -> None:
        """Spawn the ranks, each running `main` (a module-level function: 'spawn' pickles it by name), and join
        their process group (they then build their model shards alongside ours)."""
        world_size = config.tensor_parallel_size
        if dist.is_initialized():
            raise ValueError(
                "tensor_parallel_size: this process already has a torch.distributed group (another "
                "tensor-parallel engine not yet closed?); close() it before starting another"
            )
        ctx = mp.get_context("spawn")  # fork would copy rank 0's CUDA context and threads
        wakeups = [Doorbell() for _ in range(1, world_size)]
        self.channel = ControlChannel.create(_channel_size(config), wakeups, world_size)
        port = free_port()
        store = join_store(0, world_size, port)
        self.processes: list[BaseProcess] = []
        for rank in range(1, world_size):
            process = ctx.Process(
                target=main, args=(config, eos_token_ids, rank, port, self.channel.name, wakeups),
                name=f"nanoserve-tp-rank-{rank}", daemon=True,
            )
            process.start()
            self.processes.append(process)
        self._closed = False
        self._closing = threading.Event()
        # Ranks and shared memory go away with the engine, even if nobody calls close().
        self._finalizer = weakref.finalize(self, _shutdown, self.channel, self.processes, self._closing)
        _exit_cleanly_on_sigterm()
        try:
            self._wait_until_started(store)
            init_process_group(config.device, 0, world_size, store)
        except BaseException:
            self.close()
            raise
        _unlink_names(self.channel)  # every rank opened them before it started
        log.info("tensor parallelism: %d ranks, %s backend", world_size, dist.get_backend())
        if dist.get_backend() == "nccl":
            threading.Thread(
                target=_exit_on_rank_death, args=(self.processes, self._closing), daemon=True,
                name="nanoserve-tp-watchdog",
            ).start()

    def _wait_until_started(self, store: dist.TCPStore) -> None:
        """Wait for every rank to reach the store; a rank that exits first (say, an import error) fails the
        engine at once, naming it, instead of after the rendezvous timeout."""
        keys = [started_key(rank) for rank in range(1, len(self.processes) + 1)]
        timeout_s = COLLECTIVE_TIMEOUT.total_seconds()
        deadline = time.monotonic() + timeout_s
        while not store.check(keys):
            if (dead := self._first_dead()) is not None:
                rank, process = dead
                raise RankDiedError(
                    f"tensor-parallel rank {rank} (pid {process.pid}) died with exit code {process.exitcode} before "
                    "joining the group (its error is printed above). Ranks start with the 'spawn' method, which "
                    "re-imports the main script: create a tensor-parallel engine under `if __name__ == \"__main__\":`"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"tensor-parallel ranks did not start within {timeout_s:.0f} s")
            time.sleep(0.01)

    def send(self, method: Method, args: list[int], arrays: list[np.ndarray]) -> None:
        if self._closed:
            raise RankDiedError("the tensor-parallel group was shut down after a failure; create a new engine")
        self.check_alive()
        self.channel.send(method, args, arrays, alive=self.check_alive)

    def check_alive(self) -> None:
        """Raise RankDiedError naming the first rank whose process has exited."""
        if (dead := self._first_dead()) is not None:
            rank, process = dead
            raise RankDiedError(
                f"tensor-parallel rank {rank} (pid {process.pid}) died with exit code {process.exitcode}; "
                "the engine cannot continue, create a new one"
            )

    def _first_dead(self) -> tuple[int, BaseProcess] | None:
        return next(((rank, p) for rank, p in enumerate(self.processes, start=1) if p.exitcode is not None), None)

    def fail(self, error: BaseException, wait_s: float = 5.0) -> None:
        """After a step or the start-up failed on rank 0: close the group (no rank or shared memory outlives
        a broken engine), then raise RankDiedError if a rank died, waiting up to `wait_s` for the dead
        process to be reaped. Returns if every rank was alive, so the caller re-raises `error`."""
        died: RankDiedError | None = None
        deadline = time.monotonic() + wait_s
        while died is None and not isinstance(error, RankDiedError):
            try:
                self.check_alive()
            except RankDiedError as e:
                died = e
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        self.close()
        if died is not None:
            raise died from error

    def close(self) -> None:
        """Tell the ranks to exit, wait for them (killing stragglers), destroy the group, free the shared memory."""
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        _shutdown(self.channel, self.processes, self._closing)


def _exit_on_rank_death(processes: list[BaseProcess], closing: threading.Event) -> None:
    """A dead peer's NCCL collectives never complete, and on GPUs nothing unwinds them in-process: aborting the
    communicator hangs too (seen on two H200s with CUDA graphs), as would any later use or teardown of the GPUs.
    So when a rank exits while the engine is open, rank 0's process exits at once, naming the rank, rather than
    hang (a serving replica is then replaced like any dead replica). gloo fails the collective instead."""
    ready = wait([p.sentinel for p in processes])
    if closing.is_set():
        return
    rank, dead = next((r, p) for r, p in enumerate(processes, start=1) if p.sentinel in ready)
    dead.join(1.0)  # its sentinel closes as it exits, a moment before its exit code can be read
    log.critical("tensor-parallel rank %d (pid %s) exited with code %s (its error, if it raised one, is above); "
                 "NCCL cannot continue without it: exiting this process with code %d", rank, dead.pid, dead.exitcode,
                 RANK_DEATH_EXIT_CODE)
    logging.shutdown()
    os._exit(RANK_DEATH_EXIT_CODE)


def _shutdown(channel: ControlChannel, processes: list[BaseProcess], closing: threading.Event) -> None:
    closing.set()
    if all(p.exitcode is None for p in processes):
        with contextlib.suppress(RuntimeError):  # a rank is already gone: the others are killed below
            channel.send(Method.SHUTDOWN, alive=lambda: _raise_if_any_dead(processes))
    deadline = time.monotonic() + SHUTDOWN_TIMEOUT_S
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
        if process.exitcode is None:
            log.warning("tensor-parallel rank %s did not exit; killing it", process.name)
            process.kill()
            process.join()
    channel.close()
    _unlink_names(channel)
    destroy_process_group()


def _unlink_names(channel: ControlChannel) -> None:
    """Remove the channel's and its doorbells' names from /dev/shm: the processes that opened them keep them,
    and nothing is left there however the processes end (Ray kills a replica's children, resource tracker
    included, with it). Rank 0 calls this once every rank started, and again (a no-op then) at shutdown."""
    channel.unlink()
    for doorbell in channel.wakeups:
        doorbell.unlink()


def _raise_if_any_dead(processes: list[BaseProcess]) -> None:
    if any(p.exitcode is not None for p in processes):
        raise RuntimeError("a rank exited")


def _channel_size(config: EngineConfig) -> int:
    max_blocks = -(-config.max_model_len // config.block_size)
    per_seq = 4 * max_blocks + 4 * 2 + 8 * 3
    return _CHANNEL_HEADROOM + 3 * 8 * config.max_num_batched_tokens + config.max_num_seqs * per_seq


def _exit_cleanly_on_sigterm() -> None:
    """SIGTERM's default kills without cleanup; turn it into SystemExit so finalizers stop the ranks and
    unlink the shared memory. Only when nobody installed a handler, and only from the main thread."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_system_exit)


def _raise_system_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)
