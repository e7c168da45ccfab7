"""The sum over 3+ tensor-parallel ranks in the batch-invariant mode (engine/layers/tp_reduce.py): a row's sum is
rank 0 + 1 + 2 + 3 whatever else the message holds, where gloo's all-reduce adds a row's ranks in an order that
follows the message's size and the row's place in it (the negative controls)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine import LLMEngine, SamplingParams
from engine.layers.tp_reduce import all_reduce
from engine.tp.process_group import free_port
from tests.engine.test_hf_parity import random_prompts

WORLD, HIDDEN = 4, 64
LAYOUTS = [(rows, place) for rows in (1, 2, 3, 5, 8, 64) for place in sorted({0, rows // 2, rows - 1})]
CASES = [(torch.float32, True), (torch.bfloat16, True), (torch.float32, False)]  # (dtype, batch_invariant)


def rank_row(rank: int, dtype: torch.dtype) -> torch.Tensor:
    """Rank `rank`'s partial result for the row the test follows."""
    return (torch.randn(HIDDEN, generator=torch.Generator().manual_seed(rank)) * 3).to(dtype)


def sum_row_in_messages(rank: int, port: int, out: Path) -> None:
    """One rank: for each case, sum the row inside messages of every layout in LAYOUTS; save what it got."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    sums: dict[tuple[torch.dtype, bool], torch.Tensor] = {}
    for dtype, batch_invariant in CASES:
        per_layout = []
        for rows, place in LAYOUTS:
            x = torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(100 * rank + rows)).to(dtype)
            x[place] = rank_row(rank, dtype)
            per_layout.append(all_reduce(x, WORLD, batch_invariant)[place])
        sums[dtype, batch_invariant] = torch.stack(per_layout)
    torch.save(sums, out / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def row_sums(tmp_path_factory: pytest.TempPathFactory) -> list[dict[tuple[torch.dtype, bool], torch.Tensor]]:
    """Per rank, per case: the row's sums, [len(LAYOUTS), HIDDEN]; four gloo ranks started once."""
    out = tmp_path_factory.mktemp("row_sums")
    mp.spawn(sum_row_in_messages, args=(free_port(), out), nprocs=WORLD)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rank_order_sum_of_a_row_ignores_the_rest_of_the_message(
    dtype: torch.dtype, row_sums: list[dict[tuple[torch.dtype, bool], torch.Tensor]]
) -> None:
    total = rank_row(0, dtype).float()
    for rank in range(1, WORLD):
        total += rank_row(rank, dtype).float()
    expected = total.to(dtype).expand(len(LAYOUTS), HIDDEN)
    for rank, sums in enumerate(s[dtype, True] for s in row_sums):
        assert sums.dtype == dtype
        differ = {LAYOUTS[i]: int(n) for i, n in enumerate((sums != expected).sum(dim=1)) if n}
        assert not differ, f"rank {rank}: (rows, row's place) -> elements not the rank-order sum: {differ}"


def test_gloo_all_reduce_sum_of_a_row_follows_the_message(
    row_sums: list[dict[tuple[torch.dtype, bool], torch.Tensor]],
) -> None:
    """The negative control: without the mode the same row's sum changes with the message it travels in."""
    sums = row_sums[0][torch.float32, False]
    differ = {LAYOUTS[i]: int(n) for i, n in enumerate((sums != sums[0]).sum(dim=1)) if n}
    assert len(differ) > len(LAYOUTS) // 2, f"(rows, row's place) -> elements unlike the row alone: {differ}"


def test_tp4_request_is_bitwise_the_same_among_other_requests(tiny_checkpoint: Callable[..., Path]) -> None:
    """TP=4 in the batch-invariant mode: a request's tokens and logprobs are bitwise the same at another place in
    the step, beside other requests; without the mode its logprobs move (gloo's order follows the row's place).

    Every step keeps its size: on CPU, MKL's sgemm itself gives a row other bits when the step's row count
    changes (1 row against 2 or more), so alone against batched is for the GPU to check."""
    model_dir = tiny_checkpoint("untied-mha-hd32", vocab_size=1001)
    prompts = [[t % 1001 for t in p] for p in random_prompts(3, [9] * 7)]  # under a block: no prefix hits
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)
    batches, place = [prompts[:4], [prompts[4], prompts[5], prompts[0], prompts[6]]], [0, 2]
    for batch_invariant in (True, False):
        with LLMEngine(model_dir, device="cpu", dtype="float32", max_model_len=64, tensor_parallel_size=4,
                       batch_invariant=batch_invariant) as engine:
            first, second = (engine.generate(batch, params, use_tqdm=False)[i] for batch, i in zip(batches, place))
        assert first["token_ids"] == second["token_ids"]
        assert (first["logprobs"] == second["logprobs"]) == batch_invariant, f"batch_invariant={batch_invariant}"
