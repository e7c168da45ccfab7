"""InFlightRequest's output buffer (one coalesced message per request) and the pool pausing a request whose
client falls behind, without Ray: the pool's delivery and resume paths on a slot with no actor."""

from __future__ import annotations

import asyncio

import grpc

from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from proto import nanoserve_pb2 as pb
from router.config import RouterConfig
from router.inflight import Failure, InFlightRequest
from router.metrics import RouterMetrics
from router.policies import make_policy
from router.replica_pool import PoolError, ReplicaPool, ReplicaSlot
from router.request_state import RequestState
from router.validation import PreparedRequest
from worker.messages import RequestDelta, StepEvents


def make_request(tokenizer: Tokenizer, max_tokens: int = 100) -> InFlightRequest:
    return InFlightRequest(PreparedRequest("r", [1, 2, 3], SamplingParams(seed=1, max_tokens=max_tokens), []),
                           tokenizer)


def delta(request: InFlightRequest, token_ids: list[int], finished: bool = False) -> RequestDelta:
    return RequestDelta(request.engine_request_id, token_ids, finished, "length" if finished else None, 3, 0, [])


def test_output_waiting_for_the_client_is_one_message(qwen_tokenizer: Tokenizer) -> None:
    hello, world = qwen_tokenizer.encode("Hello"), qwen_tokenizer.encode(" world")

    async def scenario() -> tuple[pb.GenerateResponse, pb.GenerateResponse]:
        request = make_request(qwen_tokenizer)
        request.on_delta(delta(request, hello), "a")
        request.on_delta(delta(request, world), "a")
        assert request.num_pending_tokens == len(hello + world)
        first = await request.next_chunk()
        assert request.num_pending_tokens == 0
        request.on_delta(delta(request, [11], finished=True), "a")
        return first, await request.next_chunk()  # type: ignore[return-value]

    first, last = asyncio.run(scenario())
    assert first.text == "Hello world" and list(first.token_ids) == hello + world
    assert first.request_id == "r" and first.finish_reason == pb.FINISH_REASON_UNSPECIFIED
    assert list(last.token_ids) == [11] and last.finish_reason == pb.FINISH_REASON_LENGTH
    assert last.usage.completion_tokens == len(hello + world) + 1 and last.replica == "a"


def test_a_failure_comes_after_the_output_already_waiting(qwen_tokenizer: Tokenizer) -> None:
    async def scenario() -> list[pb.GenerateResponse | Failure]:
        request = make_request(qwen_tokenizer)
        reader = asyncio.ensure_future(request.next_chunk())  # waits: nothing yet
        await asyncio.sleep(0)
        request.on_delta(delta(request, [5, 6]), "a")
        request.fail(grpc.StatusCode.UNAVAILABLE, "gone")
        return [await reader, await request.next_chunk()]

    output, failure = asyncio.run(scenario())
    assert isinstance(output, pb.GenerateResponse) and list(output.token_ids) == [5, 6]
    assert failure == Failure(grpc.StatusCode.UNAVAILABLE, "gone")


def test_a_request_whose_client_falls_behind_is_paused_then_resumed(qwen_tokenizer: Tokenizer) -> None:
    async def scenario() -> None:
        metrics = RouterMetrics()
        pool = ReplicaPool(RouterConfig(max_stream_buffer_tokens=4), make_policy("prefix"), metrics)
        slot = ReplicaSlot("a", state="serving")
        request = make_request(qwen_tokenizer)
        submitted: list[str] = []

        async def submit(r: InFlightRequest, exclude: frozenset[str] = frozenset()) -> None:
            r.set_state(RequestState.PLACING)
            slot.inflight[r.engine_request_id] = r
            r.set_state(RequestState.RUNNING)
            submitted.append(r.engine_request_id)

        pool.submit = submit  # type: ignore[method-assign]
        await pool.submit(request)
        for step in range(3):  # 2 tokens a step; the client reads nothing
            pool._deliver(slot, StepEvents("a", "e", step + 1, 1, [delta(request, [7, 8])], [], []))
        assert request.state is RequestState.PAUSED and not slot.inflight  # off its replica at 6 > 4 pending tokens
        pool._deliver(slot, StepEvents("a", "e", 4, 1, [delta(request, [9])], [], []))  # the aborted attempt's
        assert request.num_pending_tokens == 6 and list((await request.next_chunk()).token_ids) == [7, 8] * 3
        await pool.resume(request)
        assert request.state is RequestState.RUNNING and submitted == ["r#1", "r#2"]
        assert request.spec().prompt_token_ids == [1, 2, 3, 7, 8, 7, 8, 7, 8]
        assert request.spec().sampling_params["max_tokens"] == 94
        assert metrics.slow_clients.labels("paused")._value.get() == 1
        assert metrics.slow_clients.labels("resumed")._value.get() == 1

        async def refuse(r: InFlightRequest, exclude: frozenset[str] = frozenset()) -> None:
            raise PoolError(grpc.StatusCode.UNAVAILABLE, "no healthy replica")

        pool.submit = refuse  # type: ignore[method-assign]
        request.set_state(RequestState.PAUSED)
        await pool.resume(request)
        failure = await request.next_chunk()
        assert isinstance(failure, Failure) and failure.code == grpc.StatusCode.UNAVAILABLE

    asyncio.run(scenario())
