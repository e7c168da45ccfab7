"""The outbox: coalesces engine steps into `StepEvents` batches for the replica's one subscriber."""

from __future__ import annotations

import logging
import threading

from engine.block_manager import KVEvents
from engine.outputs import RequestOutput
from worker.messages import LogprobEntry, RequestDelta, StepEvents

log = logging.getLogger(__name__)

# Token ids plus KV hash changes the outbox holds before it gives up on a stalled consumer (~25 MB).
MAX_PENDING_ITEMS = 1 << 18


class Outbox:
    """Collects what engine steps produce until the subscriber takes it, merged into one batch.

    The engine thread only appends (`add` never waits on the consumer); a consumer that falls
    behind gets fewer, larger batches. Memory is bounded: past `max_pending_items` the pending
    window is dropped and its seq skipped, which the consumer sees as a gap (StepEvents says why).

    KV changes are kept as each hash's last change, not as a net change that cancels a store
    and a later evict: that way a snapshot taken at any step inside the window is also brought
    exactly up to date by the batch (a net change would miss a hash stored before the snapshot
    and evicted after it).
    """

    def __init__(self, replica: str, epoch: str, max_pending_items: int = MAX_PENDING_ITEMS) -> None:
        self._replica, self._epoch = replica, epoch
        self._max_pending_items = max_pending_items
        self._changed = threading.Condition()
        self._seq = 0  # seq of the latest batch taken or dropped
        self._subscription = 0  # id of the current subscriber; a new one replaces the old
        self._closed = False
        self._reset()

    def _reset(self) -> None:
        self._num_steps = 0
        self._num_tokens = 0
        self._outputs: list[RequestDelta] = []
        self._open: dict[tuple[str, int], RequestDelta] = {}  # unfinished choices' deltas in `_outputs`
        self._kv: dict[int, bool] = {}  # block hash -> resident after its last change

    @property
    def last_seq(self) -> int:
        """Seq of the latest batch cut (taken or dropped): a snapshot taken now reflects it; later ones apply on top."""
        with self._changed:
            return self._seq

    def add(self, outputs: list[RequestOutput], kv: KVEvents) -> None:
        """Merge one engine step into the pending batch and wake the subscriber."""
        with self._changed:
            self._num_steps += 1
            for out in outputs:
                self._merge(out)
            self._kv.update(dict.fromkeys(kv.stored, True))
            self._kv.update(dict.fromkeys(kv.evicted, False))  # disjoint from stored within one step
            if self._num_tokens + len(self._kv) > self._max_pending_items:
                self._drop()
            elif self._has_content():
                self._changed.notify_all()

    def _merge(self, out: RequestOutput) -> None:
        choice = (out.request_id, out.index)
        delta = self._open.pop(choice, None)
        if delta is None:  # its first step in this window (or its id was reused after it finished)
            delta = RequestDelta(out.request_id, [], False, None, out.num_prompt_tokens, 0, [], out.index)
            self._outputs.append(delta)
        delta.new_token_ids += out.new_token_ids
        delta.logprobs += [
            LogprobEntry(token_id=t, logprob=lp.logprob, top_logprobs=lp.top)
            for t, lp in zip(out.new_token_ids, out.new_logprobs)
        ]
        delta.finished, delta.finish_reason = out.finished, out.finish_reason
        delta.num_cached_tokens = out.num_cached_tokens
        if not out.finished:
            self._open[choice] = delta
        self._num_tokens += len(out.new_token_ids) + 1  # + 1: an output without tokens (an abort) costs too

    def _drop(self) -> None:
        self._seq += 1
        log.warning(
            "replica %s: dropped event batch %d (%d steps): its subscriber fell behind by over %d items",
            self._replica, self._seq, self._num_steps, self._max_pending_items,
        )
        self._reset()

    def _has_content(self) -> bool:
        return bool(self._outputs or self._kv)

    def subscribe(self) -> tuple[int, StepEvents]:
        """Become the one subscriber, with a first batch of what is pending now (maybe nothing).

        The previous subscriber's `next_batch` returns None from now on.
        """
        with self._changed:
            self._subscription += 1
            self._changed.notify_all()
            return self._subscription, self._take()

    def next_batch(self, subscription: int) -> StepEvents | None:
        """Wait for the next batch. None once this subscriber was replaced, or the outbox closed and drained."""
        with self._changed:
            self._changed.wait_for(
                lambda: self._has_content() or self._closed or subscription != self._subscription
            )
            if subscription != self._subscription or not self._has_content():
                return None
            return self._take()

    def _take(self) -> StepEvents:
        self._seq += 1
        batch = StepEvents(
            replica=self._replica,
            epoch=self._epoch,
            seq=self._seq,
            num_steps=self._num_steps,
            outputs=self._outputs,
            kv_stored=[h for h, resident in self._kv.items() if resident],
            kv_evicted=[h for h, resident in self._kv.items() if not resident],
        )
        self._reset()
        return batch

    def close(self) -> None:
        """No more steps will come: the subscriber gets what is pending, then None."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
