"""Applying a replica's step events: KV events to the router's view of its cache, token deltas to its requests.
Also what the stream alone reveals: lost batches (their requests start again from what was sent), and a client
reading slower than its request generates (the request is paused until it has caught up)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from router.config import RouterConfig
from router.inflight import InFlightRequest, attempt_key
from router.metrics import RouterMetrics
from router.replica_slot import ReplicaSlot
from router.request_state import RequestState
from worker.handle import ReplicaGone, ReplicaHandle
from worker.messages import StepEvents

log = logging.getLogger(__name__)


class EventPump:
    """Streams each replica's step batches into the router's state. It calls `on_down(slot, reason, died)` when a
    stream ends or breaks, `on_lost(requests)` with the requests to move again after lost batches, and
    `on_progress()` after each batch (a moved request's first token frees its replica for the next failover)."""

    def __init__(self, config: RouterConfig, metrics: RouterMetrics, on_down: Callable[[ReplicaSlot, str, bool], None],
                 on_lost: Callable[[list[InFlightRequest]], None], on_progress: Callable[[], None]) -> None:
        self.config, self.metrics = config, metrics
        self.on_down, self.on_lost, self.on_progress = on_down, on_lost, on_progress

    async def run(self, slot: ReplicaSlot, handle: ReplicaHandle, subscribed: asyncio.Future[None]) -> None:
        """Apply the replica's batches until its stream ends; `subscribed` is done once the first batch and the
        snapshot under it are applied (or holds why the stream failed before)."""
        try:
            async for batch in handle.events():
                if not slot.kv.apply(batch):  # first batch, a gap or a new epoch: re-snapshot, then re-apply
                    slot.kv.reset(await handle.kv_snapshot())
                    slot.kv.apply(batch)
                if not subscribed.done():
                    subscribed.set_result(None)
                elif slot.next_seq is not None and batch.seq != slot.next_seq:
                    self._recover_lost_deltas(slot)
                slot.next_seq = batch.seq + 1
                self.deliver(slot, batch)
                await asyncio.sleep(0)  # the streams just woken send their chunks before Ray's next-batch call runs
        except (Exception, asyncio.CancelledError) as e:  # any failure of the stream takes the replica down
            if not subscribed.done():
                subscribed.set_exception(e if isinstance(e, Exception) else RuntimeError("event stream cancelled"))
            if isinstance(e, asyncio.CancelledError):
                raise
            self.on_down(slot, e.reason if isinstance(e, ReplicaGone) else f"event stream broke: {type(e).__name__}",
                         True)
            return
        if slot.state == "draining":
            self.on_down(slot, "drained", False)
        else:
            self.on_down(slot, "event stream ended", True)

    def deliver(self, slot: ReplicaSlot, batch: StepEvents) -> None:
        """Apply one batch's token deltas to the requests they belong to."""
        num_tokens = 0
        for delta in batch.outputs:
            key = attempt_key(delta.request_id)
            request = slot.inflight.get(key)
            if request is None:
                continue  # aborted, paused, moved, or from before this router attached
            if key != request.engine_request_id:  # an attempt superseded by a later one: never stream
                log.warning("%s: dropping %s, superseded by a later attempt", slot.name, delta.request_id)
                slot.drop(key)  # two attempts' tokens (they would duplicate)
                continue
            if delta.new_token_ids:
                num_tokens += len(delta.new_token_ids)
                slot.kv.drop_pending(key)  # prefilled: its blocks are reported stored by now
                if request.first_token_at is None:
                    self.metrics.ttft.observe(time.monotonic() - request.arrived_at)
            if request.num_cached_tokens is None:  # the replica that first admitted it; once per request
                self.metrics.prefix_hit_tokens.inc(delta.num_cached_tokens)
            if request.on_delta(delta, slot.name):  # its choice finished
                if request.done:
                    if delta.finished:
                        slot.remove(key)
                    else:  # a stop string only the router saw (TextStream)
                        slot.drop(key)
                    self._record_finished(request)
                elif not delta.finished and delta.request_id != key and slot.handle is not None:
                    slot.handle.abort([delta.request_id])  # that stop string, in a choice that runs alone
            elif request.num_pending_tokens > self.config.max_stream_buffer_tokens:
                self._pause(slot, request)
        self.metrics.tokens_out.inc(num_tokens)  # once a batch: a labelled child costs a lookup each call
        self.metrics.inflight.labels(slot.name).set(len(slot.inflight))
        self.on_progress()

    def _pause(self, slot: ReplicaSlot, request: InFlightRequest) -> None:
        """The client reads slower than its request generates: stop generating (its KV blocks are freed) until
        the client has taken what waits for it; then `ReplicaPool.resume` continues from there, as a failover
        would."""
        slot.drop(request.engine_request_id)
        request.set_state(RequestState.PAUSED)
        self.metrics.slow_clients.labels("paused").inc()
        log.info("request %s paused after %d tokens: %d wait for its client (max_stream_buffer_tokens=%d)",
                 request.request_id, request.num_output_tokens, request.num_pending_tokens,
                 self.config.max_stream_buffer_tokens)

    def _record_finished(self, request: InFlightRequest) -> None:
        self.metrics.requests.labels("OK").inc()
        n = max(len(choice.token_ids) for choice in request.choices)  # a stream's: its choices' tokens come together
        if request.first_token_at is not None and n > 1:
            self.metrics.itl.observe((time.monotonic() - request.first_token_at) / (n - 1))

    def _recover_lost_deltas(self, slot: ReplicaSlot) -> None:
        """Batches were dropped, so some requests' tokens never reached us: restart them from what was sent."""
        lost = list(slot.inflight.values())
        log.warning("%s: event batches lost; resubmitting its %d requests", slot.name, len(lost))
        for engine_request_id in list(slot.inflight):
            slot.drop(engine_request_id)
        self.metrics.inflight.labels(slot.name).set(len(slot.inflight))
        self.on_lost(lost)
