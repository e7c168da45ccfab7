"""The router's record of one request in flight: what it asked for, what the client has been sent (per choice),
and the output waiting for the client. It outlives any one replica: failover (and a pause for a slow
client) resubmits from it."""

from __future__ import annotations

import asyncio
import time

import grpc

from engine.tokenizer import Tokenizer
from proto import nanoserve_pb2 as pb
from router.choice_output import ChoiceOutput
from router.errors import RequestFailed
from router.request_state import NEXT_STATES, RequestState
from router.validation import PreparedRequest
from worker.messages import RequestDelta, RequestSpec

FINISH_REASONS = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}


class InFlightRequest:
    """One request across its attempts: what it asked for, what its client was sent, what waits for it."""

    def __init__(self, prepared: PreparedRequest, tokenizer: Tokenizer) -> None:
        self.prepared = prepared
        self.choices = [ChoiceOutput(index, prepared, tokenizer) for index in range(prepared.params.n)]
        # The current attempt's engine request ids -> the choice each runs (None: every choice, by its index).
        self.engine_choices: dict[str, int | None] = {}
        self.num_cached_tokens: int | None = None  # from the first replica that admitted it
        self._state = RequestState.PLACING
        self.attempt = 0  # placements so far: each attempt has its own engine request id
        self.num_failovers = 0
        # Replicas that died while running it since its last token (the retry budget's suspicion of it).
        self.replica_deaths: list[str] = []
        self.arrived_at = time.monotonic()
        self.first_token_at: float | None = None
        self.writing_since: float | None = None  # time.monotonic() while the client is being sent a chunk
        # Output the client has not taken yet, coalesced into one message per choice: a reader that falls behind
        # gets fewer, larger chunks, and the router holds n messages per request, whatever the lag.
        self._pending: dict[int, pb.GenerateResponse] = {}
        self.num_pending_tokens = 0
        self._failure: RequestFailed | None = None  # the stream's end instead of a last chunk, after the pending output
        self._reader: asyncio.Future[None] | None = None  # set while `next_chunk` waits

    @property
    def request_id(self) -> str:
        return self.prepared.request_id

    @property
    def engine_request_id(self) -> str:
        """The current attempt's key: the replica tracks it by this (ReplicaSlot), and runs it under this id or,
        once its choices run alone, under `<key>.<choice>` each (`attempt_key` reads either back)."""
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
            self.engine_choices = self._engine_choices()

    def _engine_choices(self) -> dict[str, int | None]:
        """How the new attempt runs: as one request of every choice, while none has begun (they share the
        prefill); once one has, each unfinished choice alone, resumed from its own tokens (an engine request
        resumes one choice only). n = 1 is the one choice, resumed or not."""
        key, choices = self.engine_request_id, self.choices
        if len(choices) == 1:
            return {key: 0}
        if not any(c.token_ids or c.finished for c in choices):
            return {key: None}
        return {f"{key}.{c.index}": c.index for c in choices if not c.finished}

    @property
    def num_output_tokens(self) -> int:
        """Tokens sent to the client so far, of every choice."""
        return sum(len(c.token_ids) for c in self.choices)

    @property
    def num_tokens(self) -> int:
        """Prompt + output tokens so far: this request's KV footprint, the unit of replica load."""
        return len(self.prepared.prompt_token_ids) + self.num_output_tokens

    def specs(self) -> list[RequestSpec]:
        """What to submit for the current attempt, one spec per engine request (`engine_choices`). A choice
        resumed after a failover (or a pause) runs alone with `params.for_choice(i)`, its own seed, on prompt +
        the tokens already sent (marked as resumed, so output penalties still count them), with the budgets
        reduced by them. The engine keys randomness by (seed, token position), so the continuation is the one
        an undisturbed run would have produced."""
        params, prompt = self.prepared.params, self.prepared.prompt_token_ids
        specs = []
        for engine_request_id, index in self.engine_choices.items():
            if index is None:
                specs.append(RequestSpec(engine_request_id, prompt, params.as_kwargs()))
                continue
            sent = self.choices[index].token_ids
            sampling = params.for_choice(index).as_kwargs()
            sampling.update(max_tokens=params.max_tokens - len(sent), min_tokens=max(0, params.min_tokens - len(sent)))
            specs.append(RequestSpec(engine_request_id, prompt + sent, sampling, len(sent)))
        return specs

    def on_delta(self, delta: RequestDelta, replica: str) -> bool:
        """Apply one replica delta to its choice; True when that choice is now finished (by the engine or a stop
        string; the request is done once every choice is)."""
        choice = self.choices[self._choice_of(delta)]
        if self.done or choice.finished:
            return True
        if self.num_cached_tokens is None:
            self.num_cached_tokens = delta.num_cached_tokens
        if delta.new_token_ids:
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
            self.replica_deaths = []  # its replica survived it: no longer a suspect
        reasoning, text, tool_calls = choice.add(delta.new_token_ids, delta.finish_reason if delta.finished else None)
        if all(c.finished for c in self.choices):
            self.set_state(RequestState.DONE)
        if not (text or reasoning or tool_calls or delta.new_token_ids or choice.finished):
            return False
        chunk = self._pending.get(choice.index)
        if chunk is None:
            chunk = self._pending[choice.index] = pb.GenerateResponse(request_id=self.request_id, index=choice.index)
        chunk.text += text
        chunk.reasoning_text += reasoning
        chunk.tool_calls.extend(tool_calls)
        chunk.token_ids.extend(delta.new_token_ids)
        chunk.logprobs.extend(_logprobs(delta))
        self.num_pending_tokens += len(delta.new_token_ids)
        if choice.finish_reason is not None:
            chunk.finish_reason = FINISH_REASONS[choice.finish_reason]
            chunk.replica = replica
        if self.done:  # the stream's last chunk, after every other choice's
            chunk.usage.CopyFrom(self.usage())
            self._pending[choice.index] = self._pending.pop(choice.index)
        self._wake_reader()
        return choice.finished

    def _choice_of(self, delta: RequestDelta) -> int:
        index = self.engine_choices.get(delta.request_id)
        return delta.index if index is None else index

    def usage(self) -> pb.Usage:
        """The prompt once (the choices share it), and every choice's completion tokens."""
        return pb.Usage(
            prompt_tokens=len(self.prepared.prompt_token_ids),
            completion_tokens=self.num_output_tokens,
            cached_prompt_tokens=self.num_cached_tokens or 0,
        )

    def fail(self, code: grpc.StatusCode, message: str) -> None:
        """End the stream with this status, after the output already waiting for the client."""
        if not self.done:
            self.set_state(RequestState.DONE)
            self._failure = RequestFailed(code, message)
            self._wake_reader()

    async def next_chunk(self) -> pb.GenerateResponse | RequestFailed:
        """All the output of one choice that waits for the client, as one message (the choices in the order
        their output came, the stream's last chunk last); then, at the end, how it failed if it did."""
        while not self._pending and self._failure is None:
            self._reader = asyncio.get_running_loop().create_future()
            await self._reader
        if not self._pending:
            return self._failure  # type: ignore[return-value]
        chunk = self._pending.pop(next(iter(self._pending)))
        self.num_pending_tokens -= len(chunk.token_ids)
        return chunk

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


def attempt_key(engine_request_id: str) -> str:
    """The attempt (InFlightRequest.engine_request_id) an engine request id belongs to: the id itself, or the key
    of a choice run alone (`<request id>#<attempt>.<choice>`) cut back to `<request id>#<attempt>`."""
    head, _, tail = engine_request_id.rpartition("#")
    return f"{head}#{tail.partition('.')[0]}"
