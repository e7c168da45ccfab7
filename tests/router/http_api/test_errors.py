"""The OpenAI-compatible HTTP API when things go wrong: a client that leaves frees its KV blocks, a failure
mid-stream ends the stream with OpenAI's error event, a query of death is a 500 saying so, bad input is a 400
naming the field, and no replica, draining and overload are 503 / 429."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import openai
import pytest

from tests.router.http_api.calls import GREEDY, MESSAGES, PROMPT, post
from tests.serving import RouterThread


def test_a_client_that_leaves_frees_its_kv_blocks(router: RouterThread, client: openai.OpenAI, model: str) -> None:
    cancelled = router.router.metrics.requests.labels("CANCELLED")
    before = cancelled._value.get()
    for chat in (False, True):
        create = client.chat.completions.create if chat else client.completions.create
        prompt: dict[str, Any] = {"messages": MESSAGES} if chat else {"prompt": PROMPT * 8}
        with create(model=model, max_tokens=400, stream=True, **prompt, **GREEDY) as stream:  # type: ignore[call-overload]
            for _, _ in zip(range(3), stream):
                pass
            assert sum(r.num_inflight_requests for r in router.status().replicas) == 1
        router.wait_for(lambda s: sum(r.num_kv_blocks_used for r in s.replicas) == 0, timeout=15)
        assert sum(r.num_inflight_requests for r in router.status().replicas) == 0
    with pytest.raises(openai.APITimeoutError):  # a client that hangs up on a whole answer: 450 tokens take > 1 s
        client.with_options(timeout=1.0).completions.create(model=model, prompt=PROMPT, max_tokens=450, **GREEDY)
    router.wait_for(lambda s: sum(r.num_kv_blocks_used + r.num_inflight_requests for r in s.replicas) == 0, timeout=15)
    assert cancelled._value.get() == before + 3


def test_a_failure_mid_stream_ends_it_with_an_error_event(router: RouterThread, client: openai.OpenAI,
                                                          model: str) -> None:
    """After the first event the status line is sent: a request that fails then (its replicas failed too often)
    ends with OpenAI's error object as an event, which the client raises."""
    pool = router.router.pool

    async def fail_everything() -> None:
        for slot in pool.slots:
            for request in list(slot.inflight.values()):
                request.fail(grpc.StatusCode.UNAVAILABLE, "the replicas serving this request failed 4 times")

    stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=400, stream=True, **GREEDY)
    next(iter(stream))
    router.call(fail_everything())
    with pytest.raises(openai.APIError) as info:
        list(stream)
    assert "failed 4 times" in info.value.message
    assert info.value.body == {"message": info.value.message, "type": "service_unavailable_error", "param": None,
                               "code": None}
    router.wait_for(lambda s: sum(r.num_kv_blocks_used + r.num_inflight_requests for r in s.replicas) == 0, timeout=15)


def test_a_request_stopped_as_a_query_of_death_is_a_500_saying_so(router: RouterThread, client: openai.OpenAI,
                                                                   model: str) -> None:
    """Two replicas died under it (router/retry_budget.py): gRPC's ABORTED, HTTP's 500 with OpenAI's error JSON."""
    pool = router.router.pool
    message = "replicas a and b died while running this request, with no token in between: it was stopped"

    async def stop_everything() -> None:
        for slot in pool.slots:
            for request in list(slot.inflight.values()):
                request.fail(grpc.StatusCode.ABORTED, message)

    with ThreadPoolExecutor(1) as pool_of_one:
        answer = pool_of_one.submit(post, router, "/v1/completions", json.dumps(
            {"model": model, "prompt": PROMPT, "max_tokens": 400, "temperature": 0, "ignore_eos": True}).encode())
        router.wait_for(lambda s: any(r.num_inflight_requests for r in s.replicas), timeout=15)
        router.call(stop_everything())
        status, body = answer.result(60)
    assert status == 500
    assert body == {"error": {"message": message, "type": "server_error", "param": None, "code": None}}


