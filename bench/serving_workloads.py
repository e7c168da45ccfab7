"""The serving benchmark's workloads: each drives a router through `AsyncClient` and returns one record
per request. Prompts are random token ids (no tokenizer involved), every request is greedy with
`ignore_eos`, so it runs to exactly its `max_tokens`.

- `generated_shared_prefix`: SGLang's generated-shared-prefix workload. G groups x R requests; the
  requests of a group share one long random "system prompt" and each adds its own random question.
  All G x R requests are shuffled (seeded), so groups interleave, and arrive as a Poisson process.
- `multi_turn_chat`: C conversations x T turns. Turn t's prompt is turn t-1's prompt + its answer +
  new user tokens, so every turn extends the previous one; turns of a conversation run one after
  another, conversations concurrently, their first turns arriving as a Poisson process.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field

import grpc

from router.client import AsyncClient

# Qwen3's special tokens start here; random prompts stay below it (a tiny vocabulary is smaller anyway).
FIRST_SPECIAL_TOKEN_ID = 151643


@dataclass(frozen=True, slots=True)
class SharedPrefixWorkload:
    """Sizes of the generated-shared-prefix workload, in tokens (defaults: SGLang's)."""

    num_groups: int = 32
    num_per_group: int = 16
    prefix_len: int = 2000
    question_len: int = 100
    output_len: int = 200

    @property
    def num_requests(self) -> int:
        return self.num_groups * self.num_per_group

    @property
    def max_len(self) -> int:
        """Longest prompt + output of any request."""
        return self.prefix_len + self.question_len + self.output_len


@dataclass(frozen=True, slots=True)
class MultiTurnWorkload:
    """Sizes of the multi-turn chat workload, in tokens."""

    num_conversations: int = 64
    num_turns: int = 6
    first_len: int = 1000  # the first turn's prompt (a conversation's own system prompt + question)
    turn_len: int = 100  # user tokens added by each later turn
    output_len: int = 200

    @property
    def num_requests(self) -> int:
        return self.num_conversations * self.num_turns

    @property
    def max_len(self) -> int:
        """Prompt + output of a conversation's last turn."""
        return self.first_len + (self.num_turns - 1) * (self.output_len + self.turn_len) + self.output_len


Workload = SharedPrefixWorkload | MultiTurnWorkload


@dataclass(slots=True)
class RequestRecord:
    """What one streamed request measured. Times are seconds; `sent_at` counts from the workload's start."""

    key: str  # "g<group>/r<request>" or "c<conversation>/t<turn>"
    sent_at: float
    num_prompt_tokens: int
    ttft_s: float | None = None  # sent -> first chunk with tokens
    e2e_s: float | None = None  # sent -> stream ended
    # One entry per output token after the first chunk's: (gap since the previous chunk) / (tokens in the chunk).
    token_gaps_s: list[float] = field(default_factory=list)
    num_chunks: int = 0
    num_cached_tokens: int = 0  # prompt tokens the serving replica's prefix cache supplied (usage)
    replica: str = ""  # the replica that finished the request (last chunk)
    error: str | None = None  # "CODE: details" when the stream failed
    output_token_ids: list[int] = field(default_factory=list, repr=False)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)


async def stream_request(
    client: AsyncClient, key: str, prompt_ids: list[int], max_tokens: int, started_at: float
) -> RequestRecord:
    """Send one greedy request that runs to max_tokens, stream it, and time every chunk."""
    sent = time.perf_counter()
    record = RequestRecord(key, sent - started_at, len(prompt_ids))
    last = sent
    try:
        async for chunk in client.generate(prompt_ids, max_tokens=max_tokens, temperature=0.0, ignore_eos=True):
            now = time.perf_counter()
            record.num_chunks += 1
            num_new = len(chunk.token_ids)
            if num_new and record.ttft_s is None:
                record.ttft_s = now - sent
            elif num_new:
                record.token_gaps_s += [(now - last) / num_new] * num_new
            last = now if num_new else last
            record.output_token_ids += chunk.token_ids
            if chunk.finish_reason:
                record.replica, record.num_cached_tokens = chunk.replica, chunk.usage.cached_prompt_tokens
    except grpc.aio.AioRpcError as e:
        record.error = f"{e.code().name}: {e.details()}"
    record.e2e_s = time.perf_counter() - sent
    return record


