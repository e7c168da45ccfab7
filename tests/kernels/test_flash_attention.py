"""The flash-attn adapter against the torch reference, through a stand-in of flash-attn's documented
contract (flash-attn itself needs a CUDA build; the real package is exercised where it is installed)."""

from __future__ import annotations

import pytest
import torch

import kernels.flash_attention as flash
from kernels.paged_attention import paged_attention_ref
from tests import flash_attn_stand_in
from tests.kernels.test_paged_attention import make_batch, relative_error


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "flash_attn", flash_attn_stand_in.module)
    monkeypatch.setattr(flash, "HAS_FLASH_ATTN", True)


@pytest.mark.parametrize("q_lens,context_lens", [([1, 1, 1], [255, 256, 700]), ([37, 300, 1], [0, 212, 511])])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2)])
def test_flash_paged_attention_matches_reference(
    stand_in: None, q_lens: list[int], context_lens: list[int], num_heads: int, num_kv_heads: int
) -> None:
    batch = make_batch(q_lens, context_lens, num_heads, num_kv_heads, 64, 256, torch.float32, seed=1)
    out = flash.flash_paged_attention(
        batch["query"], batch["k_cache"], batch["v_cache"], batch["query_start_loc"], batch["seq_lens"],
        batch["block_tables"], batch["scale"], max_query_len=max(q_lens), max_seq_len=1024,
    )
    assert relative_error(out, paged_attention_ref(**batch)) < 1e-5


def test_flash_attn_needs_pages_of_a_multiple_of_256(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flash, "HAS_FLASH_ATTN", True)
    assert flash.flash_attn_supports(256) and flash.flash_attn_supports(512)
    assert not flash.flash_attn_supports(16) and not flash.flash_attn_supports(128)
    monkeypatch.setattr(flash, "HAS_FLASH_ATTN", False)
    assert not flash.flash_attn_supports(256)
