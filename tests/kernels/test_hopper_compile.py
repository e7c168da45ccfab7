"""Every Triton kernel variant the engine launches compiles for a Hopper GPU (sm_90), on a machine without one.

The CPU tests run the kernels in Triton's interpreter, which accepts code the GPU compiler rejects (a variable
re-bound to another shape inside an `if`, say): that cost a device call once. Triton's compiler needs no GPU,
so CI compiles each variant down to machine code here. It runs in a subprocess: the interpreter, chosen when
the kernel modules are imported, replaces the compiled kernels in the test process. TRITON_INTERPRET=0 asks
for Triton without its interpreter (`kernels/triton_compat.py` imports it only where a kernel can run).

    TRITON_INTERPRET=0 python -m tests.kernels.test_hopper_compile   # the same check by hand
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels.triton_compat import HAS_TRITON

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not HAS_TRITON, reason="no Triton")
def test_every_kernel_variant_compiles_for_hopper() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-m", "tests.kernels.test_hopper_compile"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "compiled" in result.stdout


def _variants() -> list[tuple[object, dict[str, str], dict[str, object]]]:
    """(kernel, signature of its runtime arguments, constexprs) for each variant the wrappers launch."""
    from kernels import exponential_noise, paged_attention, rms_norm, rotary_kv_store, silu_and_mul, skinny_matmul

    def pointers(dtype: str, *names: str) -> dict[str, str]:
        return {name: f"*{dtype}" for name in names}

    variants = []
    for dtype in ("bf16", "fp32"):
        def attention_signature(cache: str, dtype: str = dtype) -> dict[str, str]:
            return {
                **pointers(dtype, "Q", "Out"), **pointers(cache, "K_cache", "V_cache"),
                **pointers("fp32", "Partial_out", "Partial_lse", "K_scale", "V_scale"),
                **pointers("i32", "query_start_loc", "seq_lens", "block_tables"), "scale_log2": "fp32",
                **dict.fromkeys(["stride_qt", "stride_qh", "stride_kb", "stride_ks", "stride_kh", "stride_bt",
                                 "stride_ot", "stride_oh", "num_tokens", "num_q_tiles"], "i32"),
            }

        precision = "ieee" if dtype == "fp32" else "tf32"
        # decode, prefill (both modes); the batch-invariant mode's decode, and its prefill in 16-row tiles; each
        # over the model's dtype and over an FP8 cache
        for (block_q, block_m, block_n, splits), fp8 in itertools.product(
            ((1, 16, 128, 1), (1, 16, 128, 8), (64, 128, 64, 1), (1, 16, 64, 1), (8, 16, 64, 1)), (False, True)
        ):
            variants.append((paged_attention._paged_attention_kernel, attention_signature("fp8e4nv" if fp8 else dtype),
                             dict(GROUP=2, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n, PAGE=16, HEAD_DIM=128,
                                  NUM_SPLITS=splits, DOT_PRECISION=precision, FP8=fp8)))
        variants.append((paged_attention._merge_splits_kernel, {
            **pointers("fp32", "Partial_out", "Partial_lse"), "Out": f"*{dtype}",
            **dict.fromkeys(["num_tokens", "num_heads", "stride_ot", "stride_oh"], "i32"),
        }, dict(HEAD_DIM=128, NUM_SPLITS=8)))
        for heads, norm, fp8 in ((1, True, False), (8, True, False), (8, False, False), (8, True, True)):
            variants.append((rotary_kv_store._rotary_kv_store_kernel, {
                **pointers(dtype, "QKV", "Wq", "Wk", "Q"),
                **pointers("fp8e4nv" if fp8 else dtype, "K_cache", "V_cache"),
                **pointers("fp32", "Cos", "Sin", "K_scale", "V_scale"), **pointers("i64", "positions", "slot_mapping"),
                "stride_t": "i32", "eps": "fp32",
            }, dict(NUM_HEADS=16, NUM_KV_HEADS=8, HALF=64, HAS_NORM=norm, HEADS=heads, FP8=fp8, E4M3_MAX=448.0)))
        for residual in (True, False):
            variants.append((rms_norm._rms_norm_kernel, {
                **pointers(dtype, "X", "R", "W", "Out", "R_out"), "stride_x": "i32", "stride_r": "i32",
                "hidden": "i32", "eps": "fp32",
            }, dict(HAS_RESIDUAL=residual, BLOCK=1024)))
        variants.append((silu_and_mul._silu_and_mul_kernel, {**pointers(dtype, "X", "Out"), "stride_x": "i32",
                                                              "size": "i32"}, dict(BLOCK=1024)))
        # skinny_config's choices, split (the default) and unsplit (the batch-invariant mode); a ragged K; gated
        for block_n, block_k, split_k, even_k, gated in (
            (32, 128, 1, True, False), (64, 128, 1, True, False), (32, 256, 4, True, False),
            (32, 256, 2, True, False), (16, 128, 1, True, False), (32, 128, 1, False, False),
            (32, 128, 1, True, True), (16, 256, 2, True, True),
        ):
            variants.append((skinny_matmul._skinny_matmul_kernel, {
                **pointers(dtype, "X", "W", "Out"), "Partial": "*fp32", "Counters": "*i32",
                **dict.fromkeys(["num_rows", "n", "k", "stride_x"], "i32"),
            }, dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, EVEN_K=even_k, GATED=gated,
                    DOT_PRECISION=precision)))
        variants.append((exponential_noise._exponential_race_kernel, {
            "Logits": f"*{dtype}", "stride_row": "i32", **pointers("i64", "keys", "rows", "BestIds"),
            "temperatures": "*fp32", "Best": "*fp32", "vocab_size": "i32", "tiny": "fp32", "num_chunks": "i32",
        }, dict(QUARTER=1024)))
    variants.append((exponential_noise._exponential_noise_kernel, {
        **pointers("i64", "keys", "rows"), "Out": "*fp32", "stride_row": "i32", "vocab_size": "i32", "tiny": "fp32",
    }, dict(QUARTER=1024)))
    return variants


def _loop_options(kernel: object, constexprs: dict[str, object]) -> tuple[dict[str, object], dict[str, int]]:
    """The variant's constexprs with those the wrapper adds for its loop, and the stages and register cap it
    launches with (Triton's defaults elsewhere)."""
    from kernels import paged_attention

    if kernel is not paged_attention._paged_attention_kernel:
        return constexprs, {}
    chosen = paged_attention._loop_options(fp8=constexprs["FP8"], decode=constexprs["BLOCK_Q"] == 1,
                                           block_n=constexprs["BLOCK_N"])
    names = kernel.arg_names  # type: ignore[attr-defined]
    return ({**constexprs, **{k: v for k, v in chosen.items() if k in names}},
            {k: v for k, v in chosen.items() if k not in names})


def _runtime_divisibility(kernel: object, signature: dict[str, str]) -> dict[tuple[int, ...], list]:
    """What Triton learns at launch on a GPU, marked here too so the variant compiled is the one that runs (its
    loads vectorised and pipelined, which the GPU compiler may reject where the plain variant passes): tensors
    start 16-byte aligned, and the strides it specialises on are multiples of 16 for the engine's shapes."""
    names = kernel.arg_names  # type: ignore[attr-defined]
    unspecialised = {names[i] if isinstance(i, int) else i for i in kernel.do_not_specialize}  # type: ignore[attr-defined]
    return {(i,): [["tt.divisibility", 16]] for i, (name, kind) in enumerate(signature.items())
            if kind.startswith("*") or (name.startswith("stride") and name not in unspecialised)}


def compile_all() -> None:
    assert HAS_TRITON, "Triton is not imported here: set TRITON_INTERPRET=0 (or run on a GPU)"
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    variants = _variants()
    for kernel, signature, constexprs in variants:
        constexprs, options = _loop_options(kernel, constexprs)
        names = kernel.arg_names  # type: ignore[attr-defined]
        full = {name: signature.get(name, "constexpr") for name in names}
        missing = [n for n in names if n not in signature and n not in constexprs]
        assert not missing, f"{kernel.__name__}: no type for {missing}"  # type: ignore[attr-defined]
        triton.compile(ASTSource(kernel, full, constexprs=constexprs, attrs=_runtime_divisibility(kernel, full)),
                       target=target, options=options)
    print(f"compiled {len(variants)} kernel variants for sm_90")


if __name__ == "__main__":
    compile_all()
