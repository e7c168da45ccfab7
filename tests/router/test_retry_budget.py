"""The retry budget (one failover in progress per replica) and the stop of a request whose replicas die twice
under it (router/supervisor.py), on replicas that accept every submit and stay down once down (no Ray)."""

from __future__ import annotations

import asyncio

import grpc

from engine.tokenizer import Tokenizer
from router.errors import RequestFailed
from router.inflight import InFlightRequest
from router.replica_pool import ReplicaPool
from router.replica_slot import ReplicaSlot
from router.retry_budget import RetryBudget, has_failover_in_progress
from tests.router.fakes import delta, fake, make_request, place, replica_of, serving_pool, step
from worker.messages import SubmitError


def request_on(pool: ReplicaPool, slot: ReplicaSlot, tokenizer: Tokenizer, name: str) -> InFlightRequest:
    request = make_request(tokenizer, name, max_tokens=8)
    place(pool, request, slot)
    return request


def token(pool: ReplicaPool, request: InFlightRequest) -> None:
    """The request's replica streams it one token."""
    slot = replica_of(pool, request)
    assert slot is not None
    pool.pump.deliver(slot, step(slot, delta(request, [7])))


def placed(pool: ReplicaPool) -> dict[str, list[str]]:
    return {s.name: sorted(r.request_id for r in s.inflight.values()) for s in pool.slots if s.inflight}


def test_failovers_run_one_per_replica_and_the_rest_wait_their_turn(qwen_tokenizer: Tokenizer) -> None:
    async def scenario() -> None:
        pool = serving_pool(3)
        dead, b, c = pool.slots
        requests = [request_on(pool, dead, qwen_tokenizer, f"r{i}") for i in range(5)]
        pool.supervisor.mark_down(dead, "killed")
        await asyncio.sleep(0)
        assert placed(pool) == {b.name: ["r0"], c.name: ["r1"]} or placed(pool) == {b.name: ["r1"], c.name: ["r0"]}
        assert len(pool.budget) == 3 and pool.metrics.failovers_waiting._value.get() == 3
        assert all(has_failover_in_progress(slot) for slot in (b, c))
        token(pool, requests[0])  # r0 survived its new replica: that replica takes the next one
        await asyncio.sleep(0)
        assert len(pool.budget) == 2 and len(placed(pool)[replica_of(pool, requests[0]).name]) == 2
        for _ in range(5):  # each first token lets the next one in, until none waits
            for request in requests:
                if request.replica_deaths and replica_of(pool, request) is not None:  # moved, not waiting
                    token(pool, request)
            await asyncio.sleep(0)
        assert len(pool.budget) == 0 and pool.metrics.failovers_waiting._value.get() == 0
        assert sum(len(ids) for ids in placed(pool).values()) == 5 and not any(r.done for r in requests)

    asyncio.run(scenario())


def test_a_request_whose_replicas_die_twice_without_a_token_is_stopped_and_its_neighbours_move(
    qwen_tokenizer: Tokenizer,
) -> None:
    async def scenario() -> None:
        pool = serving_pool(4)
        first = pool.slots[0]
        suspect = request_on(pool, first, qwen_tokenizer, "suspect")
        pool.supervisor.mark_down(first, "killed")
        await asyncio.sleep(0)
        second = replica_of(pool, suspect)
        assert second is not None
        neighbours = [request_on(pool, second, qwen_tokenizer, f"n{i}") for i in range(3)]  # running there already
        pool.supervisor.mark_down(second, "killed")
        await asyncio.sleep(0)
        assert suspect.done and pool.metrics.queries_of_death._value.get() == 1
        failure = await suspect.next_chunk()
        assert isinstance(failure, RequestFailed) and failure.code == grpc.StatusCode.ABORTED
        assert f"replicas {first.name} and {second.name} died" in failure.message
        assert not any(n.done for n in neighbours)  # one death each: they move (two now, one waits)
        assert sorted(len(ids) for ids in placed(pool).values()) == [1, 1] and len(pool.budget) == 1

    asyncio.run(scenario())


def test_a_token_between_two_deaths_clears_the_suspicion(qwen_tokenizer: Tokenizer) -> None:
    async def scenario() -> None:
        pool = serving_pool(3)
        request = request_on(pool, pool.slots[0], qwen_tokenizer, "r")
        pool.supervisor.mark_down(pool.slots[0], "killed")
        await asyncio.sleep(0)
        token(pool, request)  # it ran on its second replica, which then died of something else
        assert request.replica_deaths == []
        pool.supervisor.mark_down(replica_of(pool, request), "killed")  # type: ignore[arg-type]
        await asyncio.sleep(0)
        assert not request.done and len(request.replica_deaths) == 1  # the second death only
        assert pool.metrics.queries_of_death._value.get() == 0

    asyncio.run(scenario())


def test_a_drained_replica_is_no_death(qwen_tokenizer: Tokenizer) -> None:
    async def scenario() -> None:
        pool = serving_pool(2)
        request = request_on(pool, pool.slots[0], qwen_tokenizer, "r")
        request.replica_deaths = ["earlier"]
        pool.supervisor.mark_down(pool.slots[0], "drained", died=False)
        await asyncio.sleep(0)
        assert not request.done and replica_of(pool, request) is pool.slots[1]

    asyncio.run(scenario())


def test_with_no_replica_serving_waiting_failovers_fail_at_once(qwen_tokenizer: Tokenizer) -> None:
    async def scenario() -> None:
        pool = serving_pool(1)
        request = request_on(pool, pool.slots[0], qwen_tokenizer, "r")
        pool.supervisor.mark_down(pool.slots[0], "killed")
        failure = await request.next_chunk()
        assert isinstance(failure, RequestFailed) and failure.code == grpc.StatusCode.UNAVAILABLE
        assert "no healthy replica" in failure.message

    asyncio.run(scenario())


def test_the_budget_skips_requests_that_ended_and_keeps_order(qwen_tokenizer: Tokenizer) -> None:
    budget = RetryBudget()
    free = ReplicaSlot("free", state="serving")
    requests = [make_request(qwen_tokenizer, f"r{i}") for i in range(3)]
    requests[0].fail(grpc.StatusCode.CANCELLED, "ended")
    for request in requests:
        budget.wait(request, frozenset())
    admitted = budget.admit([free])
    first, exclude, busy = next(admitted)
    assert first is requests[1] and exclude == busy == frozenset()
    first.replica_deaths = ["x"]
    free.add(first)  # the caller placed it: the replica now has a failover in progress
    assert next(admitted, None) is None and len(budget) == 1


def test_a_moved_request_every_replica_refuses_fails_instead_of_waiting(qwen_tokenizer: Tokenizer) -> None:
    async def scenario() -> None:
        pool = serving_pool(3)
        for slot in pool.slots[1:]:
            fake(slot).refusal = SubmitError("resource_exhausted", "queue full")
        request = request_on(pool, pool.slots[0], qwen_tokenizer, "r")
        pool.supervisor.mark_down(pool.slots[0], "killed")
        failure = await asyncio.wait_for(request.next_chunk(), 5)
        assert isinstance(failure, RequestFailed) and failure.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "every replica's queue is full (after its replica failed)" in failure.message
        assert [len(fake(slot).submitted) for slot in pool.slots[1:]] == [1, 1] and len(pool.budget) == 0

    asyncio.run(scenario())
