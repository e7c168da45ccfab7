"""Causal attention of a varlen batch over a paged KV cache.

One interface for decode, prefill, chunked prefill and prefix-cache hits: sequence i brings
q_len_i = query_start_loc[i+1] - query_start_loc[i] new tokens, which are the last q_len_i of
its seq_lens[i] tokens; all of them (cached context and new tokens) are already in the cache.
New token j attends causally to every token at or before its own position.
"""

from __future__ import annotations

import torch

from kernels.triton_compat import tl, triton

# A prefill tile: query rows (tokens x GQA heads) and keys. Measured on an H200 (16 x 2,048 tokens, bf16): 128
# rows 0.95 ms a layer, 64 rows 1.05, 16 rows 2.56 (bench/RESULTS.md). The batch-invariant mode takes the same
# keys per tile on every path and decode's rows (tl.dot's smallest M) in prefill too: with 128-row prefill tiles a
# token's output moved with the step's chunking on the H200 (bench/RESULTS.md, session 12).
PREFILL_ROWS, PREFILL_KEYS = 128, 64
INVARIANT_ROWS = 16


def decode_kv_splits(batch_size: int, num_kv_heads: int, num_sms: int) -> int:
    """Flash-decoding splits for a decode batch: enough programs for one on every SM (at most 16).

    Measured on an H200 without launch work (bench/attention_splits.py, bench/RESULTS.md), one layer at batches 8,
    16 and 32 with equal and with varied contexts: filling the GPU once took 4% less time in all than the two
    programs an SM used before with a bf16 cache and 11% less with FP8, whose tiles cost less, so a split's extra
    partial results and merge count for more."""
    programs = batch_size * num_kv_heads  # one per (sequence, KV head)
    splits = 1
    while splits < 16 and programs * splits < num_sms:
        splits *= 2
    return splits


def paged_attention(
    query: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    query_start_loc: torch.Tensor,  # [B + 1] int32
    seq_lens: torch.Tensor,  # [B] int32
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    scale: float,
    max_query_len: int,
    num_splits: int = 1,
    out: torch.Tensor | None = None,  # [T, Hq, D], written in place when given
    batch_invariant: bool = False,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,  # an FP8 cache's (k_scale, v_scale) [Hkv] float32
) -> torch.Tensor:  # [T, Hq, D]
    """Triton version of `paged_attention_ref`.

    One program per (sequence, query tile, KV head, KV split). A query tile packs BLOCK_Q new
    tokens times the GROUP query heads that share a KV head, so each K/V tile is read once per
    group (GQA). With num_splits > 1 (flash-decoding) each program covers a slice of the context
    and a second kernel merges the partial results by their log-sum-exp, so a small batch of long
    contexts still fills the GPU. `max_query_len` and `num_splits` are host-side launch shapes.

    With `kv_scales` the cache holds e4m3 values (kernels/fp8_kv.py): each tile is widened to float16 (exact, and one
    instruction per two values on Hopper, where bfloat16 takes three), the query is rounded to float16 (clamped to
    its range) and the probabilities too; the scores are scaled by the head's k_scale and the output by its v_scale.
    A float32 model widens to float32 instead.

    `batch_invariant`: one tile shape on every path (INVARIANT_ROWS rows, PREFILL_KEYS keys) and no KV split, so
    each query's keys are reduced in the same order whatever the step holds (engine/batch_invariance.py).
    """
    num_tokens, num_heads, head_dim = query.shape
    num_seqs = seq_lens.shape[0]
    assert num_splits & (num_splits - 1) == 0 and head_dim & (head_dim - 1) == 0, "powers of two only"
    assert query.stride(-1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    num_kv_heads, page = k_cache.shape[2], k_cache.shape[1]
    group = num_heads // num_kv_heads
    decode = max_query_len == 1
    assert not batch_invariant or num_splits == 1, "a KV split count that follows the batch breaks batch invariance"
    block_q = 1 if decode else max(1, (INVARIANT_ROWS if batch_invariant else PREFILL_ROWS) // group)
    block_n = PREFILL_KEYS
    if decode and not batch_invariant:
        # Decode reads each key once per GQA group: longer KV tiles keep more bytes in flight per program
        # (measured on an H200 with mixed context lengths: 1.14x the memory roofline at batch 128, 1.23x with 64).
        block_n = 128
    block_m = max(16, triton.next_power_of_2(block_q * group))
    num_q_tiles = triton.cdiv(max_query_len, block_q)
    out = torch.empty_like(query) if out is None else out
    if num_splits > 1:
        partial_out = torch.empty(num_splits, num_tokens, num_heads, head_dim, dtype=torch.float32, device=query.device)
        partial_lse = torch.empty(num_splits, num_tokens, num_heads, dtype=torch.float32, device=query.device)
    else:
        partial_out = partial_lse = out  # unused
    grid = (num_seqs * num_q_tiles, num_kv_heads, num_splits)
    k_scale, v_scale = kv_scales if kv_scales is not None else (seq_lens, seq_lens)  # unused without FP8
    _paged_attention_kernel[grid](
        query, k_cache, v_cache, out, partial_out, partial_lse, query_start_loc, seq_lens, block_tables, k_scale,
        v_scale, scale * 1.4426950408889634,  # log2(e): the kernel works in base 2
        query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1), num_tokens, num_q_tiles,
        GROUP=group, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n, PAGE=page,
        HEAD_DIM=head_dim, NUM_SPLITS=num_splits, DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        FP8=kv_scales is not None,
        **_loop_options(fp8=kv_scales is not None, decode=decode, block_n=block_n),
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_tokens, num_heads)](
            partial_out, partial_lse, out, num_tokens, num_heads, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, NUM_SPLITS=num_splits,
        )
    return out


