"""What both front doors (gRPC and the OpenAI-compatible HTTP API) call below their protocols: validate a
GenerateRequest, place it on a replica, hand out its chunks, count how it ended, and abort it when the client
leaves. Routing, failover and backpressure live below this, in the replica pool: one path for both."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc

from engine.tokenizer import Tokenizer
from proto import nanoserve_pb2 as pb
from router.errors import RequestFailed
from router.inflight import InFlightRequest
from router.replica_pool import PoolError, ReplicaPool
from router.request_state import RequestState
from router.validation import InvalidRequest, RequestValidator, UndecodableRequest
from worker.messages import EngineInfo

log = logging.getLogger(__name__)


class ServingCore:
    def __init__(
        self, pool: ReplicaPool, tokenizer: Tokenizer, info: EngineInfo, model_name: str,
        reasoning_parser: str | None = None,
    ) -> None:
        self.pool, self.tokenizer, self.info, self.model_name = pool, tokenizer, info, model_name
        self.validator = RequestValidator(tokenizer, info, reasoning_parser)
        self.draining = False  # set on shutdown: new requests get UNAVAILABLE, those in flight finish
        self._streams: set[_Stream] = set()  # requests being streamed, watched by `end_stalled_streams`

    async def start(
        self, request: pb.GenerateRequest | UndecodableRequest, max_tokens_to_context_end: bool = False
    ) -> InFlightRequest:
        """Validate and place the request; RequestFailed if it cannot be. The caller must `release` what it gets.
        `max_tokens_to_context_end`: see RequestValidator.prepare."""
        if self.draining:
            raise self.refuse(grpc.StatusCode.UNAVAILABLE, "the router is draining")
        try:
            prepared = self.validator.prepare(request, max_tokens_to_context_end)
        except InvalidRequest as e:
            raise self.refuse(grpc.StatusCode.INVALID_ARGUMENT, e.message, e.field) from None
        inflight = InFlightRequest(prepared, self.tokenizer)
        try:
            await self.pool.submit(inflight)
        except PoolError as e:
            raise self.refuse(e.code, e.message) from None
        except asyncio.CancelledError:  # the client left while it was being placed
            self.release(inflight)
            raise
        self.pool.metrics.tokens_in.inc(len(prepared.prompt_token_ids))
        return inflight

    async def chunks(
        self, inflight: InFlightRequest, on_stalled: Callable[[str], None] | None = None
    ) -> AsyncIterator[pb.GenerateResponse]:
        """The request's chunks, up to the last one (usage set: every choice has finished); RequestFailed if it
        fails on the way.

        The caller sends each chunk before it asks for the next. A request paused because its client fell
        behind (see router/event_pump.py) is resumed here once the client has taken everything. If sending
        one chunk takes over the stalled-stream timeout, `end_stalled_streams` stops the request, calls
        `on_stalled(message)` (how the front door ends its call, if it needs more than a cancelled task)
        and cancels the caller's task.
        """
        task = asyncio.current_task()
        assert task is not None
        stream = _Stream(inflight, task, on_stalled)
        self._streams.add(stream)
        try:
            while True:
                if inflight.state is RequestState.PAUSED:  # the client has read everything: generate again
                    await self.pool.resume(inflight)
                chunk = await inflight.next_chunk()
                if isinstance(chunk, RequestFailed):
                    self.count(chunk.code)
                    raise chunk
                inflight.writing_since = time.monotonic()
                yield chunk  # resumes once the caller sent it: the client's flow-control window had room
                inflight.writing_since = None
                if chunk.HasField("usage"):
                    return
        finally:
            self._streams.discard(stream)

    def streaming(self) -> list[InFlightRequest]:
        """The requests whose chunks are being sent now (those `end_stalled_streams` watches)."""
        return [stream.inflight for stream in self._streams]

    async def end_stalled_streams(self) -> None:
        """Forever: end the streams whose client has taken no output for `stalled_stream_timeout_s`.

        Such a client keeps its connection (so nothing cancels the call) but stopped reading. Its request
        is stopped and counted as RESOURCE_EXHAUSTED; gRPC's status then reaches the client after the output
        gRPC already holds for it (grpc.aio cannot reset one stream), which stays until the client reads or
        disconnects, bounded by its flow-control window.
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
        self.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
        log.warning("request %s: its client took no output for %g s; ending the stream after %d tokens",
                    inflight.request_id, timeout_s, inflight.num_output_tokens)
        if stream.on_stalled is not None:
            stream.on_stalled(f"the client read nothing for {timeout_s:g} s (stalled_stream_timeout_s); "
                              "the request was stopped")
        stream.task.cancel()  # its sender stops waiting for the write

    def release(self, inflight: InFlightRequest) -> None:
        """The front door is done with the request, however it ended. One the client left early (cancelled,
        deadline passed, disconnected) is aborted: its replica frees its KV blocks within a step."""
        if not inflight.done:
            self.pool.abort(inflight)
            self.count(grpc.StatusCode.CANCELLED)
            log.info("request %s cancelled after %d tokens", inflight.request_id, inflight.num_output_tokens)

    def refuse(self, code: grpc.StatusCode, message: str, field: str | None = None) -> RequestFailed:
        """Count and log a refusal; the error to raise."""
        failed = RequestFailed(code, message, field)
        self.count(code)
        log.info("refused a request: %s: %s", code.name, failed)
        return failed

    def count(self, code: grpc.StatusCode) -> None:
        self.pool.metrics.requests.labels(code.name).inc()


@dataclass(eq=False, slots=True)
class _Stream:
    """A request being streamed: the task sending its chunks, and how its front door ends a stalled call."""

    inflight: InFlightRequest
    task: asyncio.Task[object]
    on_stalled: Callable[[str], None] | None

    def stalled_for(self, now: float) -> float:
        """Seconds the sender has been trying to send one chunk (0 if it is not sending)."""
        since = self.inflight.writing_since
        return 0.0 if since is None else now - since
