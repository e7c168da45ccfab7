"""What both front doors (gRPC and the OpenAI-compatible HTTP API) call below their protocols: validate a
GenerateRequest, place it on a replica, hand out its chunks, count how it ended, and abort it when the client
leaves. Routing, failover and backpressure live below this, in the replica pool: one path for both."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from engine.tokenizer import Tokenizer
from proto import nanoserve_pb2 as pb
from router.inflight import Failure, InFlightRequest
from router.replica_pool import PoolError, ReplicaPool
from router.validation import InvalidRequest, RequestValidator, UndecodableRequest
from worker.messages import EngineInfo

log = logging.getLogger(__name__)


class RequestFailed(Exception):
    """A request refused, or ended before its last chunk: the status (gRPC's codes are the router's vocabulary;
    the HTTP front door maps them to HTTP statuses) and why."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class ServingCore:
    def __init__(self, pool: ReplicaPool, tokenizer: Tokenizer, info: EngineInfo, model_name: str) -> None:
        self.pool, self.tokenizer, self.info, self.model_name = pool, tokenizer, info, model_name
        self.validator = RequestValidator(tokenizer, info)
        self.draining = False  # set on shutdown: new requests get UNAVAILABLE, those in flight finish

    async def start(self, request: pb.GenerateRequest | UndecodableRequest) -> InFlightRequest:
        """Validate and place the request; RequestFailed if it cannot be. The caller must `release` what it gets."""
        if self.draining:
            raise self.refuse(grpc.StatusCode.UNAVAILABLE, "the router is draining")
        try:
            prepared = self.validator.prepare(request)
        except InvalidRequest as e:
            raise self.refuse(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        inflight = InFlightRequest(prepared, self.tokenizer)
        try:
            await self.pool.submit(inflight)
        except PoolError as e:
            raise self.refuse(e.code, e.message) from None
        except asyncio.CancelledError:  # the client left while it was being placed
            self.release(inflight)
            raise
        self.pool.metrics.tokens.labels("in").inc(len(prepared.prompt_token_ids))
        return inflight

    async def chunks(self, inflight: InFlightRequest) -> AsyncIterator[pb.GenerateResponse]:
        """The request's chunks, up to the last one (finish_reason set); RequestFailed if it fails on the way."""
        while True:
            chunk = await inflight.next_chunk()
            if isinstance(chunk, Failure):
                self.count(chunk.code)
                raise RequestFailed(chunk.code, chunk.message)
            yield chunk
            if chunk.finish_reason:
                return

    def release(self, inflight: InFlightRequest) -> None:
        """The front door is done with the request, however it ended. One the client left early (cancelled,
        deadline passed, disconnected) is aborted: its replica frees its KV blocks within a step."""
        if not inflight.done:
            self.pool.abort(inflight)
            self.count(grpc.StatusCode.CANCELLED)
            log.info("request %s cancelled after %d tokens", inflight.request_id, len(inflight.output_token_ids))

    def refuse(self, code: grpc.StatusCode, message: str) -> RequestFailed:
        """Count and log a refusal; the error to raise."""
        self.count(code)
        log.info("refused a request: %s: %s", code.name, message)
        return RequestFailed(code, message)

    def count(self, code: grpc.StatusCode) -> None:
        self.pool.metrics.requests.labels(code.name).inc()
