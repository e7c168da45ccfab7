"""The gRPC front door: NanoServe's methods over the ServingCore the HTTP API shares."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import NoReturn

import grpc

from proto import nanoserve_pb2 as pb
from proto import nanoserve_pb2_grpc
from router.core import ServingCore
from router.errors import RequestFailed
from router.validation import UndecodableRequest

_STATES = {"starting": pb.REPLICA_STATE_STARTING, "serving": pb.REPLICA_STATE_SERVING,
           "down": pb.REPLICA_STATE_DOWN, "draining": pb.REPLICA_STATE_DRAINING}


class NanoServeService(nanoserve_pb2_grpc.NanoServeServicer):
    def __init__(self, core: ServingCore) -> None:
        self.core = core
        self._ending: set[asyncio.Task[None]] = set()

    async def Generate(  # noqa: N802 (gRPC method name)
        self, request: pb.GenerateRequest | UndecodableRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            inflight = await self.core.start(request)
        except RequestFailed as e:
            await _abort(context, e)
        try:
            async for chunk in self.core.chunks(inflight, on_stalled=lambda message: self._end_call(context, message)):
                yield chunk
        except RequestFailed as e:
            await _abort(context, e)
        finally:  # also when the client cancelled or its deadline passed: then the request is aborted
            self.core.release(inflight)

    async def Complete(  # noqa: N802
        self, request: pb.GenerateRequest | UndecodableRequest, context: grpc.aio.ServicerContext
    ) -> pb.CompleteResponse:
        choices: dict[int, pb.CompleteChoice] = {}
        response = pb.CompleteResponse()
        async for chunk in self.Generate(request, context):
            choice = choices.setdefault(chunk.index, pb.CompleteChoice(index=chunk.index))
            choice.text += chunk.text
            choice.reasoning_text += chunk.reasoning_text
            choice.tool_calls.extend(chunk.tool_calls)
            choice.token_ids.extend(chunk.token_ids)
            choice.logprobs.extend(chunk.logprobs)
            if chunk.finish_reason:
                choice.finish_reason, choice.replica = chunk.finish_reason, chunk.replica
            if chunk.HasField("usage"):
                response.request_id = chunk.request_id
                response.usage.CopyFrom(chunk.usage)
        first = choices[0]
        response.text, response.reasoning_text, response.replica = first.text, first.reasoning_text, first.replica
        response.token_ids.extend(first.token_ids)
        response.logprobs.extend(first.logprobs)
        response.tool_calls.extend(first.tool_calls)
        response.finish_reason = first.finish_reason
        if len(choices) > 1:
            response.choices.extend(choices[i] for i in sorted(choices))
        return response

    async def GetModelInfo(  # noqa: N802
        self, request: pb.GetModelInfoRequest | UndecodableRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        await self._refuse_undecodable(request, context)
        info = self.core.info
        return pb.ModelInfo(
            model_name=self.core.model_name, model_dir=info.model_dir, random_weights=info.random_weights,
            max_model_len=info.max_model_len, vocab_size=info.vocab_size, block_size=info.block_size,
            tensor_parallel_size=info.tensor_parallel_size, dtype=info.dtype, kv_cache_dtype=info.kv_cache_dtype,
            eos_token_ids=info.eos_token_ids,
            has_chat_template=self.core.tokenizer.has_chat_template,
            sampling_defaults=pb.SamplingParams(**info.sampling_defaults),
        )

    async def GetClusterStatus(  # noqa: N802
        self, request: pb.GetClusterStatusRequest | UndecodableRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClusterStatus:
        await self._refuse_undecodable(request, context)
        pool = self.core.pool
        status = pb.ClusterStatus(routing_policy=pool.policy.name)
        for slot in pool.slots:
            replica = status.replicas.add(name=slot.name, state=_STATES[slot.state],
                                          num_inflight_requests=len(slot.inflight), num_restarts=slot.num_restarts)
            if slot.stats is not None:
                engine = slot.stats.engine
                replica.num_running, replica.num_waiting = engine.num_running, engine.num_waiting
                replica.num_kv_blocks_used = engine.num_kv_blocks_used
                replica.num_kv_blocks_total = engine.num_kv_blocks_total
                replica.prefix_cache_hit_rate = engine.num_prefix_hit_tokens / max(1, engine.num_prompt_tokens)
        return status

    def _end_call(self, context: grpc.aio.ServicerContext, message: str) -> None:
        """End a stalled call with RESOURCE_EXHAUSTED: cancelling its handler alone would leave it open."""
        task = asyncio.create_task(_abort_quietly(context, message))
        self._ending.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._ending.discard)

    async def _refuse_undecodable(self, request: object, context: grpc.aio.ServicerContext) -> None:
        if isinstance(request, UndecodableRequest):
            invalid = request.error()
            await _abort(context, self.core.refuse(grpc.StatusCode.INVALID_ARGUMENT, invalid.message, invalid.field))


async def _abort(context: grpc.aio.ServicerContext, error: RequestFailed) -> NoReturn:
    await context.abort(error.code, str(error))
    raise AssertionError("context.abort raises")


async def _abort_quietly(context: grpc.aio.ServicerContext, message: str) -> None:
    with contextlib.suppress(grpc.aio.BaseError):  # AbortError is how abort returns; or the call already ended
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
