"""The replicas as the router sees them: start or re-attach, route, stream their events, notice
failures, move in-flight requests elsewhere, restart.

All of it runs on the router's one asyncio loop, so no locks: state changes between awaits only.
A replica is `serving` from its first snapshot on, `down` from the first sign of failure (its event
stream breaks, a health call fails or times out, or its step thread's heartbeat stops), `starting`
while it is replaced. A replica told to drain (SIGTERM, or its `drain` call) is `draining`: it gets no
new request, its requests finish there, and when it exits it is down (what is left moves) and replaced.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import grpc

from router.config import RouterConfig
from router.health import check_health
from router.inflight import InFlightRequest
from router.kv_view import KVView
from router.metrics import RouterMetrics
from router.policies import Candidate, RoutingPolicy
from router.ray_placement import cluster_resources, wait_until_placed
from router.replica_slot import ReplicaSlot, SlotState
from router.request_state import RequestState
from router.retry_budget import MAX_REPLICA_DEATHS, RetryBudget
from worker.handle import ReplicaGone, ReplicaHandle
from worker.messages import EngineInfo, StepEvents, SubmitError
from worker.resources import ReplicaResources, plan_replicas

log = logging.getLogger(__name__)

class PoolError(Exception):
    """A request could not be placed: the gRPC status to answer with, and why."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class StartupError(Exception):
    """No replica could start (each one's first attempt failed): the router cannot serve."""


