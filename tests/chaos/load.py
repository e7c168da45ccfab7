"""A steady load of streaming clients, and the invariants a chaos scenario checks on it (I1-I3; I4 and I5 are
in leaks.py, checked after every scenario)."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from engine import LLMEngine, SamplingParams
from router.client import Client
from tests.serving import ENGINE_KWARGS, VOCAB, RouterThread, serving_handles


@dataclass
class Request:
    prompt: list[int]
    params: dict[str, Any]


@dataclass
class Outcome:
    """What one client saw: its tokens, and exactly one terminal status (I1)."""

    token_ids: list[int] = field(default_factory=list)
    code: grpc.StatusCode | None = None
    details: str = ""
    replica: str = ""
    num_terminal: int = 0


def mixed_requests(n: int, seed: int, max_tokens: int = 60, prompt_len: tuple[int, int] = (8, 80)) -> list[Request]:
    """Greedy and seeded sampling requests, half of each with penalties (all must resume identically)."""
    rng = random.Random(seed)
    requests = []
    for i in range(n):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(*prompt_len))]
        sampling = dict(temperature=0.0) if i % 2 else dict(temperature=0.8, top_p=0.95, seed=rng.randrange(2**31))
        if i % 4 >= 2:  # penalties count the output, also the part streamed before a failover
            sampling |= dict(presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.1)
        requests.append(Request(prompt, dict(max_tokens=max_tokens, ignore_eos=True, **sampling)))
    return requests


def expected_outputs(model_dir: Path, requests: list[Request], engine_kwargs: dict[str, Any] | None = None
                     ) -> list[list[int]]:
    """Each request's tokens on an undisturbed engine (independent of the batch around it: fp32 on the CPU, the
    batch-invariant mode on a GPU), built with `engine_kwargs` (the replicas' own; ENGINE_KWARGS by default)."""
    with LLMEngine(model_dir, **(engine_kwargs or ENGINE_KWARGS)) as engine:  # closed: on a GPU its memory goes now
        results = engine.generate([r.prompt for r in requests], [SamplingParams(**r.params) for r in requests],
                                  use_tqdm=False)
    return [r["token_ids"] for r in results]  # type: ignore[index]


class Load:
    """Streams `requests` through the router with `concurrency` clients; `on_tokens(i, n)` sees progress."""

    def __init__(self, router: RouterThread, requests: list[Request], concurrency: int = 32,
                 timeout_s: float = 120.0) -> None:
        self.router, self.requests, self.timeout_s = router, requests, timeout_s
        self.outcomes = [Outcome() for _ in requests]
        self.progress = [threading.Event() for _ in requests]  # set once a request streamed 5 tokens
        self._pool = ThreadPoolExecutor(concurrency)
        self._futures = [self._pool.submit(self._run, i) for i in range(len(requests))]

    def _run(self, i: int) -> None:
        request, outcome = self.requests[i], self.outcomes[i]
        try:
            with Client(self.router.address) as client:
                for chunk in client.generate(request.prompt, timeout=self.timeout_s, **request.params):
                    outcome.token_ids += chunk.token_ids
                    if len(outcome.token_ids) >= 5:
                        self.progress[i].set()
                    if chunk.finish_reason:
                        outcome.replica = chunk.replica
            outcome.code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            outcome.code, outcome.details = e.code(), e.details() or ""
        outcome.num_terminal += 1
        self.progress[i].set()

    def wait_until_streaming(self, fraction: float = 1.0, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while sum(e.is_set() for e in self.progress) < fraction * len(self.requests):
            assert time.monotonic() < deadline, "the load never got going"
            time.sleep(0.01)

    def finish(self) -> list[Outcome]:
        for future in self._futures:
            future.result(self.timeout_s + 30)
        self._pool.shutdown()
        return self.outcomes


def assert_no_lost_request(outcomes: list[Outcome], allowed: frozenset[grpc.StatusCode] = frozenset()) -> None:
    """I1: every accepted RPC ended with exactly one terminal status, OK or one the scenario allows."""
    for i, o in enumerate(outcomes):
        assert o.num_terminal == 1, f"request {i} ended {o.num_terminal} times"
        assert o.code == grpc.StatusCode.OK or o.code in allowed, f"request {i}: {o.code}: {o.details}"


def assert_identical_outputs(outcomes: list[Outcome], expected: list[list[int]]) -> None:
    """I2: each completed stream equals the same request run undisturbed."""
    for i, (o, want) in enumerate(zip(outcomes, expected)):
        if o.code == grpc.StatusCode.OK:
            assert o.token_ids == want, f"request {i} differs from an undisturbed run"


def assert_kv_conserved(router: RouterThread, timeout_s: float = 20.0) -> None:
    """I3: after quiesce every live replica holds no request and every KV block is free or cached."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = [asyncio.run(handle.stats(timeout_s=10)) for handle in serving_handles(router).values()]
        busy = [(s.replica, s.engine) for s in stats
                if s.engine.num_kv_blocks_used or s.engine.num_running or s.engine.num_waiting]
        if not busy:
            return
        assert time.monotonic() < deadline, f"replicas still hold requests or blocks: {busy}"
        time.sleep(0.2)


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Seconds until `condition()` held; fails naming `what` after timeout_s."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(0.05)
    return time.monotonic() - start
