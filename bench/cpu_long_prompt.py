"""A long prompt on CPU: how long each prefill step takes, per step-token budget (max_num_batched_tokens).

Every other request on a replica waits a whole step for its next token, so on CPU, ~100x slower than a GPU,
the budget bounds that wait: this measures the per-step and total prefill time of one long prompt with the
embedded tiny model (2 layers, the real Qwen vocabulary), as `python -m router` serves it on a laptop.

    python bench/cpu_long_prompt.py [--prompt-tokens 33000] [--budgets 8192,2048]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import LLMEngine, SamplingParams  # noqa: E402


def prefill_steps(budget: int, num_tokens: int) -> list[float]:
    """Seconds per step until the prompt's first token, with `budget` tokens a step."""
    engine = LLMEngine(device="cpu", max_num_batched_tokens=budget, max_model_len=num_tokens + 2)
    engine.add_request(list(range(1000, 1000 + num_tokens)), SamplingParams(max_tokens=2, temperature=0.0))
    steps = []
    while engine.has_unfinished():
        start = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - start)
    engine.close()
    return steps[:-2]  # the decode steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-tokens", type=int, default=33_000, help="prompt length (default 33000)")
    p.add_argument("--budgets", default="8192,2048", help="max_num_batched_tokens values, comma-separated")
    args = p.parse_args()
    for budget in (int(b) for b in args.budgets.split(",")):
        steps = prefill_steps(budget, args.prompt_tokens)
        print(f"max_num_batched_tokens={budget}: {len(steps)} prefill steps, {sum(steps):.1f} s in all, longest "
              f"{max(steps):.1f} s, last {steps[-1]:.1f} s", flush=True)


if __name__ == "__main__":
    main()
