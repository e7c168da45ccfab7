"""Placing a request: choosing a replica (the routing policy, among those serving with room), tracking the
request there and submitting it, trying the others when one refuses it or goes down meanwhile."""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc

from router.config import RouterConfig
from router.errors import PoolError
from router.inflight import InFlightRequest
from router.metrics import RouterMetrics
from router.policies import Candidate, RoutingPolicy
from router.replica_slot import ReplicaSlot, serving
from router.request_state import RequestState
from worker.handle import ReplicaGone
from worker.messages import SubmitError

log = logging.getLogger(__name__)


class Placement:
    """Places requests on the replicas of `slots`; `on_gone(slot, reason)` hears of one that failed a submit."""

    def __init__(self, slots: list[ReplicaSlot], policy: RoutingPolicy, config: RouterConfig, metrics: RouterMetrics,
                 on_gone: Callable[[ReplicaSlot, str], None]) -> None:
        self.slots, self.policy, self.config, self.metrics, self.on_gone = slots, policy, config, metrics, on_gone

    async def submit(self, request: InFlightRequest, exclude: frozenset[str] = frozenset()) -> None:
        """Place the request on a replica (trying others when one is full or fails); PoolError if none takes it."""
        tried = set(exclude)
        slot, num_cached_blocks = self.place(request, tried)
        while not await self.submit_placed(request, slot, num_cached_blocks):
            slot, num_cached_blocks = self.place(request, tried)

    def place(self, request: InFlightRequest, tried: set[str]) -> tuple[ReplicaSlot, int]:
        """Choose a replica not in `tried` and track the request there, as a new attempt; (it, the prompt blocks it
        has cached). PoolError when none may take it."""
        slot, num_cached_blocks = self._choose(request, tried)
        tried.add(slot.name)
        request.set_state(RequestState.PLACING)  # a failover meanwhile leaves it to `submit_placed`
        slot.add(request)  # before the call: its events may come first
        self.metrics.inflight.labels(slot.name).set(len(slot.inflight))
        return slot, num_cached_blocks

    async def submit_placed(self, request: InFlightRequest, slot: ReplicaSlot, num_cached_blocks: int) -> bool:
        """Submit the request to the replica it was placed on. True once it is queued there (or it ended, was
        paused, or was paused and placed again, meanwhile); False when the replica refused it or went down first,
        for the caller to place it again (such a death is no evidence against the request: the replica may have
        died before the call reached it). PoolError when the replica finds it invalid."""
        engine_request_id = request.engine_request_id  # this attempt's: a resume meanwhile starts another
        try:
            error = await self._submit_to(slot, request)
        finally:
            if request.engine_request_id == engine_request_id and request.state is RequestState.PLACING:
                request.set_state(RequestState.RUNNING)
        if request.engine_request_id != engine_request_id or request.state in (RequestState.DONE, RequestState.PAUSED):
            return True  # it ended, or was paused (and maybe placed again), meanwhile
        if error is None and slot.inflight.get(engine_request_id) is request:
            log.info("request %s -> %s (attempt %d, %d prompt tokens, %d of its blocks cached there)",
                     request.request_id, slot.name, request.attempt, len(request.prepared.prompt_token_ids),
                     num_cached_blocks)
            return True
        slot.remove(engine_request_id)  # refused, or queued on a replica that went down meanwhile
        if error is not None and error.code == "invalid_argument":
            raise PoolError(grpc.StatusCode.INVALID_ARGUMENT, error.message)
        return False

    def cancel(self, request: InFlightRequest) -> None:
        """Take the request off the replica it is placed on, if any, and abort it there."""
        for slot in self.slots:
            if slot.drop(request.engine_request_id) is not None:
                self.metrics.inflight.labels(slot.name).set(len(slot.inflight))

    def _choose(self, request: InFlightRequest, tried: set[str]) -> tuple[ReplicaSlot, int]:
        slots = [s for s in serving(self.slots) if s.name not in tried]
        if not slots:
            if not serving(self.slots):
                raise PoolError(grpc.StatusCode.UNAVAILABLE, "no healthy replica")
            raise PoolError(grpc.StatusCode.RESOURCE_EXHAUSTED, "every replica's queue is full")
        open_slots = [s for s in slots if len(s.inflight) < self.config.max_inflight_per_replica]
        if not open_slots:
            raise PoolError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"all replicas are at capacity ({self.config.max_inflight_per_replica} requests each)",
            )
        hashes = request.prepared.prompt_hashes
        candidates = [
            Candidate(s.name, s.load_tokens, len(s.inflight), s.kv.num_cached_prefix_blocks(hashes))
            for s in open_slots
        ]
        chosen = self.policy.choose(candidates, len(hashes))
        return next(s for s in open_slots if s.name == chosen.name), chosen.cached_prefix_blocks

    async def _submit_to(self, slot: ReplicaSlot, request: InFlightRequest) -> SubmitError | None:
        assert slot.handle is not None
        specs = request.specs()
        try:
            errors = await slot.handle.submit(specs)
        except ReplicaGone as gone:
            slot.remove(request.engine_request_id)  # this submit retries it; the failover must not
            self.on_gone(slot, gone.reason)
            return SubmitError("unavailable", gone.reason)
        refusal = next((error for error in errors if error is not None), None)
        queued = [spec.request_id for spec, error in zip(specs, errors) if error is None]
        if refusal is not None and queued:  # an attempt's choices run where all of them were taken, or nowhere
            slot.handle.abort(queued)
        return refusal
