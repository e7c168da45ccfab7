"""The router's record of one request in flight: what it asked for, what the client has been sent,
and the output waiting for the client. It outlives any one replica: failover (and a pause for a slow
client) resubmits from it."""

from __future__ import annotations

import asyncio
import time

import grpc

from engine.tokenizer import Tokenizer
from proto import nanoserve_pb2 as pb
from router.errors import RequestFailed
from router.reasoning import ReasoningSplitter
from router.request_state import NEXT_STATES, RequestState
from router.text_stream import TextStream
from router.tool_calls import ToolCallParser
from router.validation import PreparedRequest
from worker.messages import RequestDelta, RequestSpec

FINISH_REASONS = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}


class InFlightRequest:
    """One request across its attempts: what it asked for, what its client was sent, what waits for it."""

    def __init__(self, prepared: PreparedRequest, tokenizer: Tokenizer) -> None:
        self.prepared = prepared
        self.output_token_ids: list[int] = []
        self.num_cached_tokens: int | None = None  # from the first replica that admitted it
        self._state = RequestState.PLACING
        self.attempt = 0  # placements so far: each attempt has its own engine request id
        self.num_failovers = 0
        # Replicas that died while running it since its last token (the retry budget's suspicion of it).
        self.replica_deaths: list[str] = []
        self.arrived_at = time.monotonic()
        self.first_token_at: float | None = None
        self.writing_since: float | None = None  # time.monotonic() while the client is being sent a chunk
        self._text = TextStream(tokenizer, prepared.params.stop)
        self._reasoning = ReasoningSplitter() if prepared.split_reasoning else None
        self._tool_calls = ToolCallParser() if prepared.parse_tool_calls else None  # parses the reply, not reasoning
        # Output the client has not taken yet, coalesced into one message: a reader that falls behind gets
        # fewer, larger chunks, and the router holds one message per request, whatever the lag.
        self._pending: pb.GenerateResponse | None = None
        self.num_pending_tokens = 0
        self._failure: RequestFailed | None = None  # the stream's end instead of a last chunk, after the pending output
        self._reader: asyncio.Future[None] | None = None  # set while `next_chunk` waits

    @property
    def request_id(self) -> str:
        return self.prepared.request_id

    @property
    def engine_request_id(self) -> str:
        return f"{self.prepared.request_id}#{self.attempt}"

    @property
    def state(self) -> RequestState:
        return self._state

    @property
    def done(self) -> bool:
        return self._state is RequestState.DONE

    def set_state(self, state: RequestState) -> None:
        """Move to `state`, which must be legal from the current one. Each placement is a new attempt."""
        assert state in NEXT_STATES[self._state], f"request {self.request_id}: {self._state.value} -> {state.value}"
        self._state = state
        if state is RequestState.PLACING:
            self.attempt += 1

    @property
    def num_tokens(self) -> int:
        """Prompt + output tokens so far: this request's KV footprint, the unit of replica load."""
        return len(self.prepared.prompt_token_ids) + len(self.output_token_ids)

    def spec(self) -> RequestSpec:
        """What to submit for the current attempt: after a failover, prompt + the tokens already sent
        (marked as resumed, so output penalties still count them), with the budgets reduced by them. The
        seed stays, and the engine keys randomness by token position, so the continuation is the one an
        undisturbed run would have produced."""
        params = self.prepared.params
        n = len(self.output_token_ids)
        sampling = params.as_kwargs()
        sampling.update(max_tokens=params.max_tokens - n, min_tokens=max(0, params.min_tokens - n))
        return RequestSpec(self.engine_request_id, self.prepared.prompt_token_ids + self.output_token_ids, sampling, n)

    def on_delta(self, delta: RequestDelta, replica: str) -> bool:
        """Apply one replica delta; True when the request is now finished (by the engine or a stop string)."""
        if self.done:
            return True
        if self.num_cached_tokens is None:
            self.num_cached_tokens = delta.num_cached_tokens
        if delta.new_token_ids:
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
            self.replica_deaths = []  # its replica survived it: no longer a suspect
        self.output_token_ids += delta.new_token_ids
        text = self._text.add(delta.new_token_ids)
        finish_reason = "stop" if self._text.hit_stop else delta.finish_reason if delta.finished else None
        if finish_reason is not None:
            text += self._text.finish()
            self.set_state(RequestState.DONE)
        reasoning, text = self._reasoning.split(text, self.done) if self._reasoning else ("", text)
        text, tool_calls = self._tool_calls.parse(text, self.done) if self._tool_calls else (text, [])
        if not (text or reasoning or tool_calls or delta.new_token_ids or self.done):
            return False
        chunk = self._pending
        if chunk is None:
            chunk = self._pending = pb.GenerateResponse(request_id=self.request_id)
        chunk.text += text
        chunk.reasoning_text += reasoning
        chunk.tool_calls.extend(tool_calls)
        chunk.token_ids.extend(delta.new_token_ids)
        chunk.logprobs.extend(_logprobs(delta))
        self.num_pending_tokens += len(delta.new_token_ids)
        if finish_reason is not None:
            chunk.finish_reason = FINISH_REASONS[finish_reason]
            chunk.replica = replica
            chunk.usage.CopyFrom(self.usage())
        self._wake_reader()
        return self.done

    def usage(self) -> pb.Usage:
        return pb.Usage(
            prompt_tokens=len(self.prepared.prompt_token_ids),
            completion_tokens=len(self.output_token_ids),
            cached_prompt_tokens=self.num_cached_tokens or 0,
        )

    def fail(self, code: grpc.StatusCode, message: str) -> None:
        """End the stream with this status, after the output already waiting for the client."""
        if not self.done:
            self.set_state(RequestState.DONE)
            self._failure = RequestFailed(code, message)
            self._wake_reader()

    async def next_chunk(self) -> pb.GenerateResponse | RequestFailed:
        """All the output that waits for the client, as one message; then, at the end, how it failed if it did."""
        while self._pending is None and self._failure is None:
            self._reader = asyncio.get_running_loop().create_future()
            await self._reader
        chunk, self._pending, self.num_pending_tokens = self._pending, None, 0
        return chunk if chunk is not None else self._failure  # type: ignore[return-value]

    def _wake_reader(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)


def _logprobs(delta: RequestDelta) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token_id=entry["token_id"], logprob=entry["logprob"],
            top_logprobs=[pb.TopLogprob(token_id=t, logprob=lp) for t, lp in entry["top_logprobs"].items()],
        )
        for entry in delta.logprobs
    ]
