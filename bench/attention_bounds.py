"""What bounds decode attention: its loop's compute, its access pattern's bytes, or its launch shape.

One layer of decode over Qwen3-0.6B's attention shape (16 query / 8 KV heads, head_dim 128, 16-token pages), a bf16
and an FP8 cache, batch 256 x 1,040 tokens unless said. Four measurements (kernel time only, launch work hidden):
  compute  the engine's kernel with the whole cache in L2 (every block table over 512 blocks): the loop's own cost
           per tile, with DRAM out of the way; then the same over a cache of distinct blocks
  bytes    the same access pattern (scattered pages, 128-key tiles, block ids a pass ahead) with the softmax and V's
           transposed operand left out: each K and V tile is widened and fed to a dot along its head dimension, so
           Triton stages it in shared memory as the engine's loop does; how fast the pattern itself can be read
  shapes   the engine's kernel under other launch shapes (keys a tile, warps, stages), at equal and at varied
           (128-2,048) contexts and several batches, the KV split as the engine picks it
  chunks   a chunked decode against the engine's kernel: every context cut into chunks of at most C keys, a
           persistent grid walking the list of (chunk, KV head) that each program derives from the sequence
           lengths, then a merge of each sequence's chunks; so no program's work exceeds C keys, which a one-warp
           program needs with varied contexts (bench/NOTES.md)

    python bench/attention_bounds.py [--only compute|bytes|shapes|chunks]
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from common import context_lengths, copy_bandwidth, time_cuda

import kernels.paged_attention as pa
from kernels.triton_compat import tl, triton

HQ, HKV, D, PAGE, SCALE, CONTEXT = 16, 8, 128, 16, 0.02, 1040
DEVICE = "cuda"  # tests/bench/test_attention_bounds.py runs the kernels on CPU, in Triton's interpreter
# (keys a tile, warps, stages, block ids a pass ahead): the engine's FP8 and bf16 decode shapes first.
SHAPES = [(128, 4, 3, True), (128, 4, 3, False), (32, 1, 3, True), (32, 1, 4, True), (64, 2, 3, True),
          (32, 2, 3, True)]
# Chunked decode (`_chunk_kernel`): (keys a chunk, keys a tile, warps, stages, persistent programs an SM).
CHUNKED = [(256, 32, 1, 3, 12), (512, 32, 1, 3, 12), (128, 32, 1, 3, 12), (256, 32, 1, 4, 12), (256, 32, 1, 3, 8),
           (256, 32, 1, 3, 24), (256, 64, 2, 3, 6), (512, 64, 2, 3, 6), (256, 128, 4, 3, 3)]


@triton.jit
def _read_kernel(K, V, Out, block_tables, seq_len, stride_bt, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
                 HKV: tl.constexpr, D: tl.constexpr):
    """The decode loop's reads alone: each tile of K and of V widened and summed by a dot along D."""
    seq, kv_head = tl.program_id(0), tl.program_id(1)
    dtype: tl.constexpr = tl.bfloat16 if K.dtype.element_ty == tl.bfloat16 else tl.float16
    offs_d = tl.arange(0, D)
    offs_j = tl.arange(0, BLOCK_N)
    ones = tl.full([16, D], 1.0, dtype)
    acc = tl.zeros([16, BLOCK_N], tl.float32)
    ids_next = tl.load(block_tables + seq * stride_bt + offs_j // PAGE)
    for start in range(0, seq_len, BLOCK_N):
        offs_n = start + offs_j
        n_valid = offs_n < seq_len
        block_ids = ids_next
        ids_next = tl.load(block_tables + seq * stride_bt + (offs_n + BLOCK_N) // PAGE,
                           mask=offs_n + BLOCK_N < seq_len, other=0)
        rows = (block_ids * PAGE + offs_n % PAGE) * HKV + kv_head
        k = tl.load(K + rows[:, None] * D + offs_d[None, :], mask=n_valid[:, None], other=0.0).to(dtype)
        v = tl.load(V + rows[:, None] * D + offs_d[None, :], mask=n_valid[:, None], other=0.0).to(dtype)
        acc += tl.dot(ones, tl.trans(k)) + tl.dot(ones, tl.trans(v))
    tl.store(Out + (seq * HKV + kv_head) * BLOCK_N + offs_j, tl.sum(acc, 0))


@triton.jit
def _chunks(seq_lens, num_seqs, CHUNK: tl.constexpr, B_PAD: tl.constexpr):
    """Each sequence's chunk count (at most CHUNK keys a chunk) and where its chunks end in the list of all."""
    offs_b = tl.arange(0, B_PAD)
    counts = tl.cdiv(tl.load(seq_lens + offs_b, mask=offs_b < num_seqs, other=0), CHUNK)
    return offs_b, counts, tl.cumsum(counts, 0)


@triton.jit(do_not_specialize=["num_seqs"])
def _chunk_kernel(Q, K, V, Partial_out, Partial_lse, seq_lens, block_tables, num_seqs, K_scale, V_scale, scale_log2,
                  stride_bt, GROUP: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                  CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, B_PAD: tl.constexpr, FP8: tl.constexpr):
    """Decode attention in chunks of at most CHUNK keys, so no program's work exceeds that bound: a persistent grid
    walks the list of (chunk, KV head), chunk-major, and writes each chunk's result and base-2 log-sum-exp for
    `_merge_chunks_kernel`. Each program derives the list from `seq_lens` (a prefix sum over the batch), so the
    grid does not follow the batch's lengths and a CUDA graph can replay it."""
    offs_b, counts, ends = _chunks(seq_lens, num_seqs, CHUNK, B_PAD)
    offs_m = tl.arange(0, 16)
    row_valid = offs_m < GROUP
    offs_d = tl.arange(0, D)
    offs_j = tl.arange(0, BLOCK_N)
    for item in range(tl.program_id(0), tl.sum(counts, 0) * HKV, tl.num_programs(0)):
        chunk = item // HKV
        kv_head = item % HKV
        seq = tl.sum((ends <= chunk).to(tl.int32), 0)
        lo = (chunk - tl.sum(tl.where(offs_b < seq, counts, 0), 0)) * CHUNK
        hi = tl.minimum(tl.load(seq_lens + seq), lo + CHUNK)
        head = kv_head * GROUP + offs_m % GROUP
        q = tl.load(Q + (seq * HKV * GROUP + head)[:, None] * D + offs_d[None, :], mask=row_valid[:, None],
                    other=0.0)
        score_scale = scale_log2
        if FP8:
            score_scale = scale_log2 * tl.load(K_scale + kv_head)
            q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
        m_i = tl.full([16], float("-inf"), tl.float32)
        l_i = tl.zeros([16], tl.float32)
        acc = tl.zeros([16, D], tl.float32)
        block_table = block_tables + seq * stride_bt
        ids_next = tl.load(block_table + (lo + offs_j) // PAGE, mask=lo + offs_j < hi, other=0)
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + offs_j
            n_valid = offs_n < hi
            block_ids = ids_next
            ids_next = tl.load(block_table + (offs_n + BLOCK_N) // PAGE, mask=offs_n + BLOCK_N < hi, other=0)
            rows = (block_ids * PAGE + offs_n % PAGE) * HKV + kv_head
            k = tl.load(K + rows[:, None] * D + offs_d[None, :], mask=n_valid[:, None], other=0.0).to(q.dtype)
            v = tl.load(V + rows[:, None] * D + offs_d[None, :], mask=n_valid[:, None], other=0.0).to(q.dtype)
            s = tl.where(n_valid[None, :], tl.dot(q, tl.trans(k)) * score_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        if FP8:
            acc = acc * tl.load(V_scale + kv_head)
        rows_out = chunk * HKV * GROUP + head
        tl.store(Partial_out + rows_out[:, None] * D + offs_d[None, :], acc / l_i[:, None], mask=row_valid[:, None])
        tl.store(Partial_lse + rows_out, m_i + tl.log2(l_i), mask=row_valid)


@triton.jit(do_not_specialize=["num_seqs"])
def _merge_chunks_kernel(Partial_out, Partial_lse, Out, seq_lens, num_seqs, HQ: tl.constexpr, D: tl.constexpr,
                         CHUNK: tl.constexpr, B_PAD: tl.constexpr):
    """Out[seq, head]: the sequence's chunks merged by their log-sum-exp (one program per sequence and head)."""
    seq, head = tl.program_id(0), tl.program_id(1)
    offs_b, counts, ends = _chunks(seq_lens, num_seqs, CHUNK, B_PAD)
    first = tl.sum(tl.where(offs_b < seq, counts, 0), 0)
    offs_d = tl.arange(0, D)
    m = float("-inf")
    total = 0.0
    acc = tl.zeros([D], tl.float32)
    for chunk in range(first, first + tl.cdiv(tl.load(seq_lens + seq), CHUNK)):
        lse = tl.load(Partial_lse + chunk * HQ + head)
        m_new = tl.maximum(m, lse)
        old, new = tl.exp2(m - m_new), tl.exp2(lse - m_new)
        acc = acc * old + tl.load(Partial_out + (chunk * HQ + head) * D + offs_d) * new
        total = total * old + new
        m = m_new
    tl.store(Out + (seq * HQ + head) * D + offs_d, (acc / tl.maximum(total, 1e-30)).to(Out.dtype.element_ty))


class Batch:
    """A decode batch over a cache of `num_blocks` pages (each sequence's pages distinct unless the cache is
    smaller than the batch's pages, then drawn at random), bf16 and FP8 copies of K and V."""

    def __init__(self, lengths: list[int], num_blocks: int | None = None, seed: int = 0) -> None:
        g = torch.Generator(device=DEVICE).manual_seed(seed)
        pages = [-(-n // PAGE) for n in lengths]
        width = max(pages) + 16
        needed = sum(pages)
        num_blocks = num_blocks or needed
        if num_blocks >= needed:
            ids = torch.randperm(num_blocks, device=DEVICE, generator=g).int()
            self.block_tables = torch.zeros(len(lengths), width, dtype=torch.int32, device=DEVICE)
            start = 0
            for i, n in enumerate(pages):
                self.block_tables[i, :n] = ids[start:start + n]
                start += n
        else:
            self.block_tables = torch.randint(0, num_blocks, (len(lengths), width), dtype=torch.int32, device=DEVICE,
                                              generator=g)
        self.seq_lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
        self.starts = torch.arange(len(lengths) + 1, dtype=torch.int32, device=DEVICE)
        self.query = torch.randn(len(lengths), HQ, D, device=DEVICE, dtype=torch.bfloat16, generator=g)
        self.out = torch.empty_like(self.query)
        k, v = (torch.randn(num_blocks, PAGE, HKV, D, device=DEVICE, dtype=torch.bfloat16, generator=g)
                for _ in range(2))
        self.caches = {"bf16": (k, v, None),
                       "fp8": ((k / SCALE).clamp(-448, 448).to(torch.float8_e4m3fn),
                               (v / SCALE).clamp(-448, 448).to(torch.float8_e4m3fn),
                               (torch.full((HKV,), SCALE, device=DEVICE), torch.full((HKV,), SCALE, device=DEVICE)))}
        self.tokens = sum(lengths)

    def kv_bytes(self, cache: str) -> int:
        return 2 * self.tokens * HKV * D * self.caches[cache][0].element_size()

    def engine(self, cache: str):
        k, v, scales = self.caches[cache]
        return partial(pa.paged_attention, self.query, k, v, self.starts, self.seq_lens, self.block_tables,
                       D**-0.5, 1, out=self.out, kv_scales=scales)

    def shaped(self, cache: str, splits: int, block_n: int, warps: int, stages: int, ids_ahead: bool):
        """The engine's kernel (and merge) launched as `paged_attention` does, in another launch shape."""
        k, v, scales = self.caches[cache]
        q, out, n = self.query, self.out, self.query.shape[0]
        partial_out = torch.empty(splits, n, HQ, D, dtype=torch.float32, device=DEVICE) if splits > 1 else out
        partial_lse = torch.empty(splits, n, HQ, dtype=torch.float32, device=DEVICE) if splits > 1 else out
        k_scale, v_scale = scales if scales is not None else (self.seq_lens, self.seq_lens)

        def launch() -> None:
            pa._paged_attention_kernel[(n, HKV, splits)](
                q, k, v, out, partial_out, partial_lse, self.starts, self.seq_lens, self.block_tables, k_scale,
                v_scale, D**-0.5 * 1.4426950408889634, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                k.stride(2), self.block_tables.stride(0), out.stride(0), out.stride(1), n, 1,
                GROUP=HQ // HKV, BLOCK_Q=1, BLOCK_M=16, BLOCK_N=block_n, PAGE=PAGE, HEAD_DIM=D, NUM_SPLITS=splits,
                DOT_PRECISION="tf32", FP8=scales is not None, IDS_AHEAD=ids_ahead, num_warps=warps,
                num_stages=stages)
            if splits > 1:
                pa._merge_splits_kernel[(n, HQ)](partial_out, partial_lse, out, n, HQ, out.stride(0), out.stride(1),
                                                 HEAD_DIM=D, NUM_SPLITS=splits)
        return launch


    def chunked(self, cache: str, chunk: int, block_n: int, warps: int, stages: int, per_sm: int):
        """`_chunk_kernel` on `per_sm` persistent programs an SM, then `_merge_chunks_kernel`, with partial results
        sized for the batch's chunks (the engine would size them for its whole cache)."""
        device = self.seq_lens.device
        programs = per_sm * (torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda"
                             else 1)
        k, v, scales = self.caches[cache]
        n = len(self.seq_lens)
        num_chunks = int(((self.seq_lens + chunk - 1) // chunk).sum())
        partial_out = torch.empty(num_chunks, HQ, D, dtype=torch.float32, device=DEVICE)
        partial_lse = torch.empty(num_chunks, HQ, dtype=torch.float32, device=DEVICE)
        k_scale, v_scale = scales if scales is not None else (self.seq_lens, self.seq_lens)
        b_pad = triton.next_power_of_2(n)

        def launch() -> None:
            _chunk_kernel[(programs,)](
                self.query, k, v, partial_out, partial_lse, self.seq_lens, self.block_tables, n, k_scale, v_scale,
                D**-0.5 * 1.4426950408889634, self.block_tables.stride(0), GROUP=HQ // HKV, HKV=HKV, D=D, PAGE=PAGE,
                CHUNK=chunk, BLOCK_N=block_n, B_PAD=b_pad, FP8=scales is not None, num_warps=warps,
                num_stages=stages)
            _merge_chunks_kernel[(n, HQ)](partial_out, partial_lse, self.out, self.seq_lens, n, HQ=HQ, D=D,
                                          CHUNK=chunk, B_PAD=b_pad)
        return launch


def compute(bandwidth: float) -> None:
    for where, num_blocks in (("whole cache in L2 (512 blocks)", 512), ("distinct blocks", None)):
        batch = Batch([CONTEXT] * 256, num_blocks)
        for cache in ("bf16", "fp8"):
            t = time_cuda(batch.engine(cache), iters=30, hide_launch=True)
            print(f"compute: engine kernel, {cache} cache, {where}: {t * 1e6:.1f} us "
                  f"({t * bandwidth / batch.kv_bytes(cache):.2f}x the bytes' time from DRAM)")


def bytes_alone(bandwidth: float) -> None:
    batch = Batch([CONTEXT] * 256)
    out = torch.empty(256 * HKV * 128, device=DEVICE)
    for cache in ("bf16", "fp8"):
        k, v, _ = batch.caches[cache]
        for block_n, stages in ((64, 3), (128, 2), (128, 3)):
            launch = partial(_read_kernel[(256, HKV)], k, v, out, batch.block_tables, CONTEXT,
                             batch.block_tables.stride(0), BLOCK_N=block_n, PAGE=PAGE, HKV=HKV, D=D,
                             num_stages=stages, num_warps=4)
            t = time_cuda(launch, iters=30, hide_launch=True)
            print(f"bytes: the pattern alone, {cache} cache, {block_n}-key tiles, {stages} stages: {t * 1e6:.1f} us "
                  f"({t * bandwidth / batch.kv_bytes(cache):.2f}x its bytes)")


def _batches():
    """(batch size, contexts, Batch) of the shapes and chunks measurements: equal and varied contexts."""
    for size in (256, 128, 64, 16):
        for contexts in (str(CONTEXT), "varied"):
            yield size, contexts, Batch(context_lengths(size, contexts))


def shapes(bandwidth: float) -> None:
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    for size, contexts, batch in _batches():
        splits = pa.decode_kv_splits(size, HKV, num_sms)
        for cache in ("fp8", "bf16"):
            cells, reference = [], None
            for block_n, warps, stages, ids_ahead in SHAPES:
                t = time_cuda(batch.shaped(cache, splits, block_n, warps, stages, ids_ahead), iters=30,
                              hide_launch=True)
                if reference is None:
                    reference = batch.out.clone()
                assert (batch.out.float() - reference.float()).abs().max() < 0.01, "a shape changed the result"
                ahead = "" if ids_ahead else ", ids in the pass"
                cells.append(f"{block_n}/{warps}w/{stages}s{ahead} {t * 1e6:.1f} "
                             f"({t * bandwidth / batch.kv_bytes(cache):.2f}x)")
            print(f"shapes: {cache} batch {size} {contexts} contexts, {splits} split(s): " + " | ".join(cells))


def chunks(bandwidth: float) -> None:
    for size, contexts, batch in _batches():
        for cache in ("fp8", "bf16"):
            engine_time = time_cuda(batch.engine(cache), iters=30, hide_launch=True)
            reference = batch.out.clone()
            cells = [f"engine {engine_time * 1e6:.1f} ({engine_time * bandwidth / batch.kv_bytes(cache):.2f}x)"]
            for chunk, block_n, warps, stages, per_sm in CHUNKED:
                launch = batch.chunked(cache, chunk, block_n, warps, stages, per_sm)
                t = time_cuda(launch, iters=30, hide_launch=True)
                error = (batch.out.float() - reference.float()).abs().max().item()
                assert error < 0.01, f"chunked decode differs from the engine's kernel by {error}"
                cells.append(f"{chunk}/{block_n}/{warps}w/{stages}s/{per_sm} an SM {t * 1e6:.1f} "
                             f"({t * bandwidth / batch.kv_bytes(cache):.2f}x)")
            print(f"chunks: {cache} batch {size} {contexts} contexts: " + " | ".join(cells))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("compute", "bytes", "shapes", "chunks"), help="run one of the measurements")
    args = p.parse_args()
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; keys a tile / warps / stages, us a layer (x its bytes)")
    for name, run in (("compute", compute), ("bytes", bytes_alone), ("shapes", shapes), ("chunks", chunks)):
        if args.only in (None, name):
            run(bandwidth)


if __name__ == "__main__":
    main()
