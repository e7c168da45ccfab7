"""Replicas that answer every request with a scripted answer, behind a real ServingCore with both front doors:
the router's path from a replica's tokens to the client's answer (text, stop strings, reasoning, tool calls,
failover) runs as in production, with the model's output fixed, which a random-weight model cannot give."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from engine.tokenizer import Tokenizer
from router.core import ServingCore
from router.http_server import HttpFrontDoor
from router.kv_view import KVView
from router.server import SERVICE_NAME, nanoserve_handlers
from router.service import NanoServeService
from tests.router.fakes import FakeHandle, serving_pool, step
from worker.handle import ReplicaGone
from worker.messages import EngineInfo, RequestDelta, RequestSpec, StepEvents, SubmitError


class ScriptedHandle(FakeHandle):
    """A replica that answers each request with `script` (token ids), `tokens_per_step` a step, from the token its
    spec resumes at, ending with finish reason "stop". `die_after`: a first attempt's event stream breaks (the
    replica dies) once that many of its tokens were sent."""

    def __init__(self, name: str, script: list[int], tokens_per_step: int = 2, die_after: int | None = None) -> None:
        super().__init__(name)
        self.script, self.tokens_per_step, self.die_after = script, tokens_per_step, die_after
        self._seq = 1  # the opening batch's
        self._answering: list[asyncio.Task[None]] = []

    async def submit(self, specs: list[RequestSpec], timeout_s: float | None = None) -> list[SubmitError | None]:
        answers = await super().submit(specs, timeout_s)
        self._answering += [asyncio.ensure_future(self._answer(spec)) for spec in specs]
        return answers

    async def _answer(self, spec: RequestSpec) -> None:
        start = position = spec.resumed_tokens
        num_prompt_tokens = len(spec.prompt_token_ids) - start
        while position < len(self.script):
            await asyncio.sleep(0)
            if self.die_after is not None and start == 0 and position >= self.die_after:
                self.batches.put_nowait(ReplicaGone(f"{self.name} died (scripted)"))
                return
            new = self.script[position : position + self.tokens_per_step]
            position += len(new)
            finished = position >= len(self.script)
            self._seq += 1
            delta = RequestDelta(spec.request_id, new, finished, "stop" if finished else None, num_prompt_tokens, 0, [])
            self.batches.put_nowait(StepEvents(self.name, "e", self._seq, 1, [delta], [], []))

    def close(self) -> None:
        for task in self._answering:
            task.cancel()


INFO = EngineInfo(model_dir="/scripted", random_weights=True, max_model_len=4096, vocab_size=151669, block_size=16,
                  tensor_parallel_size=1, dtype="float32", kv_cache_dtype="float32", eos_token_ids=[151645],
                  num_kv_blocks=256,
                  sampling_defaults={})


@dataclass(frozen=True)
class ScriptedRouter:
    """Where to reach the front doors, and the replicas behind them."""

    http_url: str  # ".../v1"
    grpc_target: str
    handles: list[ScriptedHandle]


@contextlib.asynccontextmanager
async def scripted_router(tokenizer: Tokenizer, script: list[int], num_replicas: int = 2,
                          **handle_kwargs: int | None) -> AsyncIterator[ScriptedRouter]:
    """Both front doors over a ServingCore whose replicas (ScriptedHandle) answer `script`, on 127.0.0.1."""
    pool = serving_pool(num_replicas, host="127.0.0.1", http_port=0, max_failovers_per_request=2)
    pumps, handles = [], []
    for slot in pool.slots:
        handle = ScriptedHandle(slot.name, script, **handle_kwargs)  # type: ignore[arg-type]
        slot.handle, slot.kv = handle, KVView()  # type: ignore[assignment]
        handle.batches.put_nowait(step(slot, seq=1))
        subscribed = asyncio.get_running_loop().create_future()
        pumps.append(asyncio.ensure_future(pool.pump.run(slot, handle, subscribed)))  # type: ignore[arg-type]
        await subscribed
        handles.append(handle)
    core = ServingCore(pool, tokenizer, INFO, "scripted")
    http = HttpFrontDoor(core, pool.config, None)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        SERVICE_NAME, nanoserve_handlers(NanoServeService(core))),))
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield ScriptedRouter(f"http://127.0.0.1:{await http.start()}/v1", f"127.0.0.1:{grpc_port}", handles)
    finally:
        await server.stop(None)
        await http.stop()
        for handle in handles:
            handle.close()
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
