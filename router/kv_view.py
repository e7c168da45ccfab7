"""The router's exact copy of one replica's cached block hashes, kept by applying its event batches."""

from __future__ import annotations

from collections.abc import Sequence

from worker.messages import KVSnapshot, StepEvents


class KVView:
    """The block hashes resident on one replica, exact as of batch `seq` of engine life `epoch`.

    Protocol: subscribe to the replica's batches, take a `KVSnapshot`, `reset` to it, then `apply`
    every batch in order. A batch already reflected (seq <= self.seq) is skipped. When `apply`
    returns False the view is stale (a lost batch, or a restarted engine) and was left as it was:
    take a new snapshot, `reset`, and apply the same batch again, which then succeeds (a no-op if
    the snapshot already reflects it). Batches hold each hash's last change in their window, so
    add / discard is exact on top of a snapshot taken anywhere inside that window.
    """

    def __init__(self) -> None:
        self.epoch: str | None = None  # None until the first snapshot
        self.seq = 0  # the latest batch seq reflected here
        self.hashes: set[int] = set()
        self.num_gaps = 0  # times a synced view found itself stale: a lost batch or a new epoch
        # Prompt blocks of requests placed on the replica whose prefill has not reported them stored yet:
        # counted as resident, so a burst of one prefix's requests follows the first instead of scattering.
        self._pending: dict[str, Sequence[int]] = {}  # request id -> its prompt's block hashes
        self._num_pending: dict[int, int] = {}  # block hash -> pending requests that will store it

    def reset(self, snapshot: KVSnapshot) -> None:
        """Replace the whole view with a replica's snapshot (pending blocks stay: their requests still run)."""
        self.epoch, self.seq = snapshot.epoch, snapshot.seq
        self.hashes = set(snapshot.block_hashes)

    def apply(self, events: StepEvents) -> bool:
        """Bring the view up to `events`; False (view unchanged) when it needs a snapshot first."""
        if events.epoch != self.epoch or events.seq > self.seq + 1:
            if self.epoch is not None:  # a view never synced is not a gap, just not started
                self.num_gaps += 1
            return False
        if events.seq <= self.seq:
            return True
        self.hashes.update(events.kv_stored)
        self.hashes.difference_update(events.kv_evicted)
        self.seq = events.seq
        return True

    def num_cached_prefix_blocks(self, prompt_hashes: Sequence[int]) -> int:
        """How many leading blocks of a prompt's hash chain are resident.

        Stops at the first miss: block i's hash chains every block before it, and the engine reuses
        only an unbroken leading run, so a hit after a miss saves nothing.
        """
        for num_blocks, block_hash in enumerate(prompt_hashes):
            if block_hash not in self.hashes and block_hash not in self._num_pending:
                return num_blocks
        return len(prompt_hashes)

    def add_pending(self, request_id: str, prompt_hashes: Sequence[int]) -> None:
        """Count a request's prompt blocks as resident until `drop_pending` (its first token, or its end)."""
        self._pending[request_id] = prompt_hashes
        for block_hash in prompt_hashes:
            self._num_pending[block_hash] = self._num_pending.get(block_hash, 0) + 1

    def drop_pending(self, request_id: str) -> None:
        """Stop counting the request's prompt blocks (a no-op when they are not counted)."""
        for block_hash in self._pending.pop(request_id, ()):
            count = self._num_pending[block_hash] - 1
            if count:
                self._num_pending[block_hash] = count
            else:
                del self._num_pending[block_hash]
