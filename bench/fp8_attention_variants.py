"""Decode attention over an FP8 KV cache: how to widen e4m3 tiles for the dot, and how many stages to pipeline.

One layer of decode at batch 256 x 1,040 tokens (Qwen3-0.6B's 16 query / 8 KV heads, head_dim 128, 16-token pages,
scattered blocks), timed for the engine's kernel (bf16 cache, FP8 cache) and for a decode-only copy of its loop in
four widening modes, each over tile lengths and pipeline stages:
  0  a bf16 cache, no widening (the baseline: how close a tile loop comes to its bytes)
  1  e4m3 -> bf16 (`.to`; Hopper converts through float16 and float32)
  2  e4m3 -> float16 (one cvt per pair); the query clamped into float16, the probabilities float16
  3  e4m3 bits moved into bf16 bits with integer ops (value x 2^-120; the 2^120 folded into the scales)
  4  as 2, but V read as int16 pairs and widened by inline PTX (cvt.rn.f16x2.e4m3x2) before its trip through
     shared memory, so the second dot reads 16-bit values with ldmatrix instead of one byte per load (rows loop)
The grid may put KV heads first (`--heads-first`), so a sequence's heads are read together. The FP8 modes may read
values stored along each block's tokens (`--values-along-keys`: [blocks, KV heads, D, tokens], the layout commit
4f1cad9 gave the engine's FP8 cache; slower on the H200, so reverted); K and V may be stored heads outside tokens
(`--heads-outer`: [blocks, KV heads, tokens, D], each page of a head contiguous). `--loop` picks the copy:
  rows          the engine's loop: the GQA group's query rows are the dots' M (16 rows, 2 real for Qwen3-0.6B)
  keys-as-m     the keys are the dots' M (S^T = K q^T), which Triton gives Hopper's wgmma
  values-ahead  each V tile loaded a tile ahead into registers (widened there, or in mode 4 kept as e4m3 pairs
                and widened at use), the tile's cache rows computed a pass ahead, so V reaches the dot through
                16-bit shared memory (ldmatrix.trans) instead of one byte per load: a third fewer instructions,
                yet no faster on the H200 (200 us at best, as the engine's loop; RESULTS.md)
`--ids-ahead` has each pass of the rows loop load the next tile's block ids, as the engine's FP8 decode loop
does (kernels/paged_attention.py: then Triton stages the next K/V tile while one is used). `--maxnreg N` also
times each variant with its registers capped. Kernel times exclude the host's launch work
(`time_cuda(hide_launch=True)`).
`--sass` needs no GPU: it compiles each variant for sm_90 and prints registers, spills and the instructions that
decide this loop's cost (V's byte loads, widenings, moves), so a variant can be judged before a device call.

    python bench/fp8_attention_variants.py [--loop rows|keys-as-m|values-ahead] [--heads-first]
                                           [--values-along-keys | --heads-outer] [--ids-ahead] [--maxnreg N]
                                           [--modes 2,4]
    TRITON_INTERPRET=0 python bench/fp8_attention_variants.py --sass [--loop ...] [--maxnreg N]
"""

from __future__ import annotations

import argparse
import collections
import itertools
import re
import subprocess
import tempfile
from functools import partial
from pathlib import Path

import torch
from common import copy_bandwidth, time_cuda

from kernels.paged_attention import paged_attention
from kernels.triton_compat import tl, triton

BATCH, CONTEXT, HQ, HKV, HEAD_DIM, PAGE, SCALE = 256, 1040, 16, 8, 128, 16, 0.02


