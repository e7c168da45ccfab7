"""ReplicaPool's placement without Ray: slots with no actor, requests placed through `_choose` as `submit` does."""

from __future__ import annotations

import asyncio

from engine.block_hash import hash_blocks
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from router.config import RouterConfig
from router.inflight import InFlightRequest
from router.metrics import RouterMetrics
from router.policies import make_policy
from router.replica_pool import ReplicaPool
from router.replica_slot import ReplicaSlot
from router.request_state import RequestState
from router.validation import PreparedRequest
from worker.messages import KVSnapshot, RequestDelta, StepEvents

BLOCK_SIZE = 16


def pool_of(num_replicas: int, **config: object) -> ReplicaPool:
    pool = ReplicaPool(RouterConfig(num_replicas=num_replicas, **config), make_policy("prefix"), RouterMetrics())  # type: ignore[arg-type]
    for slot in pool.slots:
        slot.state = "serving"
        slot.kv.reset(KVSnapshot(slot.name, "e", 0, []))
    return pool


def group_request(tokenizer: Tokenizer, group: int, i: int) -> InFlightRequest:
    """A 256-token prefix shared by the group, then a 16-token question of its own."""
    prompt = [group * 1000 + t for t in range(256)] + [500 + i] * 16
    prepared = PreparedRequest(f"g{group}-{i}", prompt, SamplingParams(seed=1), hash_blocks(prompt, BLOCK_SIZE))
    return InFlightRequest(prepared, tokenizer)


def place(pool: ReplicaPool, request: InFlightRequest) -> ReplicaSlot:
    slot, _ = pool._place(request, set())
    request.set_state(RequestState.RUNNING)  # as if its submit call had returned
    return slot


def test_a_burst_of_one_prefix_follows_its_first_request_before_any_block_is_reported(
    qwen_tokenizer: Tokenizer,
) -> None:
    pool = pool_of(4)
    firsts = [place(pool, group_request(qwen_tokenizer, g, 0)) for g in range(4)]
    assert len({slot.name for slot in firsts}) == 4  # cold groups spread over the replicas
    for g in range(4):  # the rest of each group arrives while the first is still prefilling
        assert {place(pool, group_request(qwen_tokenizer, g, i)).name for i in range(1, 6)} == {firsts[g].name}


def test_pending_blocks_are_dropped_at_the_first_token_and_when_a_request_leaves(qwen_tokenizer: Tokenizer) -> None:
    pool = pool_of(2)
    first = group_request(qwen_tokenizer, 0, 0)
    slot = place(pool, first)
    hashes = first.prepared.prompt_hashes
    assert slot.kv.num_cached_prefix_blocks(hashes) == len(hashes)
    # Its first token, in a batch that did not report the blocks (evicted meanwhile): they stop counting.
    pool._deliver(slot, StepEvents(slot.name, "e", 1, 1, [
        RequestDelta(first.engine_request_id, [7], False, None, len(first.prepared.prompt_token_ids), 0, [])], [], []))
    assert slot.kv.num_cached_prefix_blocks(hashes) == 0
    second = group_request(qwen_tokenizer, 1, 0)
    slot = place(pool, second)
    assert slot.remove(second.engine_request_id) is second  # aborted, paused or moved before its first token
    assert slot.kv.num_cached_prefix_blocks(second.prepared.prompt_hashes) == 0


def test_the_balance_bound_still_caps_a_burst(qwen_tokenizer: Tokenizer) -> None:
    pool = ReplicaPool(RouterConfig(num_replicas=2), make_policy("prefix", 1.0, 600), RouterMetrics())
    for slot in pool.slots:
        slot.state = "serving"
        slot.kv.reset(KVSnapshot(slot.name, "e", 0, []))
    chosen = [place(pool, group_request(qwen_tokenizer, 0, i)).name for i in range(4)]
    # Each request is 272 tokens: with a bound of least load + 600, the holder takes 3, then the other one.
    assert chosen == [chosen[0]] * 3 + [next(s.name for s in pool.slots if s.name != chosen[0])]


def test_a_replica_dying_while_a_request_is_submitted_to_it_moves_the_request_once(
    qwen_tokenizer: Tokenizer,
) -> None:
    """Before: the failover of the dead replica resubmitted the request while its first submit was still out,
    and that submit then placed it a second time: two attempts streamed, every token twice."""

    async def scenario() -> None:
        pool = pool_of(3, policy="round-robin")
        pool.policy = make_policy("round-robin")
        restarted: list[str] = []

        async def restart(slot: ReplicaSlot) -> None:
            restarted.append(slot.name)

        pool._restart = restart  # type: ignore[method-assign]
        calls: list[tuple[str, str]] = []
        first_call_out = asyncio.Event()
        release_first_call = asyncio.Event()

        async def submit_to(slot: ReplicaSlot, request: InFlightRequest) -> None:
            calls.append((slot.name, request.engine_request_id))
            if len(calls) == 1:  # the first replica takes the call, then dies before our answer comes
                first_call_out.set()
                await release_first_call.wait()
            return None

        pool._submit_to = submit_to  # type: ignore[method-assign]
        request = group_request(qwen_tokenizer, 0, 0)
        placing = asyncio.ensure_future(pool.submit(request))
        await first_call_out.wait()
        [first_slot] = [s for s in pool.slots if s.inflight]
        pool._mark_down(first_slot, "killed")
        assert request.num_failovers == 0  # left to the submit in progress
        release_first_call.set()
        await placing
        await asyncio.sleep(0)
        assert [name for name, _ in calls] == [first_slot.name, request.replica] and request.replica != first_slot.name
        live = [(s.name, key) for s in pool.slots for key in s.inflight]
        assert live == [(request.replica, request.engine_request_id)]  # one attempt, on one live replica
        assert restarted == [first_slot.name]

    asyncio.run(scenario())


def test_deltas_of_a_superseded_attempt_are_never_streamed(qwen_tokenizer: Tokenizer) -> None:
    async def scenario() -> None:
        pool = pool_of(2)
        request = group_request(qwen_tokenizer, 0, 0)
        old = place(pool, request)
        old_id = request.engine_request_id
        new = next(s for s in pool.slots if s is not old)
        request.set_state(RequestState.PLACING)
        new.add(request)  # a later attempt elsewhere, while the old one still runs (a race this guards against)
        prompt_len = len(request.prepared.prompt_token_ids)
        pool._deliver(old, StepEvents(old.name, "e", 1, 1, [RequestDelta(old_id, [5], False, None, prompt_len, 0, [])],
                                      [], []))
        pool._deliver(new, StepEvents(new.name, "e", 1, 1, [
            RequestDelta(request.engine_request_id, [7], False, None, prompt_len, 0, [])], [], []))
        assert request.output_token_ids == [7] and old_id not in old.inflight
        assert list((await request.next_chunk()).token_ids) == [7]

    asyncio.run(scenario())
