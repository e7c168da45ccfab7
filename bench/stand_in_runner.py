"""A stand-in for ModelRunner that samples fixed tokens, so a benchmark times everything around the model.

A launched step is ready `step_s` after the previous one (a GPU step: it costs the host nothing), so the
engine's overlapped steps behave as on a GPU: the host plans step n+1 while step n "runs".
"""

from __future__ import annotations

import time
from collections import deque

from engine.model_runner import LaunchedStep
from engine.pending_samples import PendingSamples
from engine.scheduler import ScheduledBatch
from engine.token_mask import TokenMask


class FixedTokenRunner:
    """Every sampling sequence gets the next of `token_ids` (cycling), without logprobs."""

    def __init__(self, token_ids: list[int], max_batch: int, step_s: float = 0.0) -> None:
        self._samples = [(token_ids[i % len(token_ids)], None) for i in range(max_batch)]
        self._step_s = step_s
        self._ready_at: deque[float] = deque()  # of the launched steps, oldest first

    def launch(self, batch: ScheduledBatch) -> LaunchedStep:
        sampling = [seq for seq, n in zip(batch.seqs, batch.num_new_tokens)
                    if seq.num_computed_tokens + n == seq.num_tokens]
        if self._step_s:
            start = max(time.monotonic(), self._ready_at[-1] if self._ready_at else 0.0)
            self._ready_at.append(start + self._step_s)
        return LaunchedStep(sampling, None, None)

    def sample(self, step: LaunchedStep, token_mask: TokenMask | None = None) -> PendingSamples:
        return PendingSamples(step.seqs, None, None, None)

    def wait(self, pending: PendingSamples) -> list[tuple[int, None]]:
        if self._step_s:
            time.sleep(max(0.0, self._ready_at.popleft() - time.monotonic()))
        return self._samples  # the engine takes one per sampling sequence
