"""Stand-ins for the replica pool's unit tests, without Ray: replica handles that answer at once, and a pool of
them that all serve. Step events are built by hand (`step`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from router.config import RouterConfig
from router.inflight import InFlightRequest
from router.metrics import RouterMetrics
from router.policies import make_policy
from router.replica_pool import ReplicaPool
from router.replica_slot import ReplicaSlot
from router.request_state import RequestState
from router.validation import PreparedRequest
from worker.messages import KVSnapshot, RequestDelta, RequestSpec, StepEvents, SubmitError


class FakeHandle:
    """A replica that queues every submit (or answers `refusal`), streams the batches put in `batches` (None ends
    the stream, an exception breaks it), and remembers what it was sent. A submit waits while `hold` is set."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.submitted: list[RequestSpec] = []
        self.aborted: list[str] = []
        self.refusal: SubmitError | None = None
        self.hold: asyncio.Event | None = None
        self.batches: asyncio.Queue[StepEvents | Exception | None] = asyncio.Queue()
        self.snapshot = KVSnapshot(name, "e", 0, [])

    async def submit(self, specs: list[RequestSpec], timeout_s: float | None = None) -> list[SubmitError | None]:
        self.submitted += specs
        if self.hold is not None:
            await self.hold.wait()
        return [self.refusal] * len(specs)

    def abort(self, request_ids: list[str]) -> None:
        self.aborted += request_ids

    async def events(self) -> AsyncIterator[StepEvents]:
        while (batch := await self.batches.get()) is not None:
            if isinstance(batch, Exception):
                raise batch
            yield batch

    async def kv_snapshot(self, timeout_s: float | None = None) -> KVSnapshot:
        return self.snapshot


def fake(slot: ReplicaSlot) -> FakeHandle:
    assert isinstance(slot.handle, FakeHandle)
    return slot.handle


def serving_pool(num_replicas: int, policy: str = "least-load", **config: object) -> ReplicaPool:
    """A pool of FakeHandle replicas, all serving. A replica marked down is restarted into nothing: it stays out
    of service (`num_restarts` counts the restart)."""
    cfg = RouterConfig(num_replicas=num_replicas, policy=policy, **config)  # type: ignore[arg-type]
    pool = ReplicaPool(cfg, make_policy(policy, cfg.prefix_imbalance_ratio, cfg.prefix_imbalance_slack_tokens),
                       RouterMetrics())

    async def stay_out(slot: ReplicaSlot) -> None:
        return None

    pool.supervisor.replace = stay_out
    for slot in pool.slots:
        slot.handle = FakeHandle(slot.name)  # type: ignore[assignment]
        slot.kv.reset(KVSnapshot(slot.name, "e", 0, []))
        pool.set_state(slot, "serving")
    return pool


def make_request(tokenizer: Tokenizer, name: str = "r", prompt: list[int] | None = None, max_tokens: int = 100,
                 block_hashes: list[int] | None = None, split_reasoning: bool = False, n: int = 1,
                 stop: tuple[str, ...] = ()) -> InFlightRequest:
    prepared = PreparedRequest(name, prompt or [1, 2, 3], SamplingParams(seed=1, max_tokens=max_tokens, n=n, stop=stop),
                               block_hashes or [], split_reasoning)
    return InFlightRequest(prepared, tokenizer)


def place(pool: ReplicaPool, request: InFlightRequest, slot: ReplicaSlot | None = None) -> ReplicaSlot:
    """Place the request (on `slot`, when given) as a submit that the replica accepted would."""
    others = {s.name for s in pool.slots if slot is not None and s is not slot}
    chosen, _ = pool.placement.place(request, others)
    request.set_state(RequestState.RUNNING)
    return chosen


def replica_of(pool: ReplicaPool, request: InFlightRequest) -> ReplicaSlot | None:
    """The replica the request's current attempt is placed on (None while it waits to move, or is paused)."""
    return next((slot for slot in pool.slots if request.engine_request_id in slot.inflight), None)


def step(slot: ReplicaSlot, *deltas: RequestDelta, seq: int = 1) -> StepEvents:
    return StepEvents(slot.name, "e", seq, 1, list(deltas), [], [])


def delta(request: InFlightRequest, token_ids: list[int], finished: bool = False,
          engine_request_id: str | None = None, index: int = 0) -> RequestDelta:
    return RequestDelta(engine_request_id or request.engine_request_id, token_ids, finished,
                        "length" if finished else None, len(request.prepared.prompt_token_ids), 0, [], index)