def _loop_options(fp8: bool, decode: bool, block_n: int) -> dict[str, int | bool]:
    """How the KV loop runs: IDS_AHEAD (a constexpr), pipeline stages and a register cap (launch options).

    FP8 decode over 128-key tiles, measured on an H200 (batch 256 x 1,040 tokens, one layer; bench/RESULTS.md):
    the tile's K/V addresses come from a load of the block table in the same pass, and Triton's pipeliner then
    keeps one K/V tile in shared memory, whatever the stages; with each pass loading the next tile's block ids
    (IDS_AHEAD) and three stages, the next tile's K/V is in flight while one is used: 200 us against 206 for two
    stages capped at 168 registers (the best before). bf16 decode already reads at its bytes and lost with it (276
    against 260 us); the batch-invariant mode's 64-key tiles keep their loop."""
    if fp8 and decode and block_n == 128:
        return {"IDS_AHEAD": True, "num_stages": 3}
    return {"IDS_AHEAD": False, "num_stages": 2 if fp8 and decode else 3}


# Triton compiles a kernel again for each new value class (1, a multiple of 16, other) of every integer
# argument it specializes on; these vary with each step's batch, and one compile costs ~0.7 s mid-run.
@triton.jit(do_not_specialize=["stride_bt", "num_tokens", "num_q_tiles"])
def _paged_attention_kernel(
    Q, K_cache, V_cache, Out, Partial_out, Partial_lse, query_start_loc, seq_lens, block_tables, K_scale, V_scale,
    scale_log2, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_bt, stride_ot, stride_oh, num_tokens,
    num_q_tiles, GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, FP8: tl.constexpr, IDS_AHEAD: tl.constexpr,
):
    seq = tl.program_id(0) // num_q_tiles
    tile = tl.program_id(0) % num_q_tiles
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(query_start_loc + seq)
    q_len = tl.load(query_start_loc + seq + 1) - q_start
    if tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens + seq)
    context_len = seq_len - q_len

    # Rows of the tile: (query token, head within the GQA group) pairs.
    offs_m = tl.arange(0, BLOCK_M)
    q_idx = tile * BLOCK_Q + offs_m // GROUP
    head = kv_head * GROUP + offs_m % GROUP
    row_valid = (offs_m < BLOCK_Q * GROUP) & (q_idx < q_len)
    q_pos = context_len + q_idx  # absolute position of each row's token
    offs_d = tl.arange(0, HEAD_DIM)
    q_rows = (q_start + q_idx) * stride_qt + head * stride_qh
    q = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=row_valid[:, None], other=0.0)
    if FP8:  # stored keys are key / k_scale: the scores take the head's scale
        scale_log2 = scale_log2 * tl.load(K_scale + kv_head)
        if q.dtype != tl.float32:  # float16 dots: e4m3 widens to it in one instruction per pair
            q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)

    # Keys this tile can see: up to its last token's position; this split takes one slice of them.
    kv_end = tl.minimum(seq_len, context_len + (tile + 1) * BLOCK_Q)
    split_len = tl.cdiv(tl.cdiv(kv_end, BLOCK_N), NUM_SPLITS) * BLOCK_N
    kv_lo = split * split_len
    kv_hi = tl.minimum(kv_end, kv_lo + split_len)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    block_table = block_tables + seq * stride_bt
    if IDS_AHEAD:  # the first tile's block ids; each pass then loads the next tile's (see _loop_options)
        offs_next = kv_lo + tl.arange(0, BLOCK_N)
        ids_next = tl.load(block_table + offs_next // PAGE, mask=offs_next < kv_hi, other=0)
    for start in range(kv_lo, kv_hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_valid = offs_n < kv_hi
        if IDS_AHEAD:
            block_ids = ids_next
            ids_next = tl.load(block_table + (offs_n + BLOCK_N) // PAGE, mask=offs_n + BLOCK_N < kv_hi, other=0)
        else:
            block_ids = tl.load(block_table + offs_n // PAGE, mask=n_valid, other=0)
        kv_rows = block_ids * stride_kb + (offs_n % PAGE) * stride_ks + kv_head * stride_kh
        k = tl.load(K_cache + kv_rows[:, None] + offs_d[None, :], mask=n_valid[:, None], other=0.0).to(q.dtype)
        v = tl.load(V_cache + kv_rows[:, None] + offs_d[None, :], mask=n_valid[:, None], other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        visible = n_valid[None, :] & (offs_n[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet stay at zero
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if FP8:  # stored values are value / v_scale
        acc = acc * tl.load(V_scale + kv_head)
    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    if NUM_SPLITS == 1:
        o_rows = (q_start + q_idx) * stride_ot + head * stride_oh
        tl.store(Out + o_rows[:, None] + offs_d[None, :], out.to(Out.dtype.element_ty), mask=row_valid[:, None])
    else:
        num_heads = tl.num_programs(1) * GROUP
        p_rows = (split * num_tokens + q_start + q_idx) * num_heads + head
        tl.store(Partial_out + p_rows[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_valid[:, None])
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), float("-inf"))
        tl.store(Partial_lse + p_rows, lse, mask=row_valid)


@triton.jit(do_not_specialize=["num_tokens"])
def _merge_splits_kernel(
    Partial_out, Partial_lse, Out, num_tokens, num_heads, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    splits = tl.arange(0, NUM_SPLITS)
    lse = tl.load(Partial_lse + (splits * num_tokens + t) * num_heads + h)  # [S], base 2
    weights = tl.exp2(lse - tl.max(lse, 0))
    offs_d = tl.arange(0, HEAD_DIM)
    rows = (splits * num_tokens + t) * num_heads + h
    partial = tl.load(Partial_out + rows[:, None] * HEAD_DIM + offs_d[None, :])  # [S, D]
    out = tl.sum(partial * weights[:, None], 0) / tl.sum(weights, 0)
    tl.store(Out + t * stride_ot + h * stride_oh + offs_d, out.to(Out.dtype.element_ty))


REF_QUERY_TILE = 256  # queries per tile in the torch reference (see paged_attention_ref)


def paged_attention_ref(
    query: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    query_start_loc: torch.Tensor,  # [B + 1] int32, cumulative query lengths
    seq_lens: torch.Tensor,  # [B] int32, context + new tokens per sequence
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    scale: float,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,  # an FP8 cache's (k_scale, v_scale) [Hkv]
) -> torch.Tensor:  # [T, Hq, D]
    """Reference implementation: gathers each sequence's K/V (an FP8 cache's times its scales) and attends in
    float32.

    Queries go in tiles of REF_QUERY_TILE, each against the keys up to its last position only: the
    scores of a long prefill chunk over a long context would otherwise be one [Hq, q_len, seq_len]
    tensor (4 GiB for 8k queries over 32k keys and 4 heads), which makes CPU steps slow and large.
    """
    out = torch.empty_like(query)
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = query.shape[1] // num_kv_heads
    starts = query_start_loc.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        q = query[starts[i] : starts[i + 1]].float()  # [q_len, Hq, D]
        num_blocks = -(-seq_len // block_size)
        blocks = block_tables[i, :num_blocks].long()
        k = k_cache[blocks].flatten(0, 1)[:seq_len].float()  # [S, Hkv, D]
        v = v_cache[blocks].flatten(0, 1)[:seq_len].float()
        if kv_scales is not None:
            k, v = k * kv_scales[0][:, None], v * kv_scales[1][:, None]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # [S, Hq, D]
        first_pos = seq_len - q.shape[0]  # position of the chunk's first query
        for t in range(0, q.shape[0], REF_QUERY_TILE):
            q_tile = q[t : t + REF_QUERY_TILE]
            end = first_pos + t + q_tile.shape[0]  # keys the tile's last query sees
            scores = torch.einsum("qhd,khd->hqk", q_tile, k[:end]) * scale
            q_pos = torch.arange(end - q_tile.shape[0], end, device=q.device).unsqueeze(1)
            k_pos = torch.arange(end, device=q.device).unsqueeze(0)
            scores.masked_fill_(k_pos > q_pos, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            out[starts[i] + t : starts[i] + t + q_tile.shape[0]] = torch.einsum(
                "hqk,khd->qhd", probs, v[:end]
            ).to(query.dtype)
    return out
