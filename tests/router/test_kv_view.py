"""KVView: in-order batches, skipped duplicates, gaps and new epochs, the re-snapshot protocol, prefix counting."""

from __future__ import annotations

import random
from collections import deque

from router.kv_view import KVView
from worker.messages import KVSnapshot, StepEvents


def batch(seq: int, stored: tuple[int, ...] = (), evicted: tuple[int, ...] = (), epoch: str = "e1") -> StepEvents:
    return StepEvents("r0", epoch, seq, 1, [], list(stored), list(evicted))


def synced_view(seq: int = 0, hashes: tuple[int, ...] = (), epoch: str = "e1") -> KVView:
    view = KVView()
    view.reset(KVSnapshot("r0", epoch, seq, list(hashes)))
    return view


def test_reset_then_in_order_batches() -> None:
    view = synced_view(seq=3, hashes=(1, 2))
    assert (view.epoch, view.seq, view.hashes) == ("e1", 3, {1, 2})
    assert view.apply(batch(4, stored=(3,), evicted=(1,)))
    assert view.apply(batch(5, stored=(1,)))
    assert (view.seq, view.hashes, view.num_gaps) == (5, {1, 2, 3}, 0)


def test_a_batch_already_reflected_is_ignored() -> None:
    view = synced_view(seq=5, hashes=(1,))
    assert view.apply(batch(5, stored=(9,), evicted=(1,)))
    assert view.apply(batch(2, stored=(9,)))
    assert (view.seq, view.hashes) == (5, {1})


def test_a_gap_returns_false_and_leaves_the_view_unchanged() -> None:
    view = synced_view(seq=1, hashes=(1,))
    assert not view.apply(batch(3, stored=(2,), evicted=(1,)))
    assert (view.seq, view.hashes, view.num_gaps) == (1, {1}, 1)


def test_a_new_epoch_returns_false() -> None:
    view = synced_view(seq=7, hashes=(1,))
    assert not view.apply(batch(1, stored=(2,), epoch="e2"))
    assert (view.epoch, view.seq, view.hashes, view.num_gaps) == ("e1", 7, {1}, 1)


def test_a_view_never_synced_needs_a_snapshot_but_counts_no_gap() -> None:
    view = KVView()
    assert not view.apply(batch(1, stored=(1,)))
    assert (view.epoch, view.hashes, view.num_gaps) == (None, set(), 0)


def test_re_snapshot_then_the_same_batch_applies() -> None:
    view = synced_view(seq=1, hashes=(1,))
    after_gap = batch(4, stored=(5,))
    assert not view.apply(after_gap)
    view.reset(KVSnapshot("r0", "e1", 4, [1, 5, 6]))  # taken after batch 4 was cut: reflects it
    assert view.apply(after_gap)
    assert (view.seq, view.hashes) == (4, {1, 5, 6})
    assert view.apply(batch(5, evicted=(6,)))
    assert view.hashes == {1, 5}


def test_prefix_count_stops_at_the_first_miss() -> None:
    view = synced_view(hashes=(10, 11, 13))
    assert view.num_cached_prefix_blocks([10, 11, 12, 13]) == 2
    assert view.num_cached_prefix_blocks([10, 11]) == 2
    assert view.num_cached_prefix_blocks([12, 10]) == 0
    assert view.num_cached_prefix_blocks([]) == 0


class FakeReplica:
    """A replica's resident hashes, changed at random each step and cut into batches as the outbox does.

    Batches hold each hash's last change in their window; snapshots may fall anywhere inside a window.
    """

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.restart("e0")

    def restart(self, epoch: str) -> None:
        self.epoch, self.seq = epoch, 0
        self.resident: set[int] = set()
        self.pending: dict[int, bool] = {}  # hash -> resident after its last change since the last cut
        self.state_at_cut: dict[int, frozenset[int]] = {}

    def step(self) -> None:
        # A small hash space, so one hash is stored, evicted and stored again within a window.
        stored = {self.rng.randrange(60) for _ in range(self.rng.randrange(4))} - self.resident
        evicted = set(self.rng.sample(sorted(self.resident), min(len(self.resident), self.rng.randrange(4))))
        self.resident = (self.resident | stored) - evicted
        self.pending.update(dict.fromkeys(stored, True))
        self.pending.update(dict.fromkeys(evicted, False))

    def cut(self) -> StepEvents:
        self.seq += 1
        self.state_at_cut[self.seq] = frozenset(self.resident)
        events = StepEvents(
            "r0", self.epoch, self.seq, 1, [],
            kv_stored=[h for h, resident in self.pending.items() if resident],
            kv_evicted=[h for h, resident in self.pending.items() if not resident],
        )
        self.pending = {}
        return events

    def snapshot(self) -> KVSnapshot:
        return KVSnapshot("r0", self.epoch, self.seq, sorted(self.resident))


def test_a_lossy_consumer_that_re_snapshots_stays_exact() -> None:
    rng = random.Random(0)
    replica, view = FakeReplica(rng), KVView()
    in_flight: deque[StepEvents] = deque()
    synced_at = 0  # seq of the view's last snapshot

    def deliver(events: StepEvents) -> None:
        nonlocal synced_at
        if not view.apply(events):
            snapshot = replica.snapshot()
            view.reset(snapshot)
            synced_at = snapshot.seq
            assert view.apply(events)
        if view.seq > synced_at:  # a batch applied on top of the snapshot: exact as of its cut
            assert view.hashes == replica.state_at_cut[view.seq]

    for step in range(3000):
        replica.step()
        if rng.random() < 0.3:
            in_flight.append(replica.cut())
        if rng.random() < 0.005:
            replica.restart(f"e{step}")
            in_flight.clear()  # the old engine's subscription ends with it
        if in_flight and rng.random() < 0.5:
            events = in_flight.popleft()
            if rng.random() > 0.1:  # one batch in ten is lost
                deliver(events)
    in_flight.append(replica.cut())
    for events in in_flight:
        deliver(events)
    assert view.hashes == replica.resident
    assert view.num_gaps > 10


def test_pending_prompt_blocks_count_as_cached_until_dropped() -> None:
    view = KVView()
    view.reset(KVSnapshot("r", "e", 0, [1]))
    assert view.num_cached_prefix_blocks([1, 2, 3]) == 1
    view.add_pending("a#1", [1, 2, 3])
    view.add_pending("b#1", [1, 2])
    assert view.num_cached_prefix_blocks([1, 2, 3, 4]) == 3  # placed here, prefill not reported yet
    view.drop_pending("a#1")
    assert view.num_cached_prefix_blocks([1, 2, 3, 4]) == 2  # b still pends 1 and 2
    view.reset(KVSnapshot("r", "e", 5, []))  # a snapshot replaces the resident set, not the pending one
    assert view.num_cached_prefix_blocks([1, 2, 3]) == 2
    view.drop_pending("b#1")
    view.drop_pending("b#1")  # dropping twice (its first token, then its end) is harmless
    assert view.num_cached_prefix_blocks([1, 2, 3]) == 0
