"""Host cost of one decode step: scheduler + block manager + output bookkeeping, with no model.

Runs the engine's own `LLMEngine.step()` (schedule -> launch -> `_process` of the step before) with a
stand-in model runner that samples a fixed token, so what is timed is exactly the per-step Python work
the engine does around the model: `Scheduler.schedule()`, then per sequence `num_computed_tokens` and
its coming token counted as pending, then for the step before: the token appended,
`BlockManager.commit`, the stop check and the `RequestOutput`.
`--num-seqs` sequences are prefilled first, then every timed step decodes all of them.

    python bench/scheduler_bench.py [--num-seqs 512] [--steps 2000] [--block-size 16] [--prompt-len 512]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stand_in_runner import FixedTokenRunner  # noqa: E402

from engine.block_manager import BlockManager  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.default_model import default_model_dir  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.scheduler import ScheduledBatch, Scheduler  # noqa: E402
from engine.tokenizer import Tokenizer  # noqa: E402

SAMPLED_TOKEN = 7
MAX_NUM_BATCHED_TOKENS = 8192  # the engine's default


class StandInRunner(FixedTokenRunner):
    """FixedTokenRunner as an engine's own model runner, which the engine closes with itself (nothing to free)."""

    def close(self) -> None:
        pass


def engine_without_model(num_seqs: int, num_blocks: int, block_size: int, max_model_len: int) -> LLMEngine:
    """An LLMEngine whose step() runs the real scheduler, block manager and `_process`, minus the model: the
    embedded model's config and tokenizer (no weights loaded, no device) and a stand-in model runner."""
    config = EngineConfig.create(default_model_dir(), max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
                                 max_num_seqs=num_seqs, max_model_len=max_model_len, block_size=block_size,
                                 num_kv_blocks=num_blocks, device="cpu")
    scheduler = Scheduler(BlockManager(num_blocks, block_size), num_seqs, MAX_NUM_BATCHED_TOKENS)
    runner = StandInRunner([SAMPLED_TOKEN], num_seqs)
    return LLMEngine.from_parts(config, Tokenizer.from_dir(config.model), runner, scheduler)  # type: ignore[arg-type]


def add_requests(engine: LLMEngine, num_seqs: int, prompt_len: int, max_tokens: int) -> None:
    """Distinct random prompts (no prefix hits)."""
    rng = random.Random(0)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    for i in range(num_seqs):
        engine.add_request([rng.randrange(150_000) for _ in range(prompt_len)], params, request_id=f"r{i}")


def time_steps(engine: LLMEngine, steps: int) -> tuple[list[int], list[int], list[int]]:
    """(wall ns, process CPU ns, of which in `schedule()` CPU ns) of each of `steps` engine steps."""
    wall: list[int] = []
    cpu: list[int] = []
    in_schedule: list[int] = []
    schedule = engine.scheduler.schedule

    def timed_schedule() -> ScheduledBatch:
        c0 = time.process_time_ns()
        batch = schedule()
        in_schedule.append(time.process_time_ns() - c0)
        return batch

    engine.scheduler.schedule = timed_schedule  # type: ignore[method-assign]
    for _ in range(steps):
        w0, c0 = time.perf_counter_ns(), time.process_time_ns()
        engine.step()
        c1, w1 = time.process_time_ns(), time.perf_counter_ns()
        wall.append(w1 - w0)
        cpu.append(c1 - c0)
    engine.scheduler.schedule = schedule  # type: ignore[method-assign]
    return wall, cpu, in_schedule


def summary_us(samples_ns: list[int]) -> str:
    ordered = sorted(samples_ns)
    mean = sum(ordered) / len(ordered) / 1e3
    p50 = ordered[len(ordered) // 2] / 1e3
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / 1e3
    return f"mean {mean:8.1f}  p50 {p50:8.1f}  p99 {p99:8.1f}  max {ordered[-1] / 1e3:8.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-seqs", type=int, default=512)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--warmup", type=int, default=100, help="decode steps run before timing")
    p.add_argument("--profile", action="store_true", help="also run the timed steps under cProfile")
    args = p.parse_args()

    if not 0 < args.num_seqs < MAX_NUM_BATCHED_TOKENS:
        p.error(f"--num-seqs must be in [1, {MAX_NUM_BATCHED_TOKENS})")
    # Early requests decode while later ones prefill: leave room so nobody finishes while timed.
    num_prefill_steps = -(-args.num_seqs * args.prompt_len // (MAX_NUM_BATCHED_TOKENS - args.num_seqs)) + 1
    max_tokens = num_prefill_steps + args.warmup + args.steps * (2 if args.profile else 1) + 1
    max_model_len = args.prompt_len + max_tokens + 1
    num_blocks = args.num_seqs * -(-max_model_len // args.block_size)
    engine = engine_without_model(args.num_seqs, num_blocks, args.block_size, max_model_len)
    add_requests(engine, args.num_seqs, args.prompt_len, max_tokens)
    while engine.scheduler.waiting or any(seq.num_output_tokens == 0 for seq in engine.scheduler.running):
        engine.step()  # prefill
    time_steps(engine, args.warmup)
    assert len(engine.scheduler.running) == args.num_seqs and not engine.scheduler.waiting

    wall, cpu, in_schedule = time_steps(engine, args.steps)
    assert engine.last_step_tokens == (0, args.num_seqs), "every timed step must decode every sequence"
    print(f"{args.num_seqs} decoding sequences, block size {args.block_size}, prompt {args.prompt_len}, "
          f"{args.steps} steps after {args.warmup} warm-up")
    print(f"  per step, wall µs: {summary_us(wall)}")
    print(f"  per step, CPU µs:  {summary_us(cpu)}")
    print(f"    in schedule():   {summary_us(in_schedule)}")
    print(f"    rest of step():  {summary_us([c - s for c, s in zip(cpu, in_schedule)])}")
    print(f"  per sequence, CPU ns (mean): {sum(cpu) / len(cpu) / args.num_seqs:.0f}")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(time_steps, engine, args.steps)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
