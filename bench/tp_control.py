"""Per-step cost of tensor-parallel control messages, measured on real step plans.

Runs the engine at TP=1 (decode at batch 1 and 256, ~1024-token contexts, Qwen3-0.6B shape),
records each step's StepPlan, then replays those plans through the shared-memory ControlChannel
to a spawned rank process that receives them exactly as GPU ranks do (`run_rank` minus the model:
polling for GPU_SPIN_S before sleeping).
Reports, per step:
- rank 0's cost: ControlChannel.send() of the plan's arrays (the time TP adds to the scheduler's step);
- delivery latency: from the start of send on rank 0 to the plan rebuilt on the rank.

    python bench/tp_control.py [--model DIR] [--steps 200]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import torch
from common import random_qwen3_0_6b

from engine import LLMEngine, SamplingParams
from engine.step_plan import StepPlan
from engine.tp.channel import ControlChannel, Method
from engine.tp.doorbell import Doorbell
from engine.tp.rank import GPU_SPIN_S


def receive_plans(channel_name: str, wakeups: list[Doorbell], results: Connection) -> None:
    """A rank's receive path: wait, read, decode; report when each plan was ready (perf_counter_ns)."""
    channel = ControlChannel.attach(channel_name, wakeups, world_size=2)
    results.send("attached")
    ready: list[int] = []
    while True:
        method, args, arrays = channel.receive(1, lambda: True, GPU_SPIN_S)
        if method is Method.SHUTDOWN:
            break
        StepPlan.from_arrays(args[0], arrays)
        ready.append(time.perf_counter_ns())
    channel.close()
    results.send(ready)


def record_plans(engine: LLMEngine, batch_size: int, context: int, steps: int) -> list[StepPlan]:
    g = torch.Generator().manual_seed(batch_size)
    vocab_size = min(10000, engine.config.model_config.vocab_size)
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=steps + 8)
    for _ in range(batch_size):
        engine.add_request(torch.randint(0, vocab_size, (context - 1,), generator=g).tolist(), params)
    while engine.scheduler.waiting or any(s.num_output_tokens == 0 for s in engine.scheduler.running):
        engine.step()
    plans: list[StepPlan] = []
    runner = engine.model_runner
    execute = runner.execute
    runner.execute = lambda plan: (plans.append(plan), execute(plan))[1]  # type: ignore[method-assign]
    for _ in range(steps):
        engine.step()
    runner.execute = execute  # type: ignore[method-assign]
    engine.abort_all()
    while engine.has_unfinished():
        engine.step()
    return plans


def measure(plans: list[StepPlan], max_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """(rank 0 cost, delivery latency) in microseconds per step."""
    ctx = mp.get_context("spawn")
    wakeups = [Doorbell()]
    channel = ControlChannel.create(max_bytes, wakeups, world_size=2)
    parent_end, child_end = ctx.Pipe()
    rank = ctx.Process(target=receive_plans, args=(channel.name, wakeups, child_end))
    rank.start()
    assert parent_end.recv() == "attached"
    channel.unlink()  # the rank has opened both: no name is left in /dev/shm however this run ends
    wakeups[0].unlink()
    sent, done = [], []
    for plan in plans:
        start = time.perf_counter_ns()
        channel.send(Method.RUN, [plan.max_query_len], plan.arrays())
        done.append(time.perf_counter_ns())
        sent.append(start)
        _busy_wait(0.002)  # a step: rank 0 is busy (preparing, launching, waiting on the GPU), never asleep
    channel.send(Method.SHUTDOWN)
    ready = parent_end.recv()
    rank.join()
    channel.close()
    warm = 10  # the first messages pay for imports and page faults in the rank
    sent_ns, done_ns, ready_ns = np.array(sent[warm:]), np.array(done[warm:]), np.array(ready[warm:])
    return (done_ns - sent_ns) / 1e3, (ready_ns - sent_ns) / 1e3


def _busy_wait(seconds: float) -> None:
    """Spin like rank 0 does during a step (a CUDA sync spins too); sleeping would let the core go cold and
    charge the next send for it."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--context", type=int, default=1024)
    args = p.parse_args()
    engine = LLMEngine(args.model or random_qwen3_0_6b(), max_model_len=args.context + args.steps + 16,
                       max_num_seqs=256, max_num_batched_tokens=16384)
    for batch_size in (1, 256):
        plans = record_plans(engine, batch_size, args.context, args.steps)
        cost, latency = measure(plans, 1 << 22)
        size = sum(a.nbytes for a in plans[-1].arrays())
        print(f"batch {batch_size:3d} ({size:,} B/msg): rank-0 send p50 {np.median(cost):.1f} us "
              f"p99 {np.percentile(cost, 99):.1f} us; delivered p50 {np.median(latency):.1f} us "
              f"p99 {np.percentile(latency, 99):.1f} us")


if __name__ == "__main__":
    main()
