"""Continuous batching: which requests run this step, and how many of their tokens."""

from __future__ import annotations

import bisect
import logging
from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.sequence import Sequence, SequenceStatus

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ScheduledBatch:
    """One step's work: `seqs[i]` computes its next `num_new_tokens[i]` tokens."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)

    def add(self, seq: Sequence, num_new_tokens: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(num_new_tokens)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    """Picks each step's batch under a sequence cap and a token budget.

    Algorithm, per step:
    1. Running decodes, oldest first, one token each. When blocks run out, preempt the most
       recently arrived running request (free its blocks, requeue it at the front of the
       waiting queue for recompute) until the decode fits or is itself the one preempted.
    2. Running requests still in prefill continue with a chunk that fits the remaining budget
       and the free blocks (no preemption for prefill).
    3. Waiting requests, first come first served, start with their cached prefix plus a chunk,
       until the budget, the sequence cap or the blocks run out. Nothing is admitted in a step
       that preempted, so a preempted request is not immediately thrashed back in.
    `running` stays sorted by arrival, so its tail is always the newest request.
    """

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_prefix_hit_tokens = 0
        self.num_prompt_tokens = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_ahead(self, seqs: list[Sequence]) -> None:
        """Queue `seqs`, in order, ahead of every waiting request: choices of a request already running."""
        for seq in seqs:
            seq.status = SequenceStatus.WAITING
        self.waiting.extendleft(reversed(seqs))

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        num_preemptions_before = self.num_preemptions
        prefills: list[Sequence] = []  # seen by 1); they stay running, as 1) preempts only from the unvisited tail
        i = 0
        while i < len(self.running) and budget > 0:  # 1) decodes
            seq = self.running[i]
            num_remaining = seq.num_tokens - seq.num_computed_tokens
            if num_remaining > 1:
                prefills.append(seq)
            elif num_remaining == 1 and self._make_room_for_decode(seq):
                batch.add(seq, 1)
                budget -= 1
            i += 1
        for seq in prefills:  # 2) running prefills
            if budget > 0:
                budget -= self._schedule_chunk(seq, budget, batch)
        preempted = self.num_preemptions > num_preemptions_before
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            num_scheduled = self._admit(self.waiting[0], budget, batch)  # 3) admissions
            if num_scheduled == 0:
                break
            budget -= num_scheduled
        assert batch.num_tokens <= self.max_num_batched_tokens
        assert len(self.running) <= self.max_num_seqs
        return batch

    def _make_room_for_decode(self, seq: Sequence) -> bool:
        """Allocate `seq`'s next block, preempting the newest requests as needed; False if `seq` itself went."""
        while not self.block_manager.allocate(seq, seq.num_tokens):
            victim = self.running.pop()
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _schedule_chunk(self, seq: Sequence, budget: int, batch: ScheduledBatch) -> int:
        """Schedule as much of `seq`'s remaining prefill as budget and free blocks allow; return its size."""
        start = seq.num_computed_tokens
        end = min(seq.num_tokens, start + budget, self.block_manager.max_allocatable_tokens(seq))
        if end <= start:
            return 0
        allocated = self.block_manager.allocate(seq, end)  # not inside the assert: `python -O` would skip it
        assert allocated, "max_allocatable_tokens promised these blocks"
        batch.add(seq, end - start)
        return end - start

    def _admit(self, seq: Sequence, budget: int, batch: ScheduledBatch) -> int:
        """Move the head of the waiting queue into `running` with its first chunk; 0 if it does not fit."""
        seq.num_computed_tokens = self.block_manager.allocate_cached_prefix(seq)
        num_scheduled = self._schedule_chunk(seq, budget, batch)
        if num_scheduled == 0:
            self.block_manager.free(seq)
            seq.num_computed_tokens = 0
            return 0
        if seq.num_cached_tokens is None:  # first admission: account the prompt's prefix-cache hit
            seq.num_cached_tokens = seq.num_computed_tokens
            self.num_prefix_hit_tokens += seq.num_computed_tokens
            self.num_prompt_tokens += seq.num_prompt_tokens
        self.waiting.popleft()
        seq.status = SequenceStatus.RUNNING
        bisect.insort(self.running, seq, key=_arrival)
        return num_scheduled

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        log.debug("preempted %s (%d tokens) for recompute", seq.request_id, seq.num_tokens)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted request from the queues and release its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED


def _arrival(seq: Sequence) -> int:
    return seq.arrival
