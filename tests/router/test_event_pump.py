"""Applying replicas' step events (router/event_pump.py) without Ray: fake handles streaming hand-made batches."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from engine.tokenizer import Tokenizer
from router.errors import RequestFailed
from router.kv_view import KVView
from router.replica_pool import ReplicaPool
from router.replica_slot import ReplicaSlot
from router.request_state import RequestState
from tests.router.fakes import delta, fake, make_request, place, serving_pool, step
from worker.handle import ReplicaGone
from worker.messages import KVSnapshot, StepEvents


def test_deltas_of_a_superseded_attempt_are_never_streamed(qwen_tokenizer: Tokenizer) -> None:
    async def scenario() -> None:
        pool = serving_pool(2)
        request = make_request(qwen_tokenizer)
        old = place(pool, request)
        old_id = request.engine_request_id
        new = place(pool, request, next(s for s in pool.slots if s is not old))  # a race this guards against
        pool.pump.deliver(old, step(old, delta(request, [5], engine_request_id=old_id)))
        pool.pump.deliver(new, step(new, delta(request, [7])))
        assert request.choices[0].token_ids == [7] and old_id not in old.inflight and fake(old).aborted == [old_id]
        assert list((await request.next_chunk()).token_ids) == [7]

    asyncio.run(scenario())


def test_a_moved_request_of_n_choices_runs_as_one_choice_per_engine_request(qwen_tokenizer: Tokenizer) -> None:
    """After a failover, each unfinished choice runs as its own engine request on the new replica: their deltas
    reach their choices, a stop string only the router saw aborts that choice's request alone, and the request
    leaves the replica when its last choice ends."""
    async def scenario() -> None:
        pool = serving_pool(2)
        request = make_request(qwen_tokenizer, n=2, stop=(" world",))
        await pool.submit(request)
        old = next(s for s in pool.slots if request.engine_request_id in s.inflight)
        pool.pump.deliver(old, step(old, delta(request, [5], index=0), delta(request, [6], index=1)))
        [new] = [s for s in pool.slots if s is not old]
        pool.supervisor.mark_down(old, "killed")
        await until(lambda: len(fake(new).submitted) == 2)
        assert [s.request_id for s in fake(new).submitted] == ["r#2.0", "r#2.1"]
        assert new.engine_ids["r#2"] == ["r#2.0", "r#2.1"]
        pool.pump.deliver(new, step(new, delta(request, qwen_tokenizer.encode(" world"), engine_request_id="r#2.1")))
        assert request.choices[1].finish_reason == "stop" and fake(new).aborted == ["r#2.1"] and "r#2" in new.inflight
        pool.pump.deliver(new, step(new, delta(request, [7], finished=True, engine_request_id="r#2.0"), seq=2))
        assert request.done and not new.inflight and fake(new).aborted == ["r#2.1"]
        assert request.choices[0].token_ids == [5, 7]

    asyncio.run(scenario())


def test_a_request_whose_client_falls_behind_is_paused_then_resumed(qwen_tokenizer: Tokenizer) -> None:
    async def scenario() -> None:
        pool = serving_pool(1, max_stream_buffer_tokens=4)
        [slot] = pool.slots
        request = make_request(qwen_tokenizer)
        await pool.submit(request)
        for seq in range(1, 4):  # 2 tokens a step; the client reads nothing
            pool.pump.deliver(slot, step(slot, delta(request, [7, 8]), seq=seq))
        assert request.state is RequestState.PAUSED and not slot.inflight  # off its replica at 6 > 4 tokens
        assert fake(slot).aborted == ["r#1"]  # its blocks are freed there
        pool.pump.deliver(slot, step(slot, delta(request, [9]), seq=4))  # the aborted attempt's last step
        assert request.num_pending_tokens == 6 and list((await request.next_chunk()).token_ids) == [7, 8] * 3
        await pool.resume(request)
        assert request.state is RequestState.RUNNING and [s.request_id for s in fake(slot).submitted] == ["r#1", "r#2"]
        assert fake(slot).submitted[1].prompt_token_ids == [1, 2, 3, 7, 8, 7, 8, 7, 8]
        assert fake(slot).submitted[1].sampling_params["max_tokens"] == 94
        assert pool.metrics.slow_clients.labels("paused")._value.get() == 1
        assert pool.metrics.slow_clients.labels("resumed")._value.get() == 1

        for seq in range(5, 8):  # behind again; then no replica serves when it has caught up
            pool.pump.deliver(slot, step(slot, delta(request, [7, 8]), seq=seq))
        pool.set_state(slot, "down")
        await request.next_chunk()
        await pool.resume(request)
        failure = await request.next_chunk()
        assert isinstance(failure, RequestFailed) and failure.code == grpc.StatusCode.UNAVAILABLE

    asyncio.run(scenario())


async def pumping(pool: ReplicaPool, slot: ReplicaSlot) -> asyncio.Task[None]:
    """Run the pool's event pump on the slot's fake replica, as after attaching to it (a new view of its cache),
    once the opening batch is in; returns its task."""
    slot.kv = KVView()
    subscribed = asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(pool.pump.run(slot, fake(slot), subscribed))
    fake(slot).batches.put_nowait(step(slot, seq=1))
    await subscribed
    return task


async def until(condition: object) -> None:
    for _ in range(100):
        if callable(condition) and condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the pump never got there")


def test_lost_batches_restart_the_replicas_requests_from_what_was_sent(qwen_tokenizer: Tokenizer) -> None:
    async def scenario() -> None:
        pool = serving_pool(1)
        [slot] = pool.slots
        fake(slot).snapshot = KVSnapshot(slot.name, "e", 1, [11])
        task = await pumping(pool, slot)
        assert slot.kv.hashes == {11}  # the opening batch came with a snapshot under it
        request = make_request(qwen_tokenizer)
        await pool.submit(request)
        fake(slot).batches.put_nowait(step(slot, delta(request, [7]), seq=2))
        fake(slot).snapshot = KVSnapshot(slot.name, "e", 4, [11, 12])
        fake(slot).batches.put_nowait(StepEvents(slot.name, "e", 4, 1, [], [12], []))  # batch 3 was dropped
        await until(lambda: len(fake(slot).submitted) == 2)
        assert fake(slot).aborted == ["r#1"] and slot.kv.hashes == {11, 12} and slot.kv.num_gaps == 1
        resumed = fake(slot).submitted[1]
        assert (resumed.request_id, resumed.prompt_token_ids, resumed.resumed_tokens) == ("r#2", [1, 2, 3, 7], 1)
        assert pool.metrics.failovers._value.get() == 1
        task.cancel()

    asyncio.run(scenario())


@pytest.mark.parametrize(("end", "reason"), [(None, "event stream ended"), ("drain", "drained"), (
    ReplicaGone("event stream broke: ActorDiedError: The actor died"), "event stream broke: ActorDiedError")])
def test_a_stream_that_ends_or_breaks_takes_its_replica_down_and_a_drained_one_is_no_death(
    qwen_tokenizer: Tokenizer, caplog: pytest.LogCaptureFixture, end: ReplicaGone | str | None, reason: str
) -> None:
    async def scenario() -> list[str]:
        pool = serving_pool(1)
        [slot] = pool.slots
        request = make_request(qwen_tokenizer)
        place(pool, request)
        await pumping(pool, slot)
        if end == "drain":
            pool.set_state(slot, "draining")
        fake(slot).batches.put_nowait(end if isinstance(end, ReplicaGone) else None)
        await until(lambda: slot.num_restarts == 1)
        assert slot.state == "starting" and request.done  # with no other replica, its request cannot move
        return request.replica_deaths

    deaths = asyncio.run(scenario())
    assert deaths == ([] if end == "drain" else ["nanoserve-replica-0"])  # a drained replica is no death
    assert f"nanoserve-replica-0: down ({reason}" in caplog.text
