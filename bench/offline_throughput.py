"""Offline throughput of the engine, and Hugging Face `generate` side by side.

nano-vLLM's workload: 256 requests, prompt and output lengths uniform in [100, 1024] (Python's
`random`, seed 0: 133,966 output tokens), random token ids, ignore_eos, temperature 0.6, on a
Qwen3-0.6B-shaped model with random bf16 weights. `--hf` also runs the fixed workload (256 x
512-token prompts, 256 new tokens, greedy) through Hugging Face and through the engine.

    python bench/offline_throughput.py [--model DIR] [--tensor-parallel-size N] [--enforce-eager] [--kv-cache-dtype fp8]
                                   [--hf]
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from typing import Any

import torch
from common import add_numerics_flags, numerics_kwargs, random_qwen3_0_6b

from engine import LLMEngine, SamplingParams


def nano_vllm_workload(num_seqs: int, seed: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """All prompts are drawn first, then all output lengths, as nano-vLLM's bench.py does."""
    rng = random.Random(seed)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(100, 1024))] for _ in range(num_seqs)]
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=rng.randint(100, 1024)) for _ in prompts]
    return prompts, params


def workload_engine(model: Path | None, **kwargs: Any) -> LLMEngine:
    """The engine nano-vLLM's workload runs on (4,096-token context, 256 sequences, 16k-token steps unless
    `kwargs` say otherwise; the random Qwen3-0.6B shape without `model`), warmed up."""
    kwargs = {"max_model_len": 4096, "max_num_seqs": 256, "max_num_batched_tokens": 16384, **kwargs}
    engine = LLMEngine(model or random_qwen3_0_6b(), **kwargs)
    engine.generate([[1, 2, 3]], max_tokens=8, use_tqdm=False)
    return engine


def fixed_workload(num_seqs: int = 256, prompt_len: int = 512, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 10000, (num_seqs, prompt_len), generator=g).tolist()


def timed_generate(engine: LLMEngine, prompts: list, params) -> tuple[float, int]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    results = engine.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    return time.perf_counter() - start, sum(len(r["token_ids"]) for r in results)


def hf_generate(model_dir: Path, prompts: list[list[int]], new_tokens: int) -> tuple[float, int]:
    from transformers import Qwen3ForCausalLM

    model = Qwen3ForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    input_ids = torch.tensor(prompts, device="cuda")
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    model.generate(input_ids[:, :16], **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    torch.cuda.synchronize()
    return time.perf_counter() - start, (out.shape[1] - input_ids.shape[1]) * out.shape[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="checkpoint dir (default: random Qwen3-0.6B shape, bf16)")
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs the model is split over")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    add_numerics_flags(p)
    p.add_argument("--hf", action="store_true", help="also run the fixed workload through HF generate and the engine")
    args = p.parse_args()

    model_dir = args.model or random_qwen3_0_6b()
    engine = workload_engine(model_dir, max_num_batched_tokens=args.max_num_batched_tokens,
                             enforce_eager=args.enforce_eager, tensor_parallel_size=args.tensor_parallel_size,
                             **numerics_kwargs(args))
    prompts, params = nano_vllm_workload(args.num_seqs, seed=0)
    seconds, output_tokens = timed_generate(engine, prompts, params)
    print(f"nano-vLLM workload, TP={args.tensor_parallel_size}"
          f"{', batch-invariant' if args.batch_invariant else ''}, KV {engine.config.kv_cache_dtype} "
          f"({engine.model_runner.num_kv_blocks} blocks): {len(prompts)} requests, "
          f"{sum(map(len, prompts))} prompt + {output_tokens} output tokens "
          f"in {seconds:.2f} s = {output_tokens / seconds:,.0f} output tok/s")
    if args.hf:
        fixed = fixed_workload()
        greedy = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=256)
        ours_s, ours_tokens = timed_generate(engine, fixed, greedy)
        engine.close()
        del engine
        torch.cuda.empty_cache()
        hf_s, hf_tokens = hf_generate(model_dir, fixed, 256)
        print(f"fixed 256 x (512 + 256): engine {ours_tokens / ours_s:,.0f} tok/s, HF generate "
              f"{hf_tokens / hf_s:,.0f} tok/s, ratio {(ours_tokens / ours_s) / (hf_tokens / hf_s):.1f}x")


if __name__ == "__main__":
    main()
