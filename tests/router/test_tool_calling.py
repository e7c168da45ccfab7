"""Tool calls through both front doors, from replicas that answer a scripted call (tests/router/scripted.py): the
official openai client gets OpenAI's tool_calls whole and streamed, gRPC its ToolCall fields, and a stream whose
replica dies at any token parses as an undisturbed one."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import openai
import pytest

from engine.tokenizer import Tokenizer
from proto import nanoserve_pb2 as pb
from proto import nanoserve_pb2_grpc as pb_grpc
from tests.router.scripted import ScriptedRouter, scripted_router

T = TypeVar("T")
ANSWER = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
          '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>')
CALLS = [("get_weather", '{"city": "Paris"}'), ("get_time", '{"zone": "CET"}')]
TOOLS: list[Any] = [{"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
                    for name, _ in CALLS]
MESSAGES: list[Any] = [{"role": "user", "content": "Weather and time in Paris?"}]


def run(tokenizer: Tokenizer, scenario: Callable[[ScriptedRouter, openai.AsyncOpenAI], Awaitable[T]],
        **handle_kwargs: int | None) -> T:
    """`scenario` against scripted replicas answering ANSWER, with an openai client of their HTTP front door."""
    async def main() -> T:
        async with (scripted_router(tokenizer, tokenizer.encode(ANSWER), **handle_kwargs) as router,
                    openai.AsyncOpenAI(base_url=router.http_url, api_key="none", max_retries=0) as client):
            return await scenario(router, client)

    return asyncio.run(main())


async def streamed(client: openai.AsyncOpenAI, **body: Any) -> tuple[str, list[tuple[str, str]], str | None]:
    """A streamed chat answer put together as a client does: its content, its calls (name, arguments) by index,
    and its finish reason."""
    content, calls, finish_reason = "", {}, None
    async for chunk in await client.chat.completions.create(model="scripted", messages=MESSAGES, stream=True, **body):
        [choice] = chunk.choices
        content += choice.delta.content or ""
        for call in choice.delta.tool_calls or []:
            assert call.id and call.id.startswith("call_") and call.type == "function" and call.function
            calls[call.index] = (call.function.name, call.function.arguments)
        finish_reason = choice.finish_reason or finish_reason
    return content, [calls[i] for i in sorted(calls)], finish_reason


def test_the_openai_client_gets_tool_calls_whole_and_streamed(qwen_tokenizer: Tokenizer) -> None:
    async def scenario(router: ScriptedRouter, client: openai.AsyncOpenAI) -> None:
        answer = await client.chat.completions.create(model="scripted", messages=MESSAGES, tools=TOOLS)
        [choice] = answer.choices
        calls = choice.message.tool_calls or []
        assert choice.message.content == "Let me check.\n" and choice.finish_reason == "tool_calls"
        assert [(c.function.name, c.function.arguments) for c in calls] == CALLS  # type: ignore[union-attr]
        assert len({c.id for c in calls}) == 2 and all(json.loads(c.function.arguments) for c in calls)  # type: ignore
        assert await streamed(client, tools=TOOLS) == ("Let me check.\n", CALLS, "tool_calls")
        # tool_choice "none", or no tools: the answer is all text (the control: the same answer, not parsed)
        assert await streamed(client, tools=TOOLS, tool_choice="none") == (ANSWER, [], "stop")
        plain = await client.chat.completions.create(model="scripted", messages=MESSAGES)
        assert (plain.choices[0].message.content, plain.choices[0].message.tool_calls) == (ANSWER, None)

    run(qwen_tokenizer, scenario)


def test_grpc_carries_the_tool_calls(qwen_tokenizer: Tokenizer) -> None:
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="Weather and time in Paris?")],
                           tools=[pb.Tool(name=name) for name, _ in CALLS])

    async def scenario(router: ScriptedRouter, client: openai.AsyncOpenAI) -> None:
        async with grpc.aio.insecure_channel(router.grpc_target) as channel:
            stub = pb_grpc.NanoServeStub(channel)
            whole = await stub.Complete(pb.GenerateRequest(chat=chat), timeout=30)
            assert whole.text == "Let me check.\n" and whole.finish_reason == pb.FINISH_REASON_STOP
            assert [(c.name, c.arguments) for c in whole.tool_calls] == CALLS
            chunks = [chunk async for chunk in stub.Generate(pb.GenerateRequest(chat=chat), timeout=30)]
            assert "".join(c.text for c in chunks) == whole.text
            assert [(c.name, c.arguments) for chunk in chunks for c in chunk.tool_calls] == CALLS
            # Each call is sent once it is whole; both may share a chunk when the client reads behind the stream
            # (the router coalesces what waits for a slow client), so the count is 1 or 2 depending on timing.
            assert 1 <= sum(bool(chunk.tool_calls) for chunk in chunks) <= 2
            none = pb.ChatMessages(messages=chat.messages, tools=chat.tools, tool_choice=pb.ToolChoice(mode="none"))
            plain = await stub.Complete(pb.GenerateRequest(chat=none), timeout=30)
            assert (plain.text, list(plain.tool_calls)) == (ANSWER, [])
            with pytest.raises(grpc.aio.AioRpcError) as error:
                unknown = pb.ChatMessages(messages=chat.messages, tools=chat.tools,
                                          tool_choice=pb.ToolChoice(function_name="get_news"))
                await stub.Complete(pb.GenerateRequest(chat=unknown), timeout=30)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (error.value.details() or "").startswith("chat.tool_choice.function_name: 'get_news' is not one")

    run(qwen_tokenizer, scenario)


def test_a_stream_failed_over_at_any_token_parses_as_an_undisturbed_one(qwen_tokenizer: Tokenizer) -> None:
    """The replica serving the stream dies after each possible number of tokens (one a step); the stream goes on
    on the other replica from there, and the client's content and calls are those of an undisturbed stream."""
    async def undisturbed(router: ScriptedRouter, client: openai.AsyncOpenAI) -> Any:
        return await streamed(client, tools=TOOLS)

    async def failed_over(router: ScriptedRouter, client: openai.AsyncOpenAI) -> Any:
        answer = await streamed(client, tools=TOOLS)
        resumed = [spec.resumed_tokens for handle in router.handles for spec in handle.submitted]
        assert sorted(resumed) == [0, die_after], "the stream was not failed over where the test meant it to be"
        return answer

    expected = run(qwen_tokenizer, undisturbed, tokens_per_step=1)
    assert expected == ("Let me check.\n", CALLS, "tool_calls")
    for die_after in range(1, len(qwen_tokenizer.encode(ANSWER))):
        assert run(qwen_tokenizer, failed_over, tokens_per_step=1, die_after=die_after) == expected, die_after