BAD_BODIES: list[tuple[str, dict[str, Any], str]] = [
    ("completions", {"prompt": PROMPT, "temperature": -1}, "temperature"),
    ("completions", {"prompt": PROMPT, "temperature": "hot"}, "temperature"),
    ("completions", {"prompt": PROMPT, "top_p": 0}, "top_p"),
    ("completions", {"prompt": PROMPT, "top_k": 0}, "top_k"),
    ("completions", {"prompt": PROMPT, "min_p": 2}, "min_p"),
    ("completions", {"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
    ("completions", {"prompt": PROMPT, "seed": -1}, "seed"),
    ("completions", {"prompt": PROMPT, "seed": 2**64}, "seed"),
    ("completions", {"prompt": PROMPT, "stop": [""]}, "stop"),
    ("completions", {"prompt": PROMPT, "stop": 7}, "stop"),
    ("completions", {"prompt": PROMPT, "logprobs": 21}, "logprobs"),
    ("completions", {"prompt": PROMPT, "n": 0}, "n"),
    ("chat", {"messages": MESSAGES, "n": 129}, "n"),
    ("completions", {"prompt": PROMPT, "best_of": 3}, "best_of"),
    ("completions", {"prompt": PROMPT, "frequency_penalty": 2.5}, "frequency_penalty"),
    ("completions", {"prompt": PROMPT, "presence_penalty": "x"}, "presence_penalty"),
    ("chat", {"messages": MESSAGES, "repetition_penalty": 0}, "repetition_penalty"),
    ("completions", {"prompt": PROMPT, "temprature": 0.5}, "temprature"),
    ("completions", {"prompt": PROMPT, "stream_options": {"include_usage": True}}, "stream_options"),
    ("completions", {"prompt": PROMPT, "stream": True, "stream_options": {"usage": True}}, "stream_options.usage"),
    ("completions", {"prompt": ""}, "prompt"),
    ("completions", {"prompt": []}, "prompt"),
    ("completions", {"prompt": ["one", "two"]}, "prompt"),
    ("completions", {"prompt": [1, 10**7]}, "prompt[1]"),
    ("completions", {"prompt": [1, "x"]}, "prompt"),
    ("completions", {"prompt": [1] * 600}, "prompt"),
    ("completions", {}, "prompt"),
    ("chat", {"messages": []}, "messages"),
    ("chat", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ("chat", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]"),
    ("chat", {"messages": [{"role": "user", "content": "hi", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages[0].tool_calls"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{x"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
    ("chat", {"messages": MESSAGES, "tools": "get_weather"}, "tools"),
    ("chat", {"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "get weather"}}]},
     "tools[0].function.name"),
    ("chat", {"messages": MESSAGES, "tool_choice": "sometimes", "tools": [{"type": "function", "function": {
        "name": "f"}}]}, "tool_choice"),
    ("chat", {"messages": MESSAGES, "tool_choice": {"type": "function", "function": {"name": "g"}}, "tools": [
        {"type": "function", "function": {"name": "f"}}]}, "tool_choice.function.name"),
    ("chat", {"messages": MESSAGES, "tool_choice": "auto"}, "tool_choice"),
    ("chat", {"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
    ("chat", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"messages": MESSAGES, "max_completion_tokens": 0}, "max_tokens"),
    ("chat", {"messages": MESSAGES, "tools": [{"type": "function"}]}, "tools[0]"),
    ("chat", {"prompt": PROMPT}, "prompt"),
]


@pytest.mark.parametrize(("endpoint", "body", "param"), BAD_BODIES, ids=[f"{e}-{p}" for e, _, p in BAD_BODIES])
def test_bad_input_is_400_naming_the_field(router: RouterThread, endpoint: str, body: dict[str, Any],
                                           param: str) -> None:
    status, answer = post(router, f"/v1/{'chat/' if endpoint == 'chat' else ''}completions",
                          json.dumps(body).encode())
    assert status == 400, answer
    error = answer["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert error["message"].startswith(param), error


def test_openai_client_sees_bad_input_as_bad_request(client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=MESSAGES, n=0)
    assert info.value.status_code == 400 and info.value.param == "n" and "must be in [1, 128]" in info.value.message


def test_unparsable_bodies_unknown_models_and_paths(router: RouterThread, client: openai.OpenAI) -> None:
    for body in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        status, answer = post(router, "/v1/completions", body)
        assert status == 400 and "request body" in answer["error"]["message"], answer
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="Qwen/Qwen3-235B", prompt=PROMPT, max_tokens=2)
    assert info.value.param == "model" and "GET /v1/models" in info.value.message
    status, answer = post(router, "/v1/embeddings", b"{}")
    assert status == 404 and answer["error"]["type"] == "invalid_request_error"
    status, answer = post(router, "/v1/completions", json.dumps({"prompt": "x" * (4 << 20)}).encode())
    assert status == 413 and "error" in answer  # over max_message_bytes, as gRPC refuses it


@contextlib.contextmanager
def replicas_marked_down(router: RouterThread) -> Iterator[None]:
    """Every replica marked down for the router (they keep running), then serving again."""
    pool = router.router.pool
    slots = list(pool.slots)

    async def mark(state: str) -> None:
        for slot in slots:
            pool.set_state(slot, state)  # type: ignore[arg-type]

    router.call(mark("down"))
    try:
        yield
    finally:
        router.call(mark("serving"))


def test_no_replica_draining_and_overload(router: RouterThread, client: openai.OpenAI, model: str) -> None:
    with replicas_marked_down(router), pytest.raises(openai.InternalServerError) as unavailable:
        client.completions.create(model=model, prompt=PROMPT, max_tokens=2)
    assert unavailable.value.status_code == 503 and "no healthy replica" in unavailable.value.message
    core = router.router.core
    assert core is not None
    core.draining = True
    try:
        with pytest.raises(openai.InternalServerError) as draining:
            client.completions.create(model=model, prompt=PROMPT, max_tokens=2)
        assert draining.value.status_code == 503 and "draining" in draining.value.message
        with pytest.raises(urllib.error.HTTPError) as health:
            urllib.request.urlopen(f"http://127.0.0.1:{router.router.http_port}/health", timeout=10)
        assert health.value.code == 503
    finally:
        core.draining = False
    placement = router.router.pool.placement
    config = placement.config
    placement.config = dataclasses.replace(config, max_inflight_per_replica=1)
    try:
        streams = [client.completions.create(model=model, prompt=PROMPT, max_tokens=400, stream=True, **GREEDY)
                   for _ in range(2)]  # one on each replica
        for stream in streams:
            next(iter(stream))
        with pytest.raises(openai.RateLimitError) as overloaded:
            client.completions.create(model=model, prompt=PROMPT, max_tokens=2)
        assert overloaded.value.status_code == 429 and "capacity" in overloaded.value.message
        for stream in streams:
            stream.close()
    finally:
        placement.config = config
    router.wait_for(lambda s: sum(r.num_kv_blocks_used for r in s.replicas) == 0, timeout=15)
