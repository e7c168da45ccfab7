"""InFlightRequest: its output buffer (one coalesced message per request), its failure after that output, and its
states' legal moves."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from engine.tokenizer import Tokenizer
from proto import nanoserve_pb2 as pb
from router.errors import RequestFailed
from router.request_state import RequestState
from tests.router.fakes import delta, make_request


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
    async def scenario() -> list[pb.GenerateResponse | RequestFailed]:
        request = make_request(qwen_tokenizer)
        reader = asyncio.ensure_future(request.next_chunk())  # waits: nothing yet
        await asyncio.sleep(0)
        request.on_delta(delta(request, [5, 6]), "a")
        request.fail(grpc.StatusCode.UNAVAILABLE, "gone")
        return [await reader, await request.next_chunk()]

    output, failure = asyncio.run(scenario())
    assert isinstance(output, pb.GenerateResponse) and list(output.token_ids) == [5, 6]
    assert isinstance(failure, RequestFailed) and (failure.code, str(failure)) == (grpc.StatusCode.UNAVAILABLE, "gone")


def test_a_request_moves_between_its_states_only_as_allowed(qwen_tokenizer: Tokenizer) -> None:
    request = make_request(qwen_tokenizer)
    assert (request.state, request.attempt) == (RequestState.PLACING, 0)  # a new request is about to be placed
    for state in (RequestState.PLACING, RequestState.RUNNING, RequestState.PAUSED, RequestState.PLACING):
        request.set_state(state)
    assert request.attempt == 2 and request.engine_request_id == "r#2"  # each placement is an attempt
    request.fail(grpc.StatusCode.CANCELLED, "gone")
    assert request.done
    for illegal in RequestState:  # nothing comes after the end
        with pytest.raises(AssertionError, match="done -> "):
            request.set_state(illegal)
    request.fail(grpc.StatusCode.UNAVAILABLE, "again")  # a no-op once done
    paused = make_request(qwen_tokenizer)
    paused.set_state(RequestState.PAUSED)
    with pytest.raises(AssertionError, match="paused -> running"):
        paused.set_state(RequestState.RUNNING)  # a paused request runs again only through a new placement


def test_a_chat_answers_reasoning_goes_apart_from_its_text(qwen_tokenizer: Tokenizer) -> None:
    """With the router's reasoning parser, Qwen3's <think> span (special tokens of their own) is sent as
    reasoning_text, however the tokens arrive; the control: the same tokens without it are all text."""
    tokens = qwen_tokenizer.encode("<think>\nTwo and two.\n</think>\n\nFour.")
    assert 151667 in tokens and 151668 in tokens  # <think>, </think>

    async def answer(split: bool) -> pb.GenerateResponse:
        request = make_request(qwen_tokenizer, split_reasoning=split)
        whole = pb.GenerateResponse()
        for i in range(0, len(tokens), 2):
            request.on_delta(delta(request, tokens[i : i + 2], finished=i + 2 >= len(tokens)), "a")
            chunk = await request.next_chunk()
            assert isinstance(chunk, pb.GenerateResponse)
            whole.text += chunk.text
            whole.reasoning_text += chunk.reasoning_text
        return whole

    split = asyncio.run(answer(True))
    assert (split.reasoning_text, split.text) == ("\nTwo and two.\n", "\n\nFour.")
    plain = asyncio.run(answer(False))
    assert (plain.reasoning_text, plain.text) == ("", "<think>\nTwo and two.\n</think>\n\nFour.")
