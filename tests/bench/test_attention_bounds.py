"""bench/attention_bounds.py's chunked decode gives the reference's attention, so its timings compare like with like.

On CPU its kernels run in Triton's interpreter, over float32 copies of the bench's caches (the interpreter's bf16
dots are wrong); the e4m3 cache runs as the bench runs it.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from kernels.paged_attention import paged_attention_ref
from kernels.triton_compat import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def bounds(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(BENCH))
    module = importlib.import_module("attention_bounds")
    monkeypatch.setattr(module, "DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
    yield module
    sys.modules.pop("attention_bounds", None)


# (keys a chunk, keys a tile, persistent programs an SM): chunks of one and of two tiles, fewer programs than items
SHAPES = [(16, 16, 1), (32, 16, 3)]


@pytest.mark.parametrize("chunk,block_n,per_sm", SHAPES)
def test_chunked_decode_matches_the_reference(bounds, chunk: int, block_n: int, per_sm: int) -> None:
    batch = bounds.Batch([40, 100, 7, 65, 16, 1])
    k, v, _ = batch.caches["bf16"]
    batch.caches["f32"] = (k.float(), v.float(), None)
    batch.query, batch.out = batch.query.float(), torch.full_like(batch.query, float("nan"), dtype=torch.float32)
    reference = {"f32": paged_attention_ref(batch.query, k.float(), v.float(), batch.starts, batch.seq_lens,
                                            batch.block_tables, bounds.D**-0.5)}
    k8, v8, scales = batch.caches["fp8"]
    reference["fp8"] = paged_attention_ref(batch.query, k8, v8, batch.starts, batch.seq_lens, batch.block_tables,
                                           bounds.D**-0.5, kv_scales=scales)
    for cache, tolerance in (("f32", 1e-5), ("fp8", 2e-2)):
        batch.out.fill_(float("nan"))
        batch.chunked(cache, chunk, block_n, 1, 2, per_sm)()
        assert (batch.out - reference[cache]).abs().max() < tolerance, cache