@triton.jit
def _widen(x, dtype, MODE: tl.constexpr):
    if MODE == 3:
        x = x.to(tl.int16)
        return (((x & 0x80) << 8) | ((x & 0x7F) << 4)).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _widen_pairs(pairs):
    """[rows, cols] int16, each two e4m3 values of a row, as float16 [rows, 2 * cols]. Inline PTX, so Triton
    cannot move the widening after the tile's trip through shared memory (it moves a plain `.to` there)."""
    lo, hi = tl.inline_asm_elementwise(
        "{ .reg .b32 t; cvt.rn.f16x2.e4m3x2 t, $2; mov.b32 {$0, $1}, t; }", "=h,=h,h", [pairs],
        dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
    return tl.reshape(tl.join(lo, hi), (pairs.shape[0], 2 * pairs.shape[1]))


@triton.jit
def _tile_rows(block_tables, seq, stride_bt, start, seq_len, kv_head, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
               HKV: tl.constexpr):
    """Cache rows of the tile's keys (the [blocks, tokens, KV heads, D] layout) and which of them exist."""
    offs_n = start + tl.arange(0, BLOCK_N)
    n_valid = offs_n < seq_len
    block_ids = tl.load(block_tables + seq * stride_bt + offs_n // PAGE, mask=n_valid, other=0)
    return (block_ids * PAGE + offs_n % PAGE) * HKV + kv_head, n_valid


@triton.jit
def _values_along_keys(V, block_tables, seq, stride_bt, start, seq_len, kv_head, BLOCK_N: tl.constexpr,
                       PAGE: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr):
    """The tile's values, [D, BLOCK_N], from V stored [blocks, KV heads, D, PAGE]: rows run along the keys, PAGE
    bytes at a time."""
    pages = start // PAGE + tl.arange(0, BLOCK_N // PAGE)
    page_ids = tl.load(block_tables + seq * stride_bt + pages, mask=pages * PAGE < seq_len, other=0)
    v_t = tl.load(V + tl.arange(0, D)[:, None, None] * PAGE + ((page_ids * HKV + kv_head) * D * PAGE)[None, :, None]
                  + tl.arange(0, PAGE)[None, None, :], mask=(pages * PAGE < seq_len)[None, :, None], other=0.0)
    return tl.reshape(v_t, (D, BLOCK_N))


@triton.jit
def _group_query(Q, seq_lens, GROUP: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, MODE: tl.constexpr,
                 HEADS_FIRST: tl.constexpr):
    """The program's sequence, its length and KV head, and its GQA group's query rows padded to tl.dot's 16."""
    if HEADS_FIRST:
        seq, kv_head = tl.program_id(1), tl.program_id(0)
    else:
        seq, kv_head = tl.program_id(0), tl.program_id(1)
    offs_m = tl.arange(0, 16)
    head = kv_head * GROUP + offs_m % GROUP
    row_valid = offs_m < GROUP
    offs_d = tl.arange(0, D)
    q = tl.load(Q + (seq * HKV * GROUP + head)[:, None] * D + offs_d[None, :], mask=row_valid[:, None], other=0.0)
    if MODE == 2 or MODE == 4:
        q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
    return seq, tl.load(seq_lens + seq), kv_head, head, row_valid, q


@triton.jit
def _attend(q, k, v, n_valid, m_i, l_i, acc, score_scale):
    """One tile of online softmax: the scores, the running maximum and sum, the rescaled output."""
    s = tl.where(n_valid[None, :], tl.dot(q, tl.trans(k)) * score_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)


@triton.jit
def _decode_kernel(Q, K, V, Out, seq_lens, block_tables, k_scale, v_scale, scale_log2, stride_bt,
                   GROUP: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, HKV: tl.constexpr,
                   D: tl.constexpr, MODE: tl.constexpr, HEADS_FIRST: tl.constexpr, V_T: tl.constexpr,
                   HEADS_OUTER: tl.constexpr, IDS_AHEAD: tl.constexpr):
    seq, seq_len, kv_head, head, row_valid, q = _group_query(Q, seq_lens, GROUP, HKV, D, MODE, HEADS_FIRST)
    offs_d = tl.arange(0, D)
    m_i = tl.full([16], float("-inf"), tl.float32)
    l_i = tl.zeros([16], tl.float32)
    acc = tl.zeros([16, D], tl.float32)
    if IDS_AHEAD:
        ids_next = tl.load(block_tables + seq * stride_bt + tl.arange(0, BLOCK_N) // PAGE,
                           mask=tl.arange(0, BLOCK_N) < seq_len, other=0)
    for start in range(0, seq_len, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_valid = offs_n < seq_len
        if IDS_AHEAD:  # the engine's FP8 decode loop (kernels/paged_attention.py)
            block_ids = ids_next
            ids_next = tl.load(block_tables + seq * stride_bt + (offs_n + BLOCK_N) // PAGE,
                               mask=offs_n + BLOCK_N < seq_len, other=0)
        else:
            block_ids = tl.load(block_tables + seq * stride_bt + offs_n // PAGE, mask=n_valid, other=0)
        if HEADS_OUTER:  # [blocks, KV heads, PAGE, D]: a page of one head is PAGE * D contiguous elements
            rows = (block_ids * HKV + kv_head) * PAGE + offs_n % PAGE
        else:
            rows = (block_ids * PAGE + offs_n % PAGE) * HKV + kv_head
        k = _widen(tl.load(K + rows[:, None] * D + offs_d[None, :], mask=n_valid[:, None], other=0.0), q.dtype, MODE)
        if MODE == 4:
            v = _widen_pairs(tl.load(V + rows[:, None] * (D // 2) + tl.arange(0, D // 2)[None, :],
                                     mask=n_valid[:, None], other=0))
        elif V_T:
            v_t = _values_along_keys(V, block_tables, seq, stride_bt, start, seq_len, kv_head, BLOCK_N, PAGE, HKV, D)
            v = tl.trans(_widen(v_t, q.dtype, MODE))
        else:
            v = _widen(tl.load(V + rows[:, None] * D + offs_d[None, :], mask=n_valid[:, None], other=0.0), q.dtype,
                       MODE)
        m_i, l_i, acc = _attend(q, k, v, n_valid, m_i, l_i, acc, scale_log2 * k_scale)
    out = acc * v_scale / l_i[:, None]
    tl.store(Out + (seq * HKV * GROUP + head)[:, None] * D + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=row_valid[:, None])


@triton.jit
def _keys_as_m_kernel(Q, K, V, Out, seq_lens, block_tables, k_scale, v_scale, scale_log2, stride_bt,
                      GROUP: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, HKV: tl.constexpr,
                      D: tl.constexpr, MODE: tl.constexpr, HEADS_FIRST: tl.constexpr, V_T: tl.constexpr):
    """The same loop with the keys as the dots' M (S^T = K q^T, O^T = V^T P^T), so Hopper's wgmma takes them."""
    seq, seq_len, kv_head, head, row_valid, q = _group_query(Q, seq_lens, GROUP, HKV, D, MODE, HEADS_FIRST)
    q_t = tl.trans(q)  # [D, 16]
    offs_d = tl.arange(0, D)
    m_i = tl.full([16], float("-inf"), tl.float32)
    l_i = tl.zeros([16], tl.float32)
    acc = tl.zeros([D, 16], tl.float32)
    for start in range(0, seq_len, BLOCK_N):
        rows, n_valid = _tile_rows(block_tables, seq, stride_bt, start, seq_len, kv_head, BLOCK_N, PAGE, HKV)
        k = tl.load(K + rows[:, None] * D + offs_d[None, :], mask=n_valid[:, None], other=0.0).to(q_t.dtype)
        s = tl.dot(k, q_t) * (scale_log2 * k_scale)  # [BLOCK_N, 16]
        s = tl.where(n_valid[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        p = tl.exp2(s - m_new[None, :])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)
        if V_T:
            v_t = _values_along_keys(V, block_tables, seq, stride_bt, start, seq_len, kv_head, BLOCK_N, PAGE, HKV,
                                     D).to(q_t.dtype)
        else:
            v_t = tl.trans(tl.load(V + rows[:, None] * D + offs_d[None, :], mask=n_valid[:, None], other=0.0))
            v_t = v_t.to(q_t.dtype)
        acc = acc * alpha[None, :] + tl.dot(v_t, p.to(q_t.dtype))
        m_i = m_new
    out = acc * v_scale / l_i[None, :]
    tl.store(Out + (seq * HKV * GROUP + head)[None, :] * D + offs_d[:, None], out.to(Out.dtype.element_ty),
             mask=row_valid[None, :])


@triton.jit
def _values_ahead_kernel(Q, K, V, Out, seq_lens, block_tables, k_scale, v_scale, scale_log2, stride_bt,
                         GROUP: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, HKV: tl.constexpr,
                         D: tl.constexpr, MODE: tl.constexpr, HEADS_FIRST: tl.constexpr, V_T: tl.constexpr):
    """The rows loop with each V tile loaded a tile ahead into registers: Triton's pipeliner then leaves V alone,
    and V reaches the dot through 16-bit shared memory (ldmatrix.trans) instead of one byte per load. Modes 0 and 2
    widen V as it arrives (held widened across a pass); mode 4 holds the tile's e4m3 pairs and widens them by
    inline PTX at use. The tile's cache rows are also computed a pass ahead, so K's addresses never wait on a load
    of the same pass and Triton stages K in shared memory."""
    seq, seq_len, kv_head, head, row_valid, q = _group_query(Q, seq_lens, GROUP, HKV, D, MODE, HEADS_FIRST)
    offs_d = tl.arange(0, D)
    m_i = tl.full([16], float("-inf"), tl.float32)
    l_i = tl.zeros([16], tl.float32)
    acc = tl.zeros([16, D], tl.float32)
    rows_next, valid_next = _tile_rows(block_tables, seq, stride_bt, 0, seq_len, kv_head, BLOCK_N, PAGE, HKV)
    v_next = _values_raw(V, rows_next, valid_next, D, MODE, q.dtype)
    for start in range(0, seq_len, BLOCK_N):
        rows, n_valid, v = rows_next, valid_next, v_next
        rows_next, valid_next = _tile_rows(block_tables, seq, stride_bt, start + BLOCK_N, seq_len, kv_head, BLOCK_N,
                                           PAGE, HKV)
        v_next = _values_raw(V, rows_next, valid_next, D, MODE, q.dtype)
        k = tl.load(K + rows[:, None] * D + offs_d[None, :], mask=n_valid[:, None], other=0.0).to(q.dtype)
        if MODE == 4:
            v = _widen_pairs(v)
        m_i, l_i, acc = _attend(q, k, v, n_valid, m_i, l_i, acc, scale_log2 * k_scale)
    out = acc * v_scale / l_i[:, None]
    tl.store(Out + (seq * HKV * GROUP + head)[:, None] * D + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=row_valid[:, None])


@triton.jit
def _values_raw(V, rows, n_valid, D: tl.constexpr, MODE: tl.constexpr, dtype: tl.constexpr):
    """A V tile as loaded a pass ahead: int16 e4m3 pairs in mode 4, else widened to the dots' type."""
    if MODE == 4:
        v = tl.load(V + rows[:, None] * (D // 2) + tl.arange(0, D // 2)[None, :], mask=n_valid[:, None], other=0)
    else:
        v = tl.load(V + rows[:, None] * D + tl.arange(0, D)[None, :], mask=n_valid[:, None], other=0.0).to(dtype)
    return v


LOOPS = {  # --loop: the kernel, its widening modes, its warp counts
    "rows": (_decode_kernel, range(5), (4,)),
    "keys-as-m": (_keys_as_m_kernel, (0, 2), (4, 8)),
    "values-ahead": (_values_ahead_kernel, (0, 2, 4), (4,)),
}


def sass_summary(kernel, mode: int, constexprs: dict, options: dict) -> str:
    """Registers, spill stack and the instructions that matter here in its main loop, from the kernel compiled for
    sm_90 by Triton's own ptxas (no GPU needed: TRITON_INTERPRET=0)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cache = {0: "*bf16", 3: "*u8"}.get(mode, "*fp8e4nv")
    types = {"Q": "*bf16", "K": cache, "V": "*i16" if mode == 4 else cache, "Out": "*bf16", "seq_lens": "*i32",
             "block_tables": "*i32", "k_scale": "fp32", "v_scale": "fp32", "scale_log2": "fp32", "stride_bt": "i32"}
    signature = {name: types.get(name, "constexpr") for name in kernel.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
               if types.get(name, "").startswith("*")}  # as Triton marks them at launch
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs, attrs=aligned),
                              target=GPUTarget("cuda", 90, 32), options=options)
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([tools / "cuobjdump", "-res-usage", cubin], capture_output=True, text=True).stdout
        sass = subprocess.run([tools / "nvdisasm", "-c", cubin], capture_output=True, text=True).stdout
    body = _loop_body(sass)
    counts = {name: sum(n for op, n in body.items() if op.startswith(prefixes)) for name, prefixes in
              (("byte loads", "LDS.U8"), ("e4m3 widenings", "F2FP.F16.E4M3"), ("register moves", "IMAD.MOV"),
               ("byte permutes", "PRMT"), ("ldmatrix", "LDSM"), ("mma", ("HMMA", "HGMMA")), ("spills", ("STL", "LDL")))}
    registers = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    listed = ", ".join(f"{n} {name}" for name, n in counts.items())
    return (f"{registers[1]} registers, {registers[2]}-byte stack, {compiled.metadata.shared} bytes of shared "
            f"memory; each of its {options.get('num_warps', 4)} warps issues {sum(body.values())} instructions a "
            f"tile: {listed}")


def _loop_body(sass: str) -> collections.Counter:
    """Opcodes of the longest loop in nvdisasm's listing: the instructions from a label to a branch back to it
    (the pipelined main loop, one tile per pass)."""
    labels, instructions, loops = {}, [], []
    for line in sass.splitlines():
        if label := re.match(r"(\.L_x_\d+):", line):
            labels[label[1]] = len(instructions)
        elif op := re.match(r"\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)", line):
            instructions.append(op[1])
            target = re.search(r"BRA\s+`\((\.L_x_\d+)\)", line)
            if target and target[1] in labels:
                loops.append(instructions[labels[target[1]]:])
    return collections.Counter(max(loops, key=len, default=[]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loop", choices=LOOPS, default="rows",
                   help="which copy of the loop: query rows as the dots' M (the engine's), keys as M, or values "
                        "loaded a tile ahead into registers")
    p.add_argument("--heads-first", action="store_true", help="grid (KV heads, sequences) instead of the reverse")
    p.add_argument("--values-along-keys", action="store_true", help="FP8 values as [blocks, KV heads, D, tokens]")
    p.add_argument("--heads-outer", action="store_true",
                   help="K and V as [blocks, KV heads, tokens, D] (rows loop only; not with --values-along-keys)")
    p.add_argument("--ids-ahead", action="store_true",
                   help="each pass loads the next tile's block ids (rows loop only; the engine's FP8 decode loop)")
    p.add_argument("--maxnreg", type=int, help="also time each variant with its registers capped at this many")
    p.add_argument("--modes", type=lambda text: [int(m) for m in text.split(",")],
                   help="widening modes to run, comma-separated (default: all of the loop's)")
    p.add_argument("--sass", action="store_true",
                   help="no GPU: compile each variant for sm_90 and print its registers and key instruction counts "
                        "(run with TRITON_INTERPRET=0)")
    args = p.parse_args()
    kernel, modes, warps = LOOPS[args.loop]
    modes = args.modes or modes
    layout = {"HEADS_OUTER": args.heads_outer, "IDS_AHEAD": args.ids_ahead} if args.loop == "rows" else {}
    variants = [
        (mode, block_n, stages, num_warps, maxnreg,
         dict(GROUP=HQ // HKV, BLOCK_N=block_n, PAGE=PAGE, HKV=HKV, D=HEAD_DIM, MODE=mode,
              HEADS_FIRST=args.heads_first, V_T=args.values_along_keys and mode > 0, **layout),
         dict(num_stages=stages, num_warps=num_warps, **({} if maxnreg is None else {"maxnreg": maxnreg})))
        for mode, block_n, stages, num_warps, maxnreg in itertools.product(
            modes, (64, 128), (1, 2, 3), warps, dict.fromkeys((None, args.maxnreg)))
    ]
    if args.sass:
        for mode, block_n, stages, num_warps, maxnreg, constexprs, options in variants:
            print(f"{_name(mode, block_n, stages, num_warps, maxnreg)}: "
                  f"{sass_summary(kernel, mode, constexprs, options)}")
        return

    bandwidth = copy_bandwidth()
    g = torch.Generator(device="cuda").manual_seed(0)
    num_blocks = BATCH * CONTEXT // PAGE
    k16, v16 = (torch.randn(num_blocks, PAGE, HKV, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
                for _ in range(2))
    k8, v8 = ((x / SCALE).clamp(-448, 448).to(torch.float8_e4m3fn) for x in (k16, v16))
    q = torch.randn(BATCH, HQ, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    block_tables = torch.randperm(num_blocks, device="cuda", generator=g).int().view(BATCH, -1)
    seq_lens = torch.full((BATCH,), CONTEXT, dtype=torch.int32, device="cuda")
    starts = torch.arange(BATCH + 1, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    scales = (torch.full((HKV,), SCALE, device="cuda"), torch.full((HKV,), SCALE, device="cuda"))
    reference = {}
    for name, (k, v, kv_scales) in {"bf16": (k16, v16, None), "fp8": (k8, v8, scales)}.items():
        t = time_cuda(partial(paged_attention, q, k, v, starts, seq_lens, block_tables, HEAD_DIM**-0.5, 1, out=out,
                              kv_scales=kv_scales), iters=50, hide_launch=True)
        reference[name] = out.clone()
        roofline = 2 * k.numel() * k.element_size() / bandwidth
        print(f"engine kernel, {name} cache: {t * 1e6:.1f} us ({t / roofline:.2f}x its bytes)")
    grid = (HKV, BATCH) if args.heads_first else (BATCH, HKV)
    for mode, block_n, stages, num_warps, maxnreg, constexprs, options in variants:
        k, v = (k16, v16) if mode == 0 else (k8, v8)
        if args.heads_outer:
            k, v = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
        if constexprs["V_T"]:  # commit 4f1cad9's FP8 layout, measured slower and reverted (bench/RESULTS.md)
            v = v.permute(0, 2, 3, 1).contiguous()
        if mode == 3:
            k, v = k.view(torch.uint8), v.view(torch.uint8)
        if mode == 4:
            v = v.view(torch.int16)  # two e4m3 values of a row in each element
        scale = 1.0 if mode == 0 else SCALE * (2.0**120 if mode == 3 else 1.0)
        launch = partial(kernel[grid], q, k, v, out, seq_lens, block_tables, scale, scale,
                         HEAD_DIM**-0.5 * 1.4426950408889634, block_tables.stride(0), **constexprs, **options)
        t = time_cuda(launch, iters=30, hide_launch=True)
        compiled = launch()
        error = (out.float() - reference["bf16" if mode == 0 else "fp8"].float()).abs().max().item()
        print(f"{_name(mode, block_n, stages, num_warps, maxnreg)}: {t * 1e6:.1f} us "
              f"({t * bandwidth / (2 * k.numel() * k.element_size()):.2f}x its bytes; {compiled.n_regs} registers, "
              f"{compiled.n_spills} spilled, {compiled.metadata.shared} bytes of shared memory), "
              f"max difference from the engine's kernel {error:.2g}")


def _name(mode: int, block_n: int, stages: int, num_warps: int, maxnreg: int | None) -> str:
    return (f"mode {mode}, {block_n}-key tiles, {stages} stages, {num_warps} warps"
            + ("" if maxnreg is None else f", at most {maxnreg} registers"))


if __name__ == "__main__":
    main()
