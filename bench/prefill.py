"""Prefill throughput: 16 prompts of 2048 tokens, and the fraction of the measured bf16 matmul peak.

    python bench/prefill.py [--model DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import add_numerics_flags, bf16_matmul_peak, numerics_kwargs, random_qwen3_0_6b

from engine import LLMEngine, SamplingParams


def prefill_flops(engine: LLMEngine, num_prompts: int, prompt_len: int) -> float:
    """Matmul FLOPs: 2 per weight per token (the LM head only for each prompt's last token) + causal attention."""
    m = engine.config.model_config
    layer_weights = m.hidden_size * (m.num_attention_heads + 2 * m.num_key_value_heads) * m.head_dim
    layer_weights += m.num_attention_heads * m.head_dim * m.hidden_size + 3 * m.hidden_size * m.intermediate_size
    tokens = num_prompts * prompt_len
    attention = 2 * 2 * m.num_attention_heads * m.head_dim * (prompt_len * prompt_len / 2) * num_prompts
    return 2 * tokens * layer_weights * m.num_hidden_layers + attention * m.num_hidden_layers \
        + 2 * num_prompts * m.hidden_size * m.vocab_size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path)
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    add_numerics_flags(p)
    args = p.parse_args()
    engine = LLMEngine(args.model or random_qwen3_0_6b(), max_model_len=4096,
                       max_num_batched_tokens=args.max_num_batched_tokens, **numerics_kwargs(args))
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    for _ in range(2):  # the first run compiles kernels
        prompts = torch.randint(0, 10000, (args.num_prompts, args.prompt_len), generator=g).tolist()
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    tokens = args.num_prompts * args.prompt_len
    flops = prefill_flops(engine, args.num_prompts, args.prompt_len)
    peak = bf16_matmul_peak()
    print(f"prefill {args.num_prompts} x {args.prompt_len}: {tokens / seconds:,.0f} tok/s, "
          f"{flops / seconds / 1e12:.0f} TFLOP/s = {flops / seconds / peak:.0%} of the measured bf16 matmul peak "
          f"({peak / 1e12:.0f} TFLOP/s)")


if __name__ == "__main__":
    main()