def random_tokens(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    """n random ordinary token ids."""
    high = min(vocab_size, FIRST_SPECIAL_TOKEN_ID)
    return [rng.randrange(high) for _ in range(n)]


def poisson_arrivals(n: int, rate: float, rng: random.Random) -> list[float]:
    """n arrival times (seconds from 0) of a Poisson process of `rate` per second; inf: all at 0."""
    if rate == float("inf"):
        return [0.0] * n
    times, now = [], 0.0
    for _ in range(n):
        times.append(now)
        now += rng.expovariate(rate)
    return times


def shared_prefix_prompts(workload: SharedPrefixWorkload, vocab_size: int, seed: int) -> list[tuple[str, list[int]]]:
    """(key, prompt) of every request, all groups shuffled together."""
    rng = random.Random(seed)
    prompts = []
    for g in range(workload.num_groups):
        prefix = random_tokens(rng, workload.prefix_len, vocab_size)
        for r in range(workload.num_per_group):
            prompts.append((f"g{g}/r{r}", prefix + random_tokens(rng, workload.question_len, vocab_size)))
    rng.shuffle(prompts)
    return prompts


async def at(started_at: float, offset_s: float, coro: Awaitable[RequestRecord]) -> RequestRecord:
    """Await coro no earlier than offset_s after started_at (perf_counter seconds)."""
    await asyncio.sleep(max(0.0, started_at + offset_s - time.perf_counter()))
    return await coro


async def generated_shared_prefix(
    client: AsyncClient, workload: SharedPrefixWorkload, rate: float, vocab_size: int, seed: int = 0
) -> list[RequestRecord]:
    """Run the generated-shared-prefix workload at `rate` requests/s; one record per request."""
    prompts = shared_prefix_prompts(workload, vocab_size, seed)
    arrivals = poisson_arrivals(len(prompts), rate, random.Random(seed + 1))
    started_at = time.perf_counter()
    return list(await asyncio.gather(*(
        at(started_at, arrival, stream_request(client, key, prompt, workload.output_len, started_at))
        for arrival, (key, prompt) in zip(arrivals, prompts)
    )))


async def multi_turn_chat(
    client: AsyncClient, workload: MultiTurnWorkload, rate: float, vocab_size: int, seed: int = 0
) -> list[RequestRecord]:
    """Run the multi-turn chat workload, conversations starting at `rate` per second; one record per turn."""
    rng = random.Random(seed)
    first_prompts = [random_tokens(rng, workload.first_len, vocab_size) for _ in range(workload.num_conversations)]
    user_turns = [
        [random_tokens(rng, workload.turn_len, vocab_size) for _ in range(workload.num_turns - 1)]
        for _ in range(workload.num_conversations)
    ]
    arrivals = poisson_arrivals(workload.num_conversations, rate, random.Random(seed + 1))
    started_at = time.perf_counter()

    async def converse(c: int) -> list[RequestRecord]:
        await asyncio.sleep(max(0.0, started_at + arrivals[c] - time.perf_counter()))
        records: list[RequestRecord] = []
        prompt = first_prompts[c]
        for t in range(workload.num_turns):
            if t:
                prompt = prompt + records[-1].output_token_ids + user_turns[c][t - 1]
            records.append(await stream_request(client, f"c{c}/t{t}", prompt, workload.output_len, started_at))
            if records[-1].error is not None:
                break  # the next turn's prompt would need this answer
        return records

    conversations: Sequence[list[RequestRecord]] = await asyncio.gather(
        *(converse(c) for c in range(workload.num_conversations))
    )
    return [record for records in conversations for record in records]

