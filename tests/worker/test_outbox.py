"""Outbox: step coalescing, KV last-change semantics against mid-window snapshots, bounds, subscribers."""

from __future__ import annotations

import threading

from engine.block_manager import KVEvents
from engine.outputs import RequestOutput
from engine.sequence import FinishReason, TokenLogprobs
from worker.messages import StepEvents
from worker.outbox import Outbox


def out(request_id: str, *tokens: int, finish: FinishReason | None = None, cached: int = 0,
        index: int = 0) -> RequestOutput:
    return RequestOutput(request_id, list(tokens), finish is not None, finish, 7, cached, index=index)


def kv(stored: tuple[int, ...] = (), evicted: tuple[int, ...] = ()) -> KVEvents:
    return KVEvents(stored=list(stored), evicted=list(evicted))


def subscribed(outbox: Outbox) -> int:
    subscription, opening = outbox.subscribe()
    assert (opening.outputs, opening.kv_stored, opening.kv_evicted) == ([], [], [])
    return subscription


def take(outbox: Outbox, subscription: int) -> StepEvents:
    batch = outbox.next_batch(subscription)
    assert batch is not None
    return batch


def apply(view: set[int], batch: StepEvents) -> None:
    view.update(batch.kv_stored)
    view.difference_update(batch.kv_evicted)


def test_steps_merge_into_one_delta_per_request() -> None:
    outbox = Outbox("r", "e")
    sub = subscribed(outbox)
    outbox.add([out("a", 1), out("b", 5)], kv(stored=(100,)))
    outbox.add([out("a", 2, cached=16)], kv())
    outbox.add([out("a", 3, finish="length", cached=16), out("b", 6)], kv(stored=(101,)))
    batch = take(outbox, sub)
    assert (batch.replica, batch.epoch, batch.seq, batch.num_steps) == ("r", "e", 2, 3)
    a, b = batch.outputs
    assert (a.request_id, a.new_token_ids, a.finished, a.finish_reason, a.num_cached_tokens) == ("a", [1, 2, 3], True,
                                                                                                 "length", 16)
    assert (b.request_id, b.new_token_ids, b.finished, b.num_prompt_tokens) == ("b", [5, 6], False, 7)
    assert batch.kv_stored == [100, 101] and batch.kv_evicted == []


def test_each_choice_of_a_request_merges_into_its_own_delta() -> None:
    """A request of n choices: one delta per choice, with its index, finished on its own. (Merged by request id
    alone, as before n > 1, the choices' tokens would land in one delta: [1, 5, 2, 6, 3].)"""
    outbox = Outbox("r", "e")
    sub = subscribed(outbox)
    outbox.add([out("a", 1), out("a", 5, index=1)], kv())
    outbox.add([out("a", 2), out("a", 6, index=1, finish="stop")], kv())
    outbox.add([out("a", 3)], kv())
    deltas = take(outbox, sub).outputs
    assert [(d.index, d.new_token_ids, d.finished) for d in deltas] == [(0, [1, 2, 3], False), (1, [5, 6], True)]
    outbox.add([out("a", 4, finish="length")], kv())
    [last] = take(outbox, sub).outputs
    assert (last.index, last.new_token_ids, last.finish_reason) == (0, [4], "length")


def test_a_finished_request_id_reused_in_the_window_gets_its_own_delta() -> None:
    outbox = Outbox("r", "e")
    sub = subscribed(outbox)
    outbox.add([out("a", 1, finish="abort")], kv())
    outbox.add([out("a", 9)], kv())
    first, second = take(outbox, sub).outputs
    assert (first.new_token_ids, first.finish_reason) == ([1], "abort")
    assert (second.new_token_ids, second.finished) == ([9], False)


def test_logprobs_become_plain_entries() -> None:
    outbox = Outbox("r", "e")
    sub = subscribed(outbox)
    outbox.add([RequestOutput("a", [4], False, None, 3, 0, [TokenLogprobs(-0.5, {4: -0.5, 8: -1.5})])], kv())
    (delta,) = take(outbox, sub).outputs
    assert delta.logprobs == [{"token_id": 4, "logprob": -0.5, "top_logprobs": {4: -0.5, 8: -1.5}}]


def test_kv_changes_bring_a_mid_window_snapshot_up_to_date() -> None:
    """Hash 1 is stored before the snapshot and evicted after it, within one window: a net change
    (store + evict = nothing) would leave it in the snapshot's view; the last change removes it."""
    outbox = Outbox("r", "e")
    sub = subscribed(outbox)
    resident = {7}  # the engine's truth, tracked alongside
    outbox.add([], kv(stored=(1, 2)))
    resident |= {1, 2}
    snapshot_seq, snapshot = outbox.last_seq, set(resident)  # a snapshot between two steps
    outbox.add([], kv(evicted=(1, 7), stored=(3,)))
    resident -= {1, 7}
    resident |= {3}
    batch = take(outbox, sub)
    assert batch.seq == snapshot_seq + 1
    apply(snapshot, batch)
    assert snapshot == resident
    assert sorted(batch.kv_stored) == [2, 3] and sorted(batch.kv_evicted) == [1, 7]


def test_a_stalled_consumer_costs_a_seq_gap_not_memory() -> None:
    outbox = Outbox("r", "e", max_pending_items=10)
    sub = subscribed(outbox)
    outbox.add([out("a", *range(8))], kv(stored=(1, 2, 3)))  # 8 tokens + 1 + 3 hashes > 10: dropped
    outbox.add([out("a", 8)], kv())
    batch = take(outbox, sub)
    assert batch.seq == 3  # 1 was the opening batch, 2 was dropped
    assert [d.new_token_ids for d in batch.outputs] == [[8]]


def test_a_new_subscriber_replaces_the_old_one() -> None:
    outbox = Outbox("r", "e")
    old = subscribed(outbox)
    ended: list[StepEvents | None] = []
    waiter = threading.Thread(target=lambda: ended.append(outbox.next_batch(old)))
    waiter.start()
    outbox.add([], kv())  # a step with nothing to say wakes nobody
    new = subscribed(outbox)
    waiter.join(timeout=5)
    assert ended == [None]
    outbox.add([out("a", 1)], kv())
    assert outbox.next_batch(old) is None
    assert take(outbox, new).num_steps == 1  # the empty step went with the opening batch


def test_close_hands_over_what_is_pending_then_ends() -> None:
    outbox = Outbox("r", "e")
    sub = subscribed(outbox)
    outbox.add([out("a", 1, finish="abort")], kv())
    outbox.close()
    assert take(outbox, sub).outputs[0].finish_reason == "abort"
    assert outbox.next_batch(sub) is None
