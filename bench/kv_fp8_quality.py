"""What an FP8 KV cache costs in accuracy: every position's logits against a float32 reference (float32 weights and
KV cache), for the model's dtype with its own KV cache and with an FP8 one.

Each configuration prefills the same random token sequences whole (so attention reads back the keys and values the
step just stored, in the cache's dtype) and keeps the logits of every position: max and mean absolute logit error,
mean KL(reference || configuration) of the next-token distributions, and greedy top-1 agreement.

    python bench/kv_fp8_quality.py [--model DIR] [--sequences 8] [--length 256]

Without --model: on a GPU the Qwen3-0.6B shape with random weights (bench/common.py), on CPU the embedded tiny Qwen3.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from engine import LLMEngine
from engine.layers.attention import AttentionMetadata


@torch.inference_mode()
def all_logits(engine: LLMEngine, tokens: torch.Tensor) -> torch.Tensor:
    """Float32 logits [L, vocab] of every position of `tokens` [L], from one prefill into blocks 0, 1, ..."""
    runner, device, block = engine.model_runner, engine.config.device, engine.config.block_size
    length = len(tokens)
    num_blocks = -(-length // block)
    metadata = AttentionMetadata(
        slot_mapping=torch.arange(length, device=device),
        query_start_loc=torch.tensor([0, length], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([length], dtype=torch.int32, device=device),
        block_tables=torch.arange(num_blocks, dtype=torch.int32, device=device)[None],
        max_query_len=length,
    )
    hidden = runner.model(tokens.to(device), torch.arange(length, device=device), metadata)
    return runner.model.compute_logits(hidden).float().cpu()


def compare(reference: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    ref_logp, logp = reference.log_softmax(-1), logits.log_softmax(-1)
    return {
        "max |logit error|": (logits - reference).abs().max().item(),
        "mean |logit error|": (logits - reference).abs().mean().item(),
        "mean KL": (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().item(),
        "top-1 agreement": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path)
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--length", type=int, default=256)
    args = p.parse_args()
    on_gpu = torch.cuda.is_available()
    model = args.model
    if model is None and on_gpu:
        from common import random_qwen3_0_6b

        model = random_qwen3_0_6b()
    dtype = "bfloat16" if on_gpu else "float32"
    configs = {"reference": ("float32", "auto"), f"{dtype} weights, {dtype} KV": (dtype, "auto"),
               f"{dtype} weights, fp8 KV": (dtype, "fp8")}
    if not on_gpu:  # float32 there is the reference itself
        del configs["float32 weights, float32 KV"]
    g = torch.Generator().manual_seed(0)
    results: dict[str, torch.Tensor] = {}
    for name, (weights, kv) in configs.items():
        engine = LLMEngine(model, dtype=weights, kv_cache_dtype=kv, max_model_len=args.length, enforce_eager=True,
                           gpu_memory_utilization=0.3, num_kv_blocks=-(-args.length // 16))
        vocab = engine.config.model_config.vocab_size
        g.manual_seed(0)
        sequences = [torch.randint(0, vocab, (args.length,), generator=g) for _ in range(args.sequences)]
        results[name] = torch.cat([all_logits(engine, tokens) for tokens in sequences])
        engine.close()
    reference = results.pop("reference")
    print(f"{args.sequences} x {args.length} positions, against float32 weights and KV cache:")
    for name, logits in results.items():
        print(f"  {name:32s} " + ", ".join(f"{k} {v:.4g}" for k, v in compare(reference, logits).items()))


if __name__ == "__main__":
    main()
