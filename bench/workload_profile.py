"""Where nano-vLLM's workload spends its time: every engine step timed, grouped by the batch it ran.

Runs the offline benchmark's workload (`offline_throughput.py`) step by step and times each step from
the host: with overlapped steps, call k of `step()` launches step k and then waits for step k-1, so the
time between the returns of calls k-1 and k is what step k-1 cost (the GPU's time when the GPU is the
bottleneck, the host's otherwise). Each step's memory roofline is (weight bytes + bytes of every cached
token its decode rows attend to) / measured copy bandwidth. Steps are grouped by decode batch size (steps
with prefill tokens on their own); per group: steps, seconds, share of the run, mean step time, mean
roofline, and the seconds above the roofline, which is where a speed-up has to come from.

    python bench/workload_profile.py [--model DIR] [--num-seqs 256] [--max-num-batched-tokens 16384]
                                     [--kv-cache-dtype fp8] [--batch-invariant]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import add_numerics_flags, copy_bandwidth, numerics_kwargs
from offline_throughput import nano_vllm_workload, workload_engine

from engine import LLMEngine
from engine.kv_cache import bytes_per_block

BUCKETS = [(1, 8), (9, 32), (33, 64), (65, 128), (129, 192), (193, 256)]


@dataclass(slots=True)
class StepRecord:
    prefill_tokens: int
    decode_rows: int
    context_tokens: int  # cached tokens the step's sequences attend to
    seconds: float = 0.0


def run_timed_steps(engine: LLMEngine, prompts: list[list[int]], params: list) -> list[StepRecord]:
    for prompt, p in zip(prompts, params):
        engine.add_request(prompt, p)
    records: list[StepRecord] = []
    torch.cuda.synchronize()
    last_return = time.perf_counter()
    while engine.has_unfinished():
        engine.last_step_tokens = (0, 0)  # stays so if this call launches nothing
        engine.step()
        now = time.perf_counter()
        if records and records[-1].seconds == 0.0:
            records[-1].seconds = now - last_return  # this call waited for the step the previous call launched
        last_return = now
        prefill, decode = engine.last_step_tokens
        if prefill or decode:
            context = sum(len(seq.token_ids) for seq in engine.scheduler.running)
            records.append(StepRecord(prefill, decode, context))
    return records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="checkpoint dir (default: random Qwen3-0.6B shape, bf16)")
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    add_numerics_flags(p)
    args = p.parse_args()

    engine = workload_engine(args.model, max_num_batched_tokens=args.max_num_batched_tokens, **numerics_kwargs(args))
    model = engine.model_runner.model
    weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    kv_bytes_per_token = bytes_per_block(model, engine.config) / engine.config.block_size
    bandwidth = copy_bandwidth()
    prompts, params = nano_vllm_workload(args.num_seqs, seed=0)
    records = run_timed_steps(engine, prompts, params)

    total = sum(r.seconds for r in records)
    output_tokens = sum(sp.max_tokens for sp in params)
    print(f"{len(records)} steps in {total:.2f} s ({output_tokens / total:,.0f} output tok/s); "
          f"copy bandwidth {bandwidth / 1e12:.2f} TB/s, weights {weight_bytes / 2**30:.2f} GiB")
    print(f"{'steps':>22} {'count':>6} {'seconds':>8} {'share':>6} {'mean ms':>8} {'roofline':>9} "
          f"{'ratio':>6} {'s above':>8}")
    groups = [("with prefill", lambda r: r.prefill_tokens > 0)] + [
        (f"decode batch {lo}-{hi}", lambda r, lo=lo, hi=hi: r.prefill_tokens == 0 and lo <= r.decode_rows <= hi)
        for lo, hi in BUCKETS
    ]
    for name, member in groups:
        group = [r for r in records if member(r)]
        if not group:
            continue
        seconds = sum(r.seconds for r in group)
        line = f"{name:>22} {len(group):>6} {seconds:>8.2f} {seconds / total:>6.0%} {1e3 * seconds / len(group):>8.3f}"
        if name != "with prefill":  # compute-bound: see bench/prefill.py
            roofline = sum((weight_bytes + r.context_tokens * kv_bytes_per_token) / bandwidth for r in group)
            line += f" {1e3 * roofline / len(group):>9.3f} {seconds / roofline:>6.2f} {seconds - roofline:>8.2f}"
        print(line)


if __name__ == "__main__":
    main()
