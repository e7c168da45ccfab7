"""Per-step cost of structured output through the engine: decode steps at each batch size with every row free, every
row under a grammar (any JSON object: OpenAI's json_object, the costliest mask per token measured in
bench/grammar_overhead.py), and half of each.

A step with grammar rows samples only after the step before is read (the masks follow its tokens): the host fills
the masks while the device runs the forward. The cost is the step time against all-free rows; mask fill and matcher
advance are the host's share. Rows ignore EOS, so a row whose object completes goes on (its mask is then EOS only:
the count of such rows is printed).

    python bench/structured_output_step.py                              # GPU: Qwen3-0.6B's shape, batch 1 and 256
    python bench/structured_output_step.py --batch-sizes 1 8 --steps 8  # CPU: the embedded tiny model
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import torch
from common import random_qwen3_0_6b, timed

from engine import LLMEngine, SamplingParams
from engine.default_model import default_model_dir

HOST: dict[str, float] = defaultdict(float)
MIXES = {"free": 0.0, "half": 0.5, "constrained": 1.0}



def run(engine: LLMEngine, batch_size: int, fraction: float, args: argparse.Namespace) -> str:
    """Mean seconds per decode step of `batch_size` rows, `fraction` of them under the grammar."""
    g = torch.Generator().manual_seed(0)
    num_constrained = round(batch_size * fraction)
    for i in range(batch_size):
        structured = {"json_object": True} if i < num_constrained else None
        params = SamplingParams(temperature=1.0, seed=i, ignore_eos=True, max_tokens=args.steps + 8,
                                structured_output=structured)
        engine.add_request(torch.randint(0, 10000, (args.context,), generator=g).tolist(), params)
    while engine.scheduler.waiting or any(seq.num_output_tokens < 3 for seq in engine.scheduler.running):
        engine.step()
    HOST.clear()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    sync()
    step_s = (time.perf_counter() - start) / args.steps
    done = sum(seq.matcher is not None and seq.matcher.is_stopped() for seq in engine.scheduler.running)
    engine.abort_all()
    while engine.has_unfinished():
        engine.step()
    host = ", ".join(f"{name} {seconds / args.steps * 1e3:.3f} ms" for name, seconds in HOST.items())
    return f"batch {batch_size:4d} {next(k for k, v in MIXES.items() if v == fraction):12s}: " \
           f"{step_s * 1e3:8.3f} ms per step ({host or 'no grammar work'}; {done} grammars complete)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="a checkpoint (default: Qwen3-0.6B's shape on a GPU, the tiny model "
                   "on CPU, both with random weights)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256])
    p.add_argument("--context", type=int, default=128, help="prompt tokens of each request")
    p.add_argument("--steps", type=int, default=64, help="decode steps timed per run")
    args = p.parse_args()
    on_gpu = torch.cuda.is_available()
    model = args.model or (random_qwen3_0_6b() if on_gpu else default_model_dir())
    engine = LLMEngine(model, max_model_len=args.context + args.steps + 64, max_num_seqs=max(args.batch_sizes),
                       max_num_batched_tokens=max(8192, args.context * 2))
    engine.grammars.token_mask = timed(HOST, "mask fill", engine.grammars.token_mask)  # type: ignore[method-assign]
    engine.grammars.accept = timed(HOST, "advance", engine.grammars.accept)  # type: ignore[method-assign]
    for batch_size in args.batch_sizes:
        for fraction in MIXES.values():
            if batch_size > 1 or fraction in (0.0, 1.0):
                print(run(engine, batch_size, fraction, args), flush=True)


if __name__ == "__main__":
    main()
