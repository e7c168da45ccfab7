"""A request whose replicas keep failing under it is not moved forever: it may be what kills them."""

from __future__ import annotations

import asyncio

import grpc

from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from router.config import RouterConfig
from router.inflight import Failure, InFlightRequest
from router.metrics import RouterMetrics
from router.policies import make_policy
from router.replica_pool import ReplicaPool
from router.request_state import RequestState
from router.validation import PreparedRequest


def test_request_is_failed_after_max_failovers(qwen_tokenizer: Tokenizer) -> None:
    async def scenario() -> Failure:
        config = RouterConfig(max_failovers_per_request=2)
        pool = ReplicaPool(config, make_policy("prefix"), RouterMetrics())  # no replica serves
        request = InFlightRequest(PreparedRequest("r", [1, 2, 3], SamplingParams(seed=1), []), qwen_tokenizer)
        request.set_state(RequestState.RUNNING)
        request.num_failovers = 2  # it moved twice already
        pool._fail_over([request], frozenset())
        assert request.done
        chunk = await request.next_chunk()
        assert isinstance(chunk, Failure)
        return chunk

    failure = asyncio.run(scenario())
    assert failure.code == grpc.StatusCode.UNAVAILABLE and "failed 3 times" in failure.message
