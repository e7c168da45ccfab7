"""Placing requests (router/placement.py) on replicas that serve, without Ray: fake handles, hand-made step events."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from engine.block_hash import hash_blocks
from engine.tokenizer import Tokenizer
from router.errors import PoolError
from router.inflight import InFlightRequest
from router.replica_pool import ReplicaPool
from router.replica_slot import ReplicaSlot
from router.request_state import RequestState
from tests.router.fakes import delta, fake, make_request, place, replica_of, serving_pool, step
from worker.messages import SubmitError

BLOCK_SIZE = 16


def group_request(tokenizer: Tokenizer, group: int, i: int) -> InFlightRequest:
    """A 256-token prefix shared by the group, then a 16-token question of its own."""
    prompt = [group * 1000 + t for t in range(256)] + [500 + i] * 16
    return make_request(tokenizer, f"g{group}-{i}", prompt, block_hashes=hash_blocks(prompt, BLOCK_SIZE))


def test_a_burst_of_one_prefix_follows_its_first_request_before_any_block_is_reported(
    qwen_tokenizer: Tokenizer,
) -> None:
    async def scenario() -> None:
        pool = serving_pool(4, policy="prefix")
        firsts = [place(pool, group_request(qwen_tokenizer, g, 0)) for g in range(4)]
        assert len({slot.name for slot in firsts}) == 4  # cold groups spread over the replicas
        for g in range(4):  # the rest of each group arrives while the first is still prefilling
            assert {place(pool, group_request(qwen_tokenizer, g, i)).name for i in range(1, 6)} == {firsts[g].name}

    asyncio.run(scenario())


def test_pending_blocks_are_dropped_at_the_first_token_and_when_a_request_leaves(qwen_tokenizer: Tokenizer) -> None:
    async def scenario() -> None:
        pool = serving_pool(2, policy="prefix")
        first = group_request(qwen_tokenizer, 0, 0)
        slot = place(pool, first)
        hashes = first.prepared.prompt_hashes
        assert slot.kv.num_cached_prefix_blocks(hashes) == len(hashes)
        # Its first token, in a batch that did not report the blocks (evicted meanwhile): they stop counting.
        pool.pump.deliver(slot, step(slot, delta(first, [7])))
        assert slot.kv.num_cached_prefix_blocks(hashes) == 0
        second = group_request(qwen_tokenizer, 1, 0)
        slot = place(pool, second)
        assert slot.remove(second.engine_request_id) is second  # aborted, paused or moved before its first token
        assert slot.kv.num_cached_prefix_blocks(second.prepared.prompt_hashes) == 0

    asyncio.run(scenario())


def test_the_balance_bound_still_caps_a_burst(qwen_tokenizer: Tokenizer) -> None:
    async def scenario() -> None:
        pool = serving_pool(2, policy="prefix", prefix_imbalance_ratio=1.0, prefix_imbalance_slack_tokens=600)
        chosen = [place(pool, group_request(qwen_tokenizer, 0, i)).name for i in range(4)]
        # Each request is 272 tokens: with a bound of least load + 600, the holder takes 3, then the other one.
        assert chosen == [chosen[0]] * 3 + [next(s.name for s in pool.slots if s.name != chosen[0])]

    asyncio.run(scenario())


def test_a_replica_dying_while_a_request_is_submitted_to_it_moves_the_request_once(
    qwen_tokenizer: Tokenizer,
) -> None:
    """Before: the failover of the dead replica resubmitted the request while its first submit was still out,
    and that submit then placed it a second time: two attempts streamed, every token twice."""

    async def scenario() -> None:
        pool = serving_pool(3, policy="round-robin")
        for slot in pool.slots:  # the first replica to take the call dies before our answer comes
            fake(slot).hold = asyncio.Event()
        request = make_request(qwen_tokenizer)
        placing = asyncio.ensure_future(pool.submit(request))
        await asyncio.sleep(0)
        [first_slot] = [s for s in pool.slots if s.inflight]
        for slot in pool.slots:
            if slot is not first_slot:
                fake(slot).hold = None
        pool.supervisor.mark_down(first_slot, "killed")
        assert request.num_failovers == 0 and request.state is RequestState.PLACING  # left to the submit under way
        fake(first_slot).hold.set()  # type: ignore[union-attr]
        await placing
        await asyncio.sleep(0)
        second_slot = replica_of(pool, request)
        assert second_slot is not None and second_slot is not first_slot
        calls = [(s.name, spec.request_id) for s in pool.slots for spec in fake(s).submitted]
        assert sorted(calls) == sorted([(first_slot.name, "r#1"), (second_slot.name, "r#2")])
        assert request.state is RequestState.RUNNING
        live = [(s.name, key) for s in pool.slots for key in s.inflight]
        assert live == [(second_slot.name, request.engine_request_id)]  # one attempt, on one live replica
        assert first_slot.num_restarts == 1

    asyncio.run(scenario())


def test_a_refusing_replica_passes_the_request_on_and_the_last_refusal_is_the_answer(
    qwen_tokenizer: Tokenizer,
) -> None:
    async def scenario() -> None:
        pool = serving_pool(2, policy="round-robin")  # the first replica first
        full = SubmitError("resource_exhausted", "queue full")
        fake(pool.slots[0]).refusal = full
        request = make_request(qwen_tokenizer)
        await pool.submit(request)
        assert (replica_of(pool, request), request.engine_request_id) == (pool.slots[1], "r#2")
        assert not pool.slots[0].inflight and [s.request_id for s in fake(pool.slots[0]).submitted] == ["r#1"]
        fake(pool.slots[1]).refusal = full
        with pytest.raises(PoolError) as refused:
            await pool.submit(make_request(qwen_tokenizer, "s"))
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        fake(pool.slots[1]).refusal = SubmitError("invalid_argument", "temperature: must be >= 0")
        with pytest.raises(PoolError) as invalid:
            await pool.submit(make_request(qwen_tokenizer, "t"), exclude=frozenset({pool.slots[0].name}))
        assert invalid.value.code == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in invalid.value.message

    asyncio.run(scenario())


def test_no_serving_replica_is_unavailable_and_a_full_one_resource_exhausted(qwen_tokenizer: Tokenizer) -> None:
    async def scenario(pool: ReplicaPool, slot: ReplicaSlot) -> PoolError:
        with pytest.raises(PoolError) as refused:
            await pool.submit(make_request(qwen_tokenizer))
        return refused.value

    pool = serving_pool(1, max_inflight_per_replica=1)
    [slot] = pool.slots
    asyncio.run(pool.submit(make_request(qwen_tokenizer, "first")))
    full = asyncio.run(scenario(pool, slot))
    assert full.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "at capacity (1 requests each)" in full.message
    pool.set_state(slot, "down")
    none = asyncio.run(scenario(pool, slot))
    assert none.code == grpc.StatusCode.UNAVAILABLE and none.message == "no healthy replica"


def test_a_request_paused_and_resumed_before_its_first_submit_returns_is_in_flight_once(
    qwen_tokenizer: Tokenizer,
) -> None:
    """Its tokens can come before its submit returns, fast enough to pause it, and its client can catch up and
    resume it (a new attempt, placed elsewhere) before then too. Before, the first submit, returning, took the
    new attempt for its own, found it missing and placed the request once more: two attempts ran."""

    async def scenario() -> None:
        pool = serving_pool(2, max_stream_buffer_tokens=2)
        for slot in pool.slots:
            fake(slot).hold = asyncio.Event()
        request = make_request(qwen_tokenizer)
        first_submit = asyncio.create_task(pool.submit(request))
        await asyncio.sleep(0)
        [first] = [slot for slot in pool.slots if slot.inflight]
        pool.pump.deliver(first, step(first, delta(request, [5, 6, 7])))  # past the buffer: paused
        assert request.state is RequestState.PAUSED and not first.inflight
        assert (await request.next_chunk()).token_ids == [5, 6, 7]  # the client caught up
        place(pool, make_request(qwen_tokenizer, "filler"), first)  # so that the resume goes to the other one
        resume = asyncio.create_task(pool.resume(request))
        await asyncio.sleep(0)
        for slot in pool.slots:
            fake(slot).hold.set()  # type: ignore[union-attr]
        await asyncio.gather(first_submit, resume)
        assert sorted(spec.request_id for slot in pool.slots for spec in fake(slot).submitted) == ["r#1", "r#2"]
        assert [rid for slot in pool.slots for rid in slot.inflight if rid.startswith("r#")] == ["r#2"]
        assert request.state is RequestState.RUNNING

    asyncio.run(scenario())
