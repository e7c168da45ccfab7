"""A request whose replicas keep failing under it is not moved forever: it may be what kills them."""

from __future__ import annotations

import asyncio

import grpc

from engine.tokenizer import Tokenizer
from router.errors import RequestFailed
from tests.router.fakes import make_request, place, serving_pool


def test_request_is_failed_after_max_failovers(qwen_tokenizer: Tokenizer) -> None:
    async def scenario() -> RequestFailed:
        pool = serving_pool(2, max_failovers_per_request=2)
        request = make_request(qwen_tokenizer)
        place(pool, request)
        for moves in (1, 2):  # its replica lost batches with its tokens (no death): it is taken off and moved
            pool.placement.cancel(request)
            pool.supervisor.fail_over([request])
            await asyncio.sleep(0)
            assert not request.done and request.num_failovers == moves and request.attempt == moves + 1
        pool.placement.cancel(request)
        pool.supervisor.fail_over([request])
        assert request.done
        chunk = await request.next_chunk()
        assert isinstance(chunk, RequestFailed)
        return chunk

    failure = asyncio.run(scenario())
    assert failure.code == grpc.StatusCode.UNAVAILABLE and "failed 3 times" in failure.message
