"""InFlightRequest: its output buffer (one coalesced message per request), its failure after that output, and its
states' legal moves."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from engine.sampling_params import choice_seed
from engine.tokenizer import Tokenizer
from proto import nanoserve_pb2 as pb
from router.errors import RequestFailed
from router.inflight import attempt_key
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


def test_n_choices_stream_apart_and_the_usage_comes_last(qwen_tokenizer: Tokenizer) -> None:
    """n = 3: each choice's output is its own message naming its index, each finishes on its own (choice 1 on a stop
    string), and the stream's last chunk (the usage, the prompt once and every choice's tokens) comes after every
    other choice's output, whichever finished last."""
    hello, world = qwen_tokenizer.encode("Hello"), qwen_tokenizer.encode(" world")

    async def scenario() -> list[pb.GenerateResponse]:
        request = make_request(qwen_tokenizer, n=3, stop=(" world",))
        request.set_state(RequestState.PLACING)
        request.on_delta(delta(request, hello, index=0), "a")
        assert request.on_delta(delta(request, hello + world, index=1), "a")  # the stop string ends choice 1
        request.on_delta(delta(request, [11], finished=True, index=2), "a")
        assert not request.done
        request.on_delta(delta(request, [12], index=0), "a")
        assert request.on_delta(delta(request, [13], finished=True, index=0), "a") and request.done
        return [await request.next_chunk() for _ in range(3)]  # type: ignore[misc]

    chunks = asyncio.run(scenario())
    assert [c.index for c in chunks] == [1, 2, 0]  # choice 0's output waited: its last chunk ends the stream
    assert [c.finish_reason for c in chunks] == [pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH,
                                                 pb.FINISH_REASON_LENGTH]
    assert chunks[0].text == "Hello" and list(chunks[2].token_ids) == hello + [12, 13]
    assert [c.HasField("usage") for c in chunks] == [False, False, True]
    usage = chunks[2].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (3, len(hello) * 2 + len(world) + 1 + 2)


def test_a_moved_request_of_n_choices_resumes_each_unfinished_choice_alone(qwen_tokenizer: Tokenizer) -> None:
    """Before any choice has a token, an attempt runs all n as one request (they share the prefill); after, each
    unfinished choice runs alone from its own tokens with its own seed (SamplingParams.for_choice), and a finished
    one not at all. (The seed is what makes the continuation exact: tests/chaos/test_choices_failover.py shows a
    resumed choice sampling with another seed diverges from an undisturbed run.)"""
    request = make_request(qwen_tokenizer, n=3, max_tokens=10)
    request.set_state(RequestState.PLACING)
    [whole] = request.specs()
    assert (whole.request_id, whole.prompt_token_ids, whole.sampling_params["n"]) == ("r#1", [1, 2, 3], 3)
    request.on_delta(delta(request, [7, 8], index=0), "a")
    request.on_delta(delta(request, [9], finished=True, index=1), "a")
    request.set_state(RequestState.RUNNING)
    request.set_state(RequestState.PLACING)  # moved
    specs = request.specs()
    assert [s.request_id for s in specs] == ["r#2.0", "r#2.2"] and [attempt_key(s.request_id) for s in specs] == [
        "r#2", "r#2"]
    assert [(s.prompt_token_ids, s.resumed_tokens) for s in specs] == [([1, 2, 3, 7, 8], 2), ([1, 2, 3], 0)]
    assert [s.sampling_params["seed"] for s in specs] == [choice_seed(1, 0), choice_seed(1, 2)]
    assert [(s.sampling_params["n"], s.sampling_params["max_tokens"]) for s in specs] == [(1, 8), (1, 10)]
    request.on_delta(delta(request, [5], engine_request_id="r#2.2"), "b")  # a lone choice's delta: index 0, choice 2
    assert request.choices[2].token_ids == [5] and request.choices[0].token_ids == [7, 8]