class ReplicaPool:
    """The router's replicas: placing requests, applying their event streams, health, failover, restarts."""

    def __init__(self, config: RouterConfig, policy: RoutingPolicy, metrics: RouterMetrics) -> None:
        self.config, self.policy, self.metrics = config, policy, metrics
        self.slots = [ReplicaSlot(name) for name in config.replica_names]
        for slot in self.slots:
            metrics.add_replica(slot.name)
        self.info: EngineInfo | None = None
        self.resources: ReplicaResources | None = None  # what each replica asks Ray for, planned at start
        self._engine_kwargs: dict[str, Any] = {}  # the config's, with what the plan adds
        self.on_serving_changed: Callable[[bool], None] = lambda serving: None
        self.budget = RetryBudget()
        self._closing = False
        self._tasks: set[asyncio.Task[None]] = set()  # bring-ups, restarts, failovers: cancelled on close
        self._started: asyncio.Future[None] | None = None  # done once start() may return (see _check_started)
        self._late: set[str] = set()  # replicas the start does not wait for: not placed by Ray, or failed
        self._start_errors: list[str] = []

    # --- life cycle ---

    async def start(self) -> EngineInfo:
        """Plan the replicas' resources, bring each one up (re-attaching to live ones of the same name), and
        return once every replica serves, except those Ray has not placed within seconds or that failed to start
        (the log says why): those join when they can, and do not keep the ports closed while one serves.
        StartupError when none can start, ValueError when they cannot all be placed."""
        self.resources = self._plan()
        self._started = asyncio.get_running_loop().create_future()
        for slot in self.slots:
            self._spawn(self._bring_up(slot), f"{slot.name}-start")
        try:
            await self._started
        except BaseException:
            await self.close(kill_replicas=True)
            raise
        assert self.info is not None
        return self.info

    def _plan(self) -> ReplicaResources:
        cfg = self.config
        cluster = cluster_resources()
        device = str(cfg.engine_kwargs.get("device", "auto"))
        on_gpu = device.startswith("cuda") or (device == "auto" and cluster.get("GPU", 0) > 0)
        resources = plan_replicas(cfg.num_replicas, cfg.tensor_parallel_size, on_gpu, cluster,
                                  cfg.engine_kwargs.get("gpu_memory_utilization"))
        batch_invariant = on_gpu if cfg.batch_invariant is None else cfg.batch_invariant
        self._engine_kwargs = {**cfg.engine_kwargs, "batch_invariant": batch_invariant}
        log.info("placement: %s; each replica asks Ray for %s; batch-invariant numerics %s", resources.summary,
                 ", ".join(f"{key} {amount:g}" for key, amount in resources.ray_resources.items()),
                 "on" if batch_invariant else "off")
        return resources

    async def _bring_up(self, slot: ReplicaSlot) -> None:
        """Re-attach to the live replica of that name, or start one; when that fails, keep restarting it."""
        try:
            await self._attach_or_start(slot)
        except (ReplicaGone, RuntimeError, ValueError) as e:
            self._start_errors.append(f"{slot.name}: {e}")
            self._late.add(slot.name)
            assert self._started is not None
            if len(self._start_errors) == len(self.slots) and not self._started.done():
                self._started.set_exception(StartupError("no replica could start; " + "; ".join(self._start_errors)))
                return
            self._check_started()
            log.warning("%s: failed to start (%s); retrying", slot.name, e)
            await self._restart(slot)

    def _check_started(self) -> None:
        """Let start() return once one replica serves and each other one serves or is late."""
        if self._started is None or self._started.done() or not self.serving():
            return
        if all(slot.state == "serving" or slot.name in self._late for slot in self.slots):
            self._started.set_result(None)

    async def _attach_or_start(self, slot: ReplicaSlot) -> None:
        leftover = ReplicaHandle.find(slot.name, self.config.namespace)
        if leftover is None:
            await self._attach(slot, self._start_actor(slot))
            return
        try:
            num_orphans = await leftover.abort_all()  # they belonged to the router before us
            log.info("%s: re-attaching to the running replica (%d orphaned requests aborted)", slot.name, num_orphans)
            await self._attach(slot, leftover)
        except ReplicaGone:
            log.warning("%s: the running replica did not answer; starting a new one", slot.name)
            await leftover.kill()
            await self._attach(slot, self._start_actor(slot))

    def _start_actor(self, slot: ReplicaSlot) -> ReplicaHandle:
        cfg = self.config
        assert self.resources is not None
        log.info("%s: starting a replica (model %s)", slot.name, cfg.model or "embedded tiny random Qwen3")
        return ReplicaHandle.start(
            slot.name, cfg.model, dict(self._engine_kwargs), resources=self.resources,
            max_queued_requests=cfg.max_queued_per_replica, drain_timeout_s=cfg.drain_timeout_s,
            namespace=cfg.namespace,
        )

    async def _attach(self, slot: ReplicaSlot, handle: ReplicaHandle) -> None:
        """Wait for Ray to place it and for its engine, subscribe to its events (the pump takes the first
        snapshot), start health checks."""
        assert self.resources is not None

        def late() -> None:
            self._late.add(slot.name)
            self._check_started()

        await wait_until_placed(handle, self.resources, on_report=late)
        info = await handle.describe()
        self.info = self.info or info
        slot.handle, slot.kv, slot.next_seq = handle, KVView(), None
        subscribed = asyncio.get_running_loop().create_future()
        slot.tasks = [
            asyncio.create_task(self._pump(slot, handle, subscribed), name=f"{slot.name}-events"),
            asyncio.create_task(self._watch_health(slot, handle), name=f"{slot.name}-health"),
        ]
        await subscribed
        self._set_state(slot, "serving")
        log.info("%s: serving (%d KV blocks, %d cached)", slot.name, info.num_kv_blocks, len(slot.kv.hashes))

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """A background task the pool owns (and cancels on close)."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self, kill_replicas: bool) -> None:
        self._closing = True
        for task in list(self._tasks):  # a replica being replaced would otherwise come up after we left
            task.cancel()
        for slot in self.slots:
            for task in slot.tasks:
                task.cancel()
        handles = [slot.handle for slot in self.slots if kill_replicas and slot.handle is not None]
        for handle, result in zip(handles, await asyncio.gather(*(h.kill() for h in handles), return_exceptions=True)):
            if isinstance(result, Exception):
                log.warning("%s: not killed: %s", handle.name, result)

    # --- routing ---

    def serving(self) -> list[ReplicaSlot]:
        return [s for s in self.slots if s.state == "serving"]

    async def submit(self, request: InFlightRequest, exclude: frozenset[str] = frozenset()) -> None:
        """Place the request on a replica (trying others when one is full or fails); PoolError if none takes it."""
        tried = set(exclude)
        slot, num_cached_blocks = self._place(request, tried)
        while not await self._submit_placed(request, slot, num_cached_blocks):
            slot, num_cached_blocks = self._place(request, tried)

    def _place(self, request: InFlightRequest, tried: set[str]) -> tuple[ReplicaSlot, int]:
        """Choose a replica not in `tried` and track the request there; (it, the prompt blocks it has cached)."""
        slot, num_cached_blocks = self._choose(request, tried)
        tried.add(slot.name)
        request.set_state(RequestState.PLACING)  # a failover meanwhile leaves it to `_submit_placed`
        request.replica = slot.name
        slot.add(request)  # before the call: its events may come first
        self.metrics.inflight.labels(slot.name).set(len(slot.inflight))
        return slot, num_cached_blocks

    async def _submit_placed(self, request: InFlightRequest, slot: ReplicaSlot, num_cached_blocks: int) -> bool:
        """Submit the request to the replica it was placed on. True once it is queued there (or it ended or was
        paused meanwhile); False when the replica refused it or went down first, for the caller to place it
        again (such a death is no evidence against the request: the replica may have died before the call
        reached it). PoolError when the replica finds it invalid."""
        try:
            error = await self._submit_to(slot, request)
            if request.state in (RequestState.DONE, RequestState.PAUSED):  # it ended, or was paused, meanwhile
                return True
            if error is None and slot.inflight.get(request.engine_request_id) is request:
                log.info("request %s -> %s (attempt %d, %d prompt tokens, %d of its blocks cached there)",
                         request.request_id, slot.name, request.attempt, len(request.prepared.prompt_token_ids),
                         num_cached_blocks)
                return True
            slot.remove(request.engine_request_id)  # refused, or queued on a replica that went down meanwhile
            if error is not None and error.code == "invalid_argument":
                raise PoolError(grpc.StatusCode.INVALID_ARGUMENT, error.message)
            return False
        finally:
            if request.state is RequestState.PLACING:
                request.set_state(RequestState.RUNNING)

    def _choose(self, request: InFlightRequest, tried: set[str]) -> tuple[ReplicaSlot, int]:
        slots = [s for s in self.serving() if s.name not in tried]
        if not slots:
            if not self.serving():
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
        try:
            [error] = await slot.handle.submit([request.spec()])
        except ReplicaGone as gone:
            slot.remove(request.engine_request_id)  # this submit retries it; the failover must not
            self._mark_down(slot, gone.reason)
            return SubmitError("unavailable", gone.reason)
        return error

    def abort(self, request: InFlightRequest) -> None:
        """Stop the request for good (client gone or deadline passed): its blocks are freed within a step."""
        if not request.done:
            request.set_state(RequestState.DONE)
        self._cancel_on_replica(request)
        if self.budget:
            self._admit_failovers()

    def _cancel_on_replica(self, request: InFlightRequest) -> None:
        for slot in self.slots:
            if slot.remove(request.engine_request_id) is not None:
                if slot.handle is not None:
                    slot.handle.abort([request.engine_request_id])
                self.metrics.inflight.labels(slot.name).set(len(slot.inflight))

    # --- events ---

    async def _pump(self, slot: ReplicaSlot, handle: ReplicaHandle, subscribed: asyncio.Future[None]) -> None:
        """Apply the replica's step batches: token deltas to their requests, KV events to its view."""
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
                self._deliver(slot, batch)
                await asyncio.sleep(0)  # the streams just woken send their chunks before Ray's next-batch call runs
        except (Exception, asyncio.CancelledError) as e:  # any failure of the stream takes the replica down
            if not subscribed.done():
                subscribed.set_exception(e if isinstance(e, Exception) else RuntimeError("event stream cancelled"))
            if isinstance(e, asyncio.CancelledError):
                raise
            reason = e.reason if isinstance(e, ReplicaGone) else f"event stream broke: {e.__class__.__name__}"
            self._mark_down(slot, reason)
            return
        if slot.state == "draining":
            self._mark_down(slot, "drained", died=False)
        else:
            self._mark_down(slot, "event stream ended")

    def _deliver(self, slot: ReplicaSlot, batch: StepEvents) -> None:
        num_tokens = 0
        for delta in batch.outputs:
            request = slot.inflight.get(delta.request_id)
            if request is None:
                continue  # aborted, paused, moved, or from before this router attached
            if delta.request_id != request.engine_request_id:  # an attempt superseded by a later one: never stream
                self._drop_superseded(slot, delta.request_id)  # two attempts' tokens (they would duplicate)
                continue
            if delta.new_token_ids:
                num_tokens += len(delta.new_token_ids)
                slot.kv.drop_pending(delta.request_id)  # prefilled: its blocks are reported stored by now
                if request.first_token_at is None:
                    self.metrics.ttft.observe(time.monotonic() - request.arrived_at)
            if request.num_cached_tokens is None:  # the replica that first admitted it; once per request
                self.metrics.prefix_hit_tokens.inc(delta.num_cached_tokens)
            stop_seen = request.on_delta(delta, slot.name)
            if stop_seen:
                slot.remove(delta.request_id)
                if not delta.finished and slot.handle is not None:  # a stop string only the router saw (TextStream)
                    slot.handle.abort([delta.request_id])
                self._record_finished(request)
            elif request.num_pending_tokens > self.config.max_stream_buffer_tokens:
                self._pause(slot, request)
        self.metrics.tokens_out.inc(num_tokens)  # once a batch: a labelled child costs a lookup each call
        self.metrics.inflight.labels(slot.name).set(len(slot.inflight))
        if self.budget:  # a moved request's first token frees its replica for the next failover
            self._admit_failovers()

    def _drop_superseded(self, slot: ReplicaSlot, engine_request_id: str) -> None:
        log.warning("%s: dropping %s, superseded by a later attempt", slot.name, engine_request_id)
        slot.remove(engine_request_id)
        if slot.handle is not None:
            slot.handle.abort([engine_request_id])

    def _pause(self, slot: ReplicaSlot, request: InFlightRequest) -> None:
        """The client reads slower than its request generates: stop generating (its KV blocks are freed) until
        the client has taken what waits for it; then `resume` continues from there, as a failover would."""
        slot.remove(request.engine_request_id)
        if slot.handle is not None:
            slot.handle.abort([request.engine_request_id])
        request.set_state(RequestState.PAUSED)
        self.metrics.slow_clients.labels("paused").inc()
        log.info("request %s paused after %d tokens: %d wait for its client (max_stream_buffer_tokens=%d)",
                 request.request_id, len(request.output_token_ids), request.num_pending_tokens,
                 self.config.max_stream_buffer_tokens)

    async def resume(self, request: InFlightRequest) -> None:
        """Place a paused request again (prompt + its output so far); its stream fails if no replica takes it."""
        self.metrics.slow_clients.labels("resumed").inc()
        try:
            await self.submit(request)
        except PoolError as e:
            request.fail(e.code, f"{e.message} (resuming the request after its client caught up)")

    def _record_finished(self, request: InFlightRequest) -> None:
        self.metrics.requests.labels("OK").inc()
        n = len(request.output_token_ids)
        if request.first_token_at is not None and n > 1:
            self.metrics.itl.observe((time.monotonic() - request.first_token_at) / (n - 1))

    def _recover_lost_deltas(self, slot: ReplicaSlot) -> None:
        """Batches were dropped, so some requests' tokens never reached us: restart them from what was sent."""
        lost = list(slot.inflight.values())
        log.warning("%s: event batches lost; resubmitting its %d requests", slot.name, len(lost))
        for request in lost:
            self._cancel_on_replica(request)
        self._fail_over(lost, exclude=frozenset())

    # --- failure handling ---

    async def _watch_health(self, slot: ReplicaSlot, handle: ReplicaHandle) -> None:
        """A replica that does not answer, failed, or whose step thread stopped beating is down."""
        cfg = self.config
        stats: asyncio.Task[None] | None = None
        while slot.handle is handle and slot.state != "down":
            await asyncio.sleep(cfg.health_interval_s)
            health = await check_health(handle, cfg)
            if isinstance(health, str):
                self._mark_down(slot, health)
                return
            if health.draining and slot.state == "serving":
                log.info("%s: draining: new requests go elsewhere; its %d in flight finish there", slot.name,
                         len(slot.inflight))
                self._set_state(slot, "draining")
            if stats is None or stats.done():  # stats wait for a step: never let them hold up health checks
                stats = asyncio.create_task(self._refresh_stats(slot, handle))

    async def _refresh_stats(self, slot: ReplicaSlot, handle: ReplicaHandle) -> None:
        try:
            slot.stats = await handle.stats()
        except ReplicaGone as gone:
            log.info("%s: no stats (%s); its health check tells whether it is down", slot.name, gone.reason)
            return
        self._publish_stats(slot)

    def _publish_stats(self, slot: ReplicaSlot) -> None:
        if slot.stats is None:
            return
        engine = slot.stats.engine
        m = self.metrics
        m.prefix_hit_rate.labels(slot.name).set(engine.num_prefix_hit_tokens / max(1, engine.num_prompt_tokens))
        m.kv_usage.labels(slot.name).set(engine.num_kv_blocks_used / max(1, engine.num_kv_blocks_total))
        m.queue_depth.labels(slot.name).set(engine.num_waiting)

    def _mark_down(self, slot: ReplicaSlot, reason: str, died: bool = True) -> None:
        """Take the replica out of service, move its requests (through the retry budget) and restart it.
        `died`: it failed, so the requests it was running count it as a death (not when it drained)."""
        if slot.state == "down" or self._closing:
            return
        log.warning("%s: down (%s); failing over %d requests", slot.name, reason, len(slot.inflight))
        self._set_state(slot, "down")
        current = asyncio.current_task()
        for task in slot.tasks:
            if task is not current:
                task.cancel()
        requests = list(slot.inflight.values())
        for request in requests:
            slot.remove(request.engine_request_id)
            if died and request.state is not RequestState.PLACING:  # queued there, not on its way
                request.replica_deaths.append(slot.name)
        self.metrics.inflight.labels(slot.name).set(0)
        self._fail_over(requests, exclude=frozenset({slot.name}))
        self._spawn(self._restart(slot), f"{slot.name}-restart")

    def _fail_over(self, requests: list[InFlightRequest], exclude: frozenset[str]) -> None:
        """Move the requests elsewhere, as the retry budget lets them; stop those that look like what kills
        replicas."""
        limit = self.config.max_failovers_per_request
        for request in requests:
            if request.state in (RequestState.DONE, RequestState.PLACING):  # a submit in progress places it again
                continue
            if len(request.replica_deaths) >= MAX_REPLICA_DEATHS:
                self._stop_suspect(request)
                continue
            request.num_failovers += 1
            if request.num_failovers > limit:
                log.warning("request %s: its replica failed %d times; not moving it again", request.request_id,
                            request.num_failovers)
                request.fail(grpc.StatusCode.UNAVAILABLE, f"the replicas serving this request failed "
                             f"{request.num_failovers} times (max_failovers_per_request={limit})")
                continue
            self.metrics.failovers.inc()
            self.budget.wait(request, exclude)
        self._admit_failovers()
        if self.budget:
            log.info("retry budget: %d failovers wait for a replica with none in progress", len(self.budget))

    def _stop_suspect(self, request: InFlightRequest) -> None:
        deaths = " and ".join(request.replica_deaths)
        log.warning("request %s stopped: replicas %s died while running it, with no token in between (%d tokens "
                    "sent); it may be what kills them, so it is not moved again", request.request_id, deaths,
                    len(request.output_token_ids))
        self.metrics.queries_of_death.inc()
        request.fail(grpc.StatusCode.ABORTED, f"replicas {deaths} died while running this request, with no token "
                     "in between: it may be what kills them, so it was stopped instead of moved again")

    def _admit_failovers(self) -> None:
        """Start the failovers the retry budget lets start now; with no replica serving, they fail."""
        serving = self.serving()
        if not serving:
            for request in self.budget.take_all():
                request.fail(grpc.StatusCode.UNAVAILABLE, "no healthy replica (after its replica failed)")
        for request, exclude, busy in self.budget.admit(serving):
            try:
                slot, num_cached_blocks = self._place(request, set(exclude | busy))
            except PoolError as e:
                request.fail(e.code, f"{e.message} (after its replica failed)")
                continue
            self._spawn(self._fail_over_to(request, slot, num_cached_blocks, exclude),
                        f"failover-{request.request_id}")
        self.metrics.failovers_waiting.set(len(self.budget))

    async def _fail_over_to(
        self, request: InFlightRequest, slot: ReplicaSlot, num_cached_blocks: int, exclude: frozenset[str]
    ) -> None:
        """Submit a moved request where the budget placed it; refused there, it waits in the budget again."""
        try:
            if not await self._submit_placed(request, slot, num_cached_blocks):
                self.budget.wait(request, exclude | {slot.name})
                self._admit_failovers()
        except PoolError as e:
            request.fail(e.code, f"{e.message} (after its replica failed)")

    async def _restart(self, slot: ReplicaSlot) -> None:
        """Replace the dead replica with a new actor of the same name; retry with backoff until it serves."""
        delay = 1.0
        while not self._closing:
            self._set_state(slot, "starting")
            handle = None
            try:
                old = ReplicaHandle.find(slot.name, self.config.namespace)
                if old is not None:
                    await old.kill()
                slot.handle = None
                handle = self._start_actor(slot)
                await self._attach(slot, handle)
                slot.num_restarts += 1
                self.metrics.replica_restarts.labels(slot.name).inc()
                return
            except asyncio.CancelledError:  # the pool closed while the new replica was starting: it must not live on
                if handle is not None:
                    await handle.kill(wait=False)  # returns at once
                raise
            except (ReplicaGone, RuntimeError, ValueError) as e:
                log.warning("%s: restart failed (%s); retrying in %.0f s", slot.name, e, delay)
                self._set_state(slot, "down")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    def _set_state(self, slot: ReplicaSlot, state: SlotState) -> None:
        was_serving = bool(self.serving())
        slot.state = state
        self.metrics.replica_up.labels(slot.name).set(1 if state == "serving" else 0)
        if bool(self.serving()) != was_serving:
            self.on_serving_changed(not was_serving)
        if state == "serving":
            self._check_started()
            if self.budget:
                self._admit_failovers()

