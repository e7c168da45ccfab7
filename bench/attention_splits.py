"""Decode attention alone, per KV split count: which flash-decoding split each batch size should use.

For Qwen3-0.6B's attention shape (16 query heads, 8 KV heads, head_dim 128, bf16, 16-token pages) and
each batch size and context length (equal for all sequences, or varied: one long sequence holds up a
whole unsplit batch), times `paged_attention` for one decode token per sequence at every
split count (the kernels' time, the host's launch work left out as in a CUDA graph), against the time to read
the batch's K and V once at the measured copy bandwidth. Prints the fastest split and the one the engine picks
(`decode_kv_splits`).

    python bench/attention_splits.py [--contexts 1024,varied] [--kv-cache-dtype fp8]
"""

from __future__ import annotations

import argparse
import functools

import torch
from common import context_lengths, copy_bandwidth, time_cuda

from kernels.paged_attention import decode_kv_splits, paged_attention

HEADS, KV_HEADS, HEAD_DIM, PAGE = 16, 8, 128, 16
BATCHES = (1, 8, 16, 32, 48, 64, 96, 128, 192, 256)
SPLITS = (1, 2, 4, 8, 16)


def time_attention(lengths: list[int], fp8: bool) -> dict[int, float]:
    """Seconds per call of decode attention over `lengths`-token contexts, per split count in SPLITS; with `fp8`
    the cache holds e4m3 values (unit scales)."""
    batch_size, context = len(lengths), max(lengths)
    blocks_per_seq = -(-context // PAGE)
    num_blocks = batch_size * blocks_per_seq
    dt = torch.bfloat16
    k_cache = torch.randn(num_blocks, PAGE, KV_HEADS, HEAD_DIM, device="cuda", dtype=dt)
    v_cache = torch.randn_like(k_cache)
    kv_scales = None
    if fp8:
        k_cache, v_cache = k_cache.to(torch.float8_e4m3fn), v_cache.to(torch.float8_e4m3fn)
        kv_scales = (torch.ones(KV_HEADS, device="cuda"), torch.ones(KV_HEADS, device="cuda"))
    block_tables = torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(batch_size, blocks_per_seq)
    query = torch.randn(batch_size, HEADS, HEAD_DIM, device="cuda", dtype=dt)
    query_start_loc = torch.arange(batch_size + 1, device="cuda", dtype=torch.int32)
    seq_lens = torch.tensor(lengths, device="cuda", dtype=torch.int32)
    out = torch.empty_like(query)
    return {splits: time_cuda(lambda splits=splits: paged_attention(
        query, k_cache, v_cache, query_start_loc, seq_lens, block_tables, HEAD_DIM**-0.5, 1, splits, out=out,
        kv_scales=kv_scales,
    ), iters=30, before=_flush_l2, hide_launch=True) for splits in SPLITS}


@functools.cache
def _l2_flush_buffer() -> torch.Tensor:
    return torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")


def _flush_l2() -> None:
    """Evict the cache's pages from L2 (50 MiB on an H200), as the model's other 27 layers would."""
    _l2_flush_buffer().zero_()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="1024,varied",
                   help="comma-separated context lengths; 'varied': each sequence's uniform in [128, 2048]")
    p.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                   help="the cache's dtype: the model's (bf16) or e4m3 (one byte an element)")
    args = p.parse_args()
    fp8 = args.kv_cache_dtype == "fp8"
    bandwidth = copy_bandwidth()
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    kv_bytes_per_token = 2 * KV_HEADS * HEAD_DIM * (1 if fp8 else 2)  # one layer, K and V
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s, {num_sms} SMs; microseconds per layer, "
          f"(x roofline) for splits {SPLITS}")
    for context in args.contexts.split(","):
        for batch_size in BATCHES:
            lengths = context_lengths(batch_size, context)
            roofline = sum(lengths) * kv_bytes_per_token / bandwidth
            times = time_attention(lengths, fp8)
            best = min(times, key=times.__getitem__)
            chosen = decode_kv_splits(batch_size, KV_HEADS, num_sms)
            cells = " ".join(f"{1e6 * t:7.1f} ({t / roofline:4.1f}x)" for t in times.values())
            print(f"context {context:>6} batch {batch_size:4d}: {cells}  best {best:2d}, heuristic {chosen:2d} "
                  f"({times[chosen] / times[best]:.2f}x the best)")


if __name__ == "__main__":
    main()
