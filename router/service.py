"""The gRPC service: validate, place on a replica, stream the replica's tokens back as text."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import NoReturn

import grpc

from engine.tokenizer import Tokenizer
from proto import nanoserve_pb2 as pb
from proto import nanoserve_pb2_grpc
from router.inflight import Failure, InFlightRequest
from router.replica_pool import PoolError, ReplicaPool
from router.validation import InvalidRequest, RequestValidator, UndecodableRequest
from worker.messages import EngineInfo

log = logging.getLogger(__name__)

_STATES = {"starting": pb.REPLICA_STATE_STARTING, "serving": pb.REPLICA_STATE_SERVING,
           "down": pb.REPLICA_STATE_DOWN, "draining": pb.REPLICA_STATE_DRAINING}


class NanoServeService(nanoserve_pb2_grpc.NanoServeServicer):
    def __init__(self, pool: ReplicaPool, tokenizer: Tokenizer, info: EngineInfo, model_name: str) -> None:
        self.pool, self.tokenizer, self.info, self.model_name = pool, tokenizer, info, model_name
        self.validator = RequestValidator(tokenizer, info)
        self.draining = False
        self._streams: set[_Stream] = set()  # open Generate calls, watched by `end_stalled_streams`

    async def Generate(  # noqa: N802 (gRPC method name)
        self, request: pb.GenerateRequest | UndecodableRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        inflight = await self._start(request, context)
        task = asyncio.current_task()
        assert task is not None  # grpc.aio runs each call in a task
        stream = _Stream(inflight, context, task)
        self._streams.add(stream)
        try:
            while True:
                if inflight.paused and not inflight.done:  # the client has read everything: generate again
                    await self.pool.resume(inflight)
                chunk = await inflight.next_chunk()
                if isinstance(chunk, Failure):
                    self._count(chunk.code)
                    await context.abort(chunk.code, chunk.message)
                    return
                inflight.writing_since = time.monotonic()
                yield chunk  # returns once gRPC took the message: the client's flow-control window had room
                inflight.writing_since = None
                if chunk.finish_reason:
                    return
        finally:
            self._streams.discard(stream)
            if not inflight.done:  # the client cancelled or its deadline passed: free the replica's blocks now
                self.pool.abort(inflight)
                self._count(grpc.StatusCode.CANCELLED)
                log.info("request %s cancelled after %d tokens", inflight.request_id, len(inflight.output_token_ids))

    async def Complete(  # noqa: N802
        self, request: pb.GenerateRequest | UndecodableRequest, context: grpc.aio.ServicerContext
    ) -> pb.CompleteResponse:
        response = pb.CompleteResponse()
        async for chunk in self.Generate(request, context):
            response.text += chunk.text
            response.token_ids.extend(chunk.token_ids)
            response.logprobs.extend(chunk.logprobs)
            if chunk.finish_reason:
                response.finish_reason, response.replica = chunk.finish_reason, chunk.replica
                response.request_id = chunk.request_id
                response.usage.CopyFrom(chunk.usage)
        return response

    async def GetModelInfo(  # noqa: N802
        self, request: pb.GetModelInfoRequest | UndecodableRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        await self._refuse_undecodable(request, context)
        info = self.info
        return pb.ModelInfo(
            model_name=self.model_name, model_dir=info.model_dir, random_weights=info.random_weights,
            max_model_len=info.max_model_len, vocab_size=info.vocab_size, block_size=info.block_size,
            tensor_parallel_size=info.tensor_parallel_size, dtype=info.dtype, eos_token_ids=info.eos_token_ids,
            has_chat_template=self.tokenizer.has_chat_template,
        )

    async def GetClusterStatus(  # noqa: N802
        self, request: pb.GetClusterStatusRequest | UndecodableRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClusterStatus:
        await self._refuse_undecodable(request, context)
        status = pb.ClusterStatus(routing_policy=self.pool.policy.name)
        for slot in self.pool.slots:
            replica = status.replicas.add(name=slot.name, state=_STATES[slot.state],
                                          num_inflight_requests=len(slot.inflight), num_restarts=slot.num_restarts)
            if slot.stats is not None:
                engine = slot.stats.engine
                replica.num_running, replica.num_waiting = engine.num_running, engine.num_waiting
                replica.num_kv_blocks_used = engine.num_kv_blocks_used
                replica.num_kv_blocks_total = engine.num_kv_blocks_total
                replica.prefix_cache_hit_rate = engine.num_prefix_hit_tokens / max(1, engine.num_prompt_tokens)
        return status

    async def _start(
        self, request: pb.GenerateRequest | UndecodableRequest, context: grpc.aio.ServicerContext
    ) -> InFlightRequest:
        """Validate and place the request, or end the RPC with the status that says why not."""
        if self.draining:
            await self._refuse(context, grpc.StatusCode.UNAVAILABLE, "the router is draining")
        try:
            prepared = self.validator.prepare(request)
        except InvalidRequest as e:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        inflight = InFlightRequest(prepared, self.tokenizer)
        try:
            await self.pool.submit(inflight)
        except PoolError as e:
            await self._refuse(context, e.code, e.message)
        self.pool.metrics.tokens_in.inc(len(prepared.prompt_token_ids))
        return inflight

    async def end_stalled_streams(self) -> None:
        """Forever: end the streams whose client has taken no output for `stalled_stream_timeout_s`.

        Such a client keeps its connection (so gRPC never cancels the call) but stopped reading. Its request
        is stopped, and the call ends with RESOURCE_EXHAUSTED, which the client sees after the output gRPC
        already holds for it; grpc.aio cannot reset one stream, so that output stays until the client reads
        or disconnects, bounded by its flow-control window.
        """
        timeout_s = self.pool.config.stalled_stream_timeout_s
        while True:
            await asyncio.sleep(min(1.0, timeout_s / 4))
            now = time.monotonic()
            for stream in [s for s in self._streams if s.stalled_for(now) > timeout_s]:
                self._end_stalled(stream, timeout_s)

    def _end_stalled(self, stream: _Stream, timeout_s: float) -> None:
        self._streams.discard(stream)
        inflight = stream.inflight
        self.pool.abort(inflight)
        self.pool.metrics.slow_clients.labels("ended").inc()
        self._count(grpc.StatusCode.RESOURCE_EXHAUSTED)
        log.warning("request %s: its client took no output for %g s; ending the stream after %d tokens",
                    inflight.request_id, timeout_s, len(inflight.output_token_ids))
        message = f"the client read nothing for {timeout_s:g} s (stalled_stream_timeout_s); the request was stopped"
        asyncio.create_task(_abort_call(stream.context, message))
        stream.task.cancel()  # its handler stops waiting for the write; the abort above sends the status

    async def _refuse_undecodable(self, request: object, context: grpc.aio.ServicerContext) -> None:
        if isinstance(request, UndecodableRequest):
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(request.error()))

    async def _refuse(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
        self._count(code)
        log.info("refused a request: %s: %s", code.name, message)
        await context.abort(code, message)
        raise AssertionError("context.abort raises")

    def _count(self, code: grpc.StatusCode) -> None:
        self.pool.metrics.requests.labels(code.name).inc()


@dataclass(eq=False, slots=True)
class _Stream:
    """One open Generate call: its request, and the gRPC call and task that end it if its client stalls."""

    inflight: InFlightRequest
    context: grpc.aio.ServicerContext
    task: asyncio.Task[object]

    def stalled_for(self, now: float) -> float:
        """Seconds gRPC has been waiting for room in the client's window to send a chunk (0 if not waiting)."""
        since = self.inflight.writing_since
        return 0.0 if since is None else now - since


async def _abort_call(context: grpc.aio.ServicerContext, message: str) -> None:
    with contextlib.suppress(grpc.aio.BaseError):  # AbortError is how abort returns; or the call already ended
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
