"""Scheduler + BlockManager stepped without a model: batch order, budgets, chunking, preemption, accounting."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch, Scheduler
from engine.sequence import Sequence, SequenceStatus
from engine.stopping import check_stop

REPO_ROOT = Path(__file__).resolve().parents[2]
BS = 4  # block size
SAMPLED = 7  # the token every fake sample returns
NO_EOS: frozenset[int] = frozenset()

Step = list[tuple[str, int]]  # (request_id, num_new_tokens) for each scheduled sequence


def make_scheduler(num_blocks: int, max_num_seqs: int = 8, max_num_batched_tokens: int = 64) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BS), max_num_seqs, max_num_batched_tokens)


def make_seq(request_id: str, arrival: int, prompt: list[int] | range, max_tokens: int) -> Sequence:
    """A waiting request that stops after exactly `max_tokens` sampled tokens."""
    tokens = list(prompt)
    return Sequence(
        request_id=request_id, arrival=arrival, token_ids=tokens, num_prompt_tokens=len(tokens),
        params=SamplingParams(max_tokens=max_tokens, ignore_eos=True), seed=0,
    )


def process(scheduler: Scheduler, batch: ScheduledBatch) -> None:
    """What LLMEngine._process does with a batch, with every sample being SAMPLED."""
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        seq.num_computed_tokens += n
        scheduler.block_manager.commit(seq)
        if seq.num_computed_tokens < seq.num_tokens:
            continue
        seq.token_ids.append(SAMPLED)
        if check_stop(seq, SAMPLED, seq.num_tokens, NO_EOS) is not None:
            scheduler.finish(seq)


def step(scheduler: Scheduler) -> Step:
    batch = scheduler.schedule()
    scheduled = [(seq.request_id, n) for seq, n in zip(batch.seqs, batch.num_new_tokens)]
    process(scheduler, batch)
    return scheduled


def run_until_done(scheduler: Scheduler, max_steps: int = 200) -> list[Step]:
    steps: list[Step] = []
    while scheduler.has_unfinished():
        assert len(steps) < max_steps, f"not done after {max_steps} steps: {steps[-5:]}"
        steps.append(step(scheduler))
    return steps


def assert_no_block_referenced(scheduler: Scheduler) -> None:
    bm = scheduler.block_manager
    assert not scheduler.has_unfinished()
    assert all(block.ref_count == 0 for block in bm.blocks)
    assert bm.num_free_blocks == bm.num_blocks


def assert_completed(*seqs: Sequence) -> None:
    for seq in seqs:
        assert seq.is_finished and seq.block_table == []
        assert seq.output_token_ids == [SAMPLED] * seq.params.max_tokens


# ---- batch order and budgets ------------------------------------------------------------------


def test_decodes_are_scheduled_before_prefills() -> None:
    scheduler = make_scheduler(num_blocks=16, max_num_batched_tokens=8)
    young = make_seq("young", 1, [1, 2], max_tokens=5)
    scheduler.add(young)
    assert step(scheduler) == [("young", 2)]
    old = make_seq("old", 0, range(20), max_tokens=2)  # an older request (say, a resubmission) arrives late
    scheduler.add(old)
    assert step(scheduler) == [("young", 1), ("old", 7)]
    assert scheduler.running == [old, young]  # running stays in arrival order
    assert step(scheduler) == [("young", 1), ("old", 7)]
    assert step(scheduler) == [("young", 1), ("old", 6)]
    assert run_until_done(scheduler) == [[("old", 1), ("young", 1)]]  # decodes run oldest first
    assert_completed(young, old)


def test_long_prompts_are_prefilled_in_exact_chunks() -> None:
    scheduler = make_scheduler(num_blocks=16, max_num_batched_tokens=8)
    a, b = make_seq("a", 0, range(21), max_tokens=2), make_seq("b", 1, range(100, 110), max_tokens=2)
    scheduler.add(a)
    scheduler.add(b)
    assert run_until_done(scheduler) == [
        [("a", 8)],
        [("a", 8)],
        [("a", 5), ("b", 3)],
        [("a", 1), ("b", 7)],
        [("b", 1)],
    ]
    assert_completed(a, b)
    assert_no_block_referenced(scheduler)


def test_chunk_stops_at_the_free_blocks() -> None:
    scheduler = make_scheduler(num_blocks=3, max_num_batched_tokens=64)
    first, second = make_seq("first", 0, range(5), max_tokens=3), make_seq("second", 1, range(100, 110), max_tokens=1)
    scheduler.add(first)
    scheduler.add(second)
    assert step(scheduler) == [("first", 5), ("second", 4)]  # 2 blocks for first, the last one for second
    assert second.block_table == [2] and second.status is SequenceStatus.RUNNING
    run_until_done(scheduler)
    assert_completed(first, second)
    assert_no_block_referenced(scheduler)


def test_token_budget_caps_decodes() -> None:
    scheduler = make_scheduler(num_blocks=16, max_num_batched_tokens=3)
    seqs = [make_seq(name, i, [i], max_tokens=4) for i, name in enumerate("abcde")]
    for seq in seqs:
        scheduler.add(seq)
    steps = run_until_done(scheduler)
    assert steps == [[("a", 1), ("b", 1), ("c", 1)]] * 4 + [[("d", 1), ("e", 1)]] * 4
    assert_completed(*seqs)


def test_max_num_seqs_caps_running() -> None:
    scheduler = make_scheduler(num_blocks=16, max_num_seqs=2)
    seqs = [make_seq(name, i, range(4), max_tokens=2) for i, name in enumerate("abc")]
    for seq in seqs:
        scheduler.add(seq)
    assert step(scheduler) == [("a", 4), ("b", 4)]
    assert len(scheduler.running) == 2 and list(scheduler.waiting) == [seqs[2]]
    assert step(scheduler) == [("a", 1), ("b", 1)]
    assert run_until_done(scheduler) == [[("c", 4)], [("c", 1)]]
    assert_completed(*seqs)


def test_admission_is_first_come_first_served() -> None:
    scheduler = make_scheduler(num_blocks=16, max_num_seqs=1)
    seqs = [make_seq("long", 0, range(12), 3), make_seq("mid", 1, range(50, 56), 1), make_seq("short", 2, [5], 2)]
    for seq in seqs:
        scheduler.add(seq)
    assert run_until_done(scheduler) == [
        [("long", 12)], [("long", 1)], [("long", 1)], [("mid", 6)], [("short", 1)], [("short", 1)]
    ]


# ---- preemption -------------------------------------------------------------------------------


def test_preemption_requeues_the_newest_request_which_later_completes() -> None:
    scheduler = make_scheduler(num_blocks=4)  # a and b each need 3 blocks by the end: they cannot both fit
    a, b = make_seq("a", 0, range(4), max_tokens=8), make_seq("b", 1, range(100, 104), max_tokens=8)
    scheduler.add(a)
    scheduler.add(b)
    assert [step(scheduler) for _ in range(5)] == [[("a", 4), ("b", 4)]] + [[("a", 1), ("b", 1)]] * 4
    assert (a.block_table, b.block_table) == ([0, 2], [1, 3])
    late = make_seq("late", 2, [50], max_tokens=1)
    scheduler.add(late)
    assert step(scheduler) == [("a", 1)]  # a's 9th token needs a 3rd block: b goes
    assert scheduler.num_preemptions == 1
    assert list(scheduler.waiting) == [b, late] and scheduler.running == [a]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert a.block_table == [0, 2, 3]  # b's tail block was evicted first
    assert b.num_tokens == 9  # its output so far is kept and recomputed
    assert run_until_done(scheduler) == [
        [("a", 1)],  # late fits, but b is first in line (FCFS)
        [("a", 1)],  # a finishes
        [("b", 5), ("late", 1)],  # b's first block is still cached
        [("b", 1)],
        [("b", 1)],
    ]
    assert b.num_cached_tokens == 0  # prefix-hit accounting counts the first admission only
    assert_completed(a, b, late)
    assert_no_block_referenced(scheduler)


def test_preemption_picks_the_latest_arrival_not_the_latest_admission() -> None:
    scheduler = make_scheduler(num_blocks=4)
    newer, older = make_seq("newer", 5, range(4), max_tokens=8), make_seq("older", 1, range(100, 104), 8)
    scheduler.add(newer)
    scheduler.add(older)  # admitted second, but arrived first (e.g. a resubmitted request)
    assert step(scheduler) == [("newer", 4), ("older", 4)]
    assert scheduler.running == [older, newer]
    for _ in range(4):
        assert step(scheduler) == [("older", 1), ("newer", 1)]
    assert step(scheduler) == [("older", 1)]
    assert list(scheduler.waiting) == [newer]
    run_until_done(scheduler)
    assert_completed(newer, older)


def test_decode_that_is_the_newest_preempts_itself() -> None:
    scheduler = make_scheduler(num_blocks=3)
    a, b = make_seq("a", 0, range(4), max_tokens=4), make_seq("b", 1, range(100, 104), max_tokens=8)
    scheduler.add(a)
    scheduler.add(b)
    assert step(scheduler) == [("a", 4), ("b", 4)]
    assert step(scheduler) == [("a", 1)]  # a takes the last block; b finds none and steps aside
    assert list(scheduler.waiting) == [b] and b.block_table == []
    assert scheduler.num_preemptions == 1
    run_until_done(scheduler)
    assert_completed(a, b)
    assert_no_block_referenced(scheduler)


def test_nothing_is_admitted_in_a_step_that_preempted() -> None:
    scheduler = make_scheduler(num_blocks=6)
    prompt = list(range(8))
    first, second = make_seq("first", 0, prompt, max_tokens=8), make_seq("second", 1, prompt, max_tokens=8)
    scheduler.add(first)
    scheduler.add(second)
    # Computed in the same step, second's blocks duplicate first's: they stay unhashed and go to the
    # free list when second is preempted, so second could be re-admitted at once on first's hashes.
    assert [step(scheduler) for _ in range(5)] == [[("first", 8), ("second", 8)]] + [[("first", 1), ("second", 1)]] * 4
    assert step(scheduler) == [("first", 1)]
    assert list(scheduler.waiting) == [second]
    assert scheduler.block_manager.num_free_blocks == 2
    assert step(scheduler) == [("first", 1), ("second", 1)]  # next step: 12 tokens hit, 1 to compute
    assert second.block_table[:3] == first.block_table[:3]
    run_until_done(scheduler)
    assert_completed(first, second)
    assert_no_block_referenced(scheduler)


@pytest.mark.parametrize("big_first", [True, False])
def test_request_needing_the_whole_cache_completes(big_first: bool) -> None:
    scheduler = make_scheduler(num_blocks=4, max_num_batched_tokens=8)
    big = make_seq("big", 0 if big_first else 2, range(12), max_tokens=4)  # 16 tokens: every block
    small = [make_seq(f"small{i}", 1 if big_first else i, range(100 * i, 100 * i + 3), 6) for i in range(2)]
    for seq in sorted([big, *small], key=lambda s: s.arrival):
        scheduler.add(seq)
    run_until_done(scheduler, max_steps=100)
    assert_completed(big, *small)
    assert_no_block_referenced(scheduler)


# ---- finish and accounting --------------------------------------------------------------------


def test_finish_frees_running_and_waiting_requests() -> None:
    scheduler = make_scheduler(num_blocks=8, max_num_batched_tokens=8)
    decoding, prefilling, waiting = (
        make_seq("decoding", 0, range(6), 8), make_seq("prefilling", 1, range(100, 120), 8), make_seq("w", 2, [1], 8)
    )
    for seq in (decoding, prefilling, waiting):
        scheduler.add(seq)
    assert step(scheduler) == [("decoding", 6), ("prefilling", 2)]
    assert step(scheduler) == [("decoding", 1), ("prefilling", 7)]
    bm = scheduler.block_manager
    assert bm.num_used_blocks == 2 + 3
    scheduler.finish(prefilling)
    assert scheduler.running == [decoding] and bm.num_used_blocks == 2
    scheduler.finish(waiting)
    assert list(scheduler.waiting) == []
    scheduler.finish(decoding)
    for seq in (decoding, prefilling, waiting):
        assert seq.status is SequenceStatus.FINISHED and seq.block_table == []
    assert_no_block_referenced(scheduler)


def test_finish_frees_a_preempted_request() -> None:
    scheduler = make_scheduler(num_blocks=3)
    a, b = make_seq("a", 0, range(4), max_tokens=4), make_seq("b", 1, range(100, 104), max_tokens=8)
    scheduler.add(a)
    scheduler.add(b)
    step(scheduler)
    step(scheduler)
    assert list(scheduler.waiting) == [b]
    scheduler.finish(b)
    assert not scheduler.waiting and b.is_finished
    run_until_done(scheduler)
    assert_no_block_referenced(scheduler)


def random_workload(rng: random.Random, num_seqs: int) -> list[Sequence]:
    """Requests sharing a few prefixes, so prefix hits, chunking and preemption all happen."""
    prefixes = [[rng.randrange(3) for _ in range(rng.randrange(0, 14))] for _ in range(3)]
    return [
        make_seq(f"r{i}", i, rng.choice(prefixes) + [rng.randrange(3) for _ in range(rng.randrange(1, 10))],
                 max_tokens=rng.randrange(1, 12))
        for i in range(num_seqs)
    ]


def check_batch(scheduler: Scheduler, batch: ScheduledBatch, decoding: set[str]) -> None:
    """Per-step invariants: caps respected, decodes first, blocks allocated for everything scheduled."""
    assert batch.num_tokens <= scheduler.max_num_batched_tokens
    assert len(scheduler.running) <= scheduler.max_num_seqs
    is_decode = [seq.request_id in decoding and n == 1 for seq, n in zip(batch.seqs, batch.num_new_tokens)]
    assert is_decode == sorted(is_decode, reverse=True)
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        assert len(seq.block_table) * BS >= seq.num_computed_tokens + n
    in_use = {block for seq in scheduler.running for block in seq.block_table}
    assert scheduler.block_manager.num_used_blocks == len(in_use)


@pytest.mark.parametrize("seed", range(8))
def test_random_workloads_finish_and_release_every_block(seed: int) -> None:
    rng = random.Random(seed)
    scheduler = make_scheduler(num_blocks=rng.randrange(8, 20), max_num_seqs=rng.randrange(1, 6),
                               max_num_batched_tokens=rng.randrange(4, 24))
    seqs = random_workload(rng, num_seqs=12)
    pending = list(seqs)
    for _ in range(500):
        if pending and rng.random() < 0.4:
            scheduler.add(pending.pop(0))
        decoding = {s.request_id for s in scheduler.running if s.num_tokens - s.num_computed_tokens == 1}
        batch = scheduler.schedule()
        check_batch(scheduler, batch, decoding)
        process(scheduler, batch)
        if not pending and not scheduler.has_unfinished():
            break
    assert_completed(*seqs)
    assert_no_block_referenced(scheduler)


def test_prefill_allocates_blocks_under_python_O() -> None:
    """`python -O` strips asserts: allocation must not live inside one."""
    code = (
        "from engine.block_manager import BlockManager; from engine.scheduler import Scheduler; "
        "from tests.engine.test_scheduler import make_seq; "
        "s = Scheduler(BlockManager(8, 4), 8, 64); seq = make_seq('a', 0, range(10), 1); s.add(seq); "
        "s.schedule(); print(seq.block_table)"
    )
    out = subprocess.run([sys.executable, "-O", "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[0, 1, 2]"
