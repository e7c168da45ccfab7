"""Where a decode step's time goes: host time of each phase of `LLMEngine.step` at batch 256.

Wraps the engine's phases with wall-clock timers (no extra synchronisation, so the numbers are
what the step really spends). Steps overlap: each `step()` launches step n+1, then waits for step n's
tokens (`wait`) while the GPU runs n+1, so host phases that fit inside the GPU's time cost nothing.

    python bench/step_profile.py [--model DIR] [--batch-size 256] [--context 1024] [--kv-cache-dtype fp8]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import torch
from common import add_numerics_flags, numerics_kwargs, random_qwen3_0_6b, timed

from engine import LLMEngine, SamplingParams
from engine.step_plan import StepPlan

TOTALS: dict[str, float] = defaultdict(float)



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=32)
    add_numerics_flags(p)
    args = p.parse_args()
    engine = LLMEngine(args.model or random_qwen3_0_6b(), max_model_len=2048, max_num_seqs=256,
                       max_num_batched_tokens=16384, **numerics_kwargs(args))
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=args.steps + 64)
    for _ in range(args.batch_size):
        engine.add_request(torch.randint(0, 10000, (args.context - 1,), generator=g).tolist(), params)
    while engine.scheduler.waiting or any(s.num_output_tokens == 0 for s in engine.scheduler.running):
        engine.step()
    runner = engine.model_runner
    StepPlan.build = timed(TOTALS, "build step plan", StepPlan.build)  # type: ignore[method-assign]
    if runner.graphs is not None:
        runner.graphs.replay = timed(TOTALS, "graph replay (launch)", runner.graphs.replay)
    runner.execute = timed(TOTALS, "forward (launch, inputs)", runner.execute)
    runner._sampling_batch = timed(TOTALS, "sampling inputs", runner._sampling_batch)
    runner.model.compute_logits = timed(TOTALS, "logits (launch)", runner.model.compute_logits)
    runner.sample = timed(TOTALS, "sampler (launch)", runner.sample)
    runner.wait = timed(TOTALS, "wait for the GPU", runner.wait)
    engine.scheduler.schedule = timed(TOTALS, "schedule", engine.scheduler.schedule)
    engine._process = timed(TOTALS, "postprocess", engine._process)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    total = (time.perf_counter() - start) / args.steps
    TOTALS["postprocess, less the wait"] = TOTALS.pop("postprocess") - TOTALS["wait for the GPU"]  # it waits inside
    print(f"batch {args.batch_size}, context ~{args.context}: {total * 1e3:.2f} ms per step")
    for name, seconds in sorted(TOTALS.items(), key=lambda kv: -kv[1]):
        print(f"  {name:24s} {seconds / args.steps * 1e3:7.3f} ms")


if __name__ == "__main__":
    main()
