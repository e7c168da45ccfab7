"""`Replica`: the Ray actor that serves one LLMEngine and streams its steps as batched events."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

from engine.sampling_params import SamplingParams
from worker.messages import EngineInfo, KVSnapshot, ReplicaHealth, ReplicaStats, RequestSpec, StepEvents, SubmitError
from worker.outbox import Outbox
from worker.step_loop import EngineUnavailableError, StepLoop

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine

log = logging.getLogger(__name__)

# Event batches Ray may hold unread before `events` pauses; meanwhile new steps coalesce in the outbox.
EVENTS_IN_FLIGHT = 2
# Threads apart from the default group's, so that neither calls queued behind a hung step nor a stream
# can hold up the other: `health` always answers, and `events` has room for the live stream plus one
# being replaced. Ray takes these at `ray.remote`; the methods name their group below.
CONCURRENCY_GROUPS = {"health": 1, "events": 2}
# A replica with requests but no word from its router (a health check or a submit) for this long aborts them:
# their router is gone, and nobody will read their tokens. A router passes its own bound (see RouterConfig).
ORPHAN_TIMEOUT_S = 5.0
# On SIGTERM (or a `drain` call), how long a replica lets its requests finish before it exits anyway.
DRAIN_TIMEOUT_S = 30.0


class Replica:
    """One engine behind a Ray actor: submit / abort / snapshot calls, and one stream of step events.

    A threaded actor, not an async one: engine calls block (torch, and a tensor-parallel step waits
    on other processes), so an async actor would have to push them to a thread anyway. Here the
    engine lives on its own `StepLoop` thread; every method is plain blocking code that hands the
    loop a call, and `health` (its own thread, see CONCURRENCY_GROUPS) reads progress counters
    without waiting, so it answers even while a step hangs.
    """

    def __init__(
        self,
        name: str,
        model: str | Path | None,
        engine_kwargs: dict[str, Any] | None = None,
        max_queued_requests: int = 256,
        orphan_timeout_s: float = ORPHAN_TIMEOUT_S,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
    ) -> None:
        """`model` None serves the embedded tiny random Qwen3 (built on this node on first use)."""
        if isinstance(max_queued_requests, bool) or not isinstance(max_queued_requests, int) or max_queued_requests < 1:
            raise ValueError(f"max_queued_requests must be a positive integer, got {max_queued_requests!r}")
        if not drain_timeout_s >= 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {drain_timeout_s!r}")
        self.name = name
        self.epoch = uuid.uuid4().hex  # a restarted replica is a new actor, hence a new epoch
        self.max_queued_requests = max_queued_requests
        self._outbox = Outbox(name, self.epoch)
        self._random_weights = model is None
        self._loop = StepLoop(name, lambda: _build_engine(model, engine_kwargs or {}), self._outbox)
        self._last_contact = time.monotonic()
        threading.Thread(target=self._abort_orphans, args=(orphan_timeout_s,), name=f"{name}-orphans",
                         daemon=True).start()
        self.drain_timeout_s = drain_timeout_s
        self._draining = False
        self._drain_lock = threading.Lock()
        if threading.current_thread() is threading.main_thread():  # Ray builds an actor on its process's main thread
            signal.signal(signal.SIGTERM, lambda signum, frame: self.drain())  # instead of Ray's: exit at once

    def __repr__(self) -> str:  # Ray prefixes the actor's log lines with this
        return f"Replica({self.name})"

    def submit(self, specs: list[RequestSpec]) -> list[SubmitError | None]:
        """Queue each request; per spec, None if queued or why not. A bad spec fails alone."""
        # Word from the router, and before the work it brings: a replica that just started to serve has not
        # had its first health check yet, and the silence since its engine began loading is no orphaning.
        self._last_contact = time.monotonic()
        try:
            return self._loop.call(lambda engine: [self._admit(engine, spec) for spec in specs])
        except EngineUnavailableError as e:
            return [SubmitError("unavailable", f"replica {self.name}: {e}")] * len(specs)

    def _admit(self, engine: LLMEngine, spec: RequestSpec) -> SubmitError | None:
        if self._draining:
            return SubmitError("unavailable", f"replica {self.name} is draining")
        num_waiting = engine.stats().num_waiting
        if num_waiting >= self.max_queued_requests:
            return SubmitError(
                "resource_exhausted",
                f"queue full: replica {self.name} has {num_waiting} requests waiting "
                f"(max_queued_requests={self.max_queued_requests})",
            )
        try:
            params = SamplingParams.from_kwargs(**spec.sampling_params)
            engine.add_request(spec.prompt_token_ids, params, spec.request_id, spec.resumed_tokens)
        except ValueError as e:
            return SubmitError("invalid_argument", str(e))
        return None

    def abort(self, request_ids: list[str]) -> None:
        """Stop these requests and free their KV blocks; each one's final delta ("abort") comes next step."""
        with contextlib.suppress(EngineUnavailableError):  # a stopped or failed engine runs nothing to abort
            self._loop.call(lambda engine: [engine.abort(request_id) for request_id in request_ids])

    def abort_all(self) -> int:
        """Abort every request (a router starting up owns none of them: they belong to a dead router)."""
        try:
            return self._loop.call(lambda engine: engine.abort_all())
        except EngineUnavailableError:
            return 0

    def _abort_orphans(self, timeout_s: float) -> None:
        while self._loop.state in ("loading", "running"):
            time.sleep(min(1.0, timeout_s / 2))
            if self._loop.has_work and time.monotonic() - self._last_contact > timeout_s:
                log.warning("%s: no word from the router for %.0f s; aborting its requests", self.name, timeout_s)
                self.abort_all()
                self._last_contact = time.monotonic()

    def drain(self, timeout_s: float | None = None) -> None:
        """Take no new request (health says draining at once), let the running ones finish within timeout_s
        (default: the drain timeout), then stop the engine and exit the actor. Returns at once.

        Requests still running at the deadline are not aborted: the event stream ends after their last
        tokens, and the router continues them on another replica, as after a failure. SIGTERM does this too.
        """
        with self._drain_lock:
            if self._draining:
                return
            self._draining = True
        timeout_s = self.drain_timeout_s if timeout_s is None else timeout_s
        threading.Thread(target=self._drain, args=(timeout_s,), name=f"{self.name}-drain", daemon=True).start()

    def _drain(self, timeout_s: float) -> None:
        log.info("%s: draining (up to %.0f s for its requests to finish)", self.name, timeout_s)
        deadline = time.monotonic() + timeout_s
        while self._loop.has_work and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._loop.has_work:
            log.warning("%s: drain timeout reached with requests running; the router moves them", self.name)
        self._loop.stop()  # the event stream ends once its last batch is sent
        ray.get_runtime_context().current_actor.__ray_terminate__.remote()  # exits after running calls end

    @ray.method(concurrency_group="health")
    def health(self) -> ReplicaHealth:
        """The step thread's heartbeat; never waits for the engine. Also the router's sign of life (see
        ORPHAN_TIMEOUT_S)."""
        loop = self._loop
        heartbeat = loop.heartbeat
        beat_at, step_started_at = heartbeat.beat_at, heartbeat.step_started_at
        self._last_contact = now = time.monotonic()  # after the reads: ages are never negative
        return ReplicaHealth(
            replica=self.name,
            epoch=self.epoch,
            state=loop.state,
            draining=self._draining,
            has_work=loop.has_work,
            num_steps=loop.num_steps,
            seconds_since_heartbeat=now - beat_at,
            step_running_s=None if step_started_at is None else now - step_started_at,
            step_num_tokens=heartbeat.step_num_tokens,
            error=loop.error,
        )

    def describe(self) -> EngineInfo:
        """The engine's model and limits (constant for this replica's life)."""
        return self._loop.call(lambda engine: _describe(engine, self._random_weights))

    def stats(self) -> ReplicaStats:
        """The engine's load and cache counters."""
        engine_stats = self._loop.call(lambda engine: engine.stats())
        return ReplicaStats(self.name, self.epoch, self._loop.num_steps, self.max_queued_requests, engine_stats)

    def kv_snapshot(self) -> KVSnapshot:
        """Every resident block hash, taken between two steps so it matches the event seq exactly."""
        return self._loop.call(
            lambda engine: KVSnapshot(
                self.name, self.epoch, self._outbox.last_seq, engine.cached_kv_hashes()
            )
        )

    @ray.method(
        num_returns="streaming", _generator_backpressure_num_objects=EVENTS_IN_FLIGHT, concurrency_group="events"
    )
    def events(self) -> Iterator[StepEvents]:
        """Stream step batches; replaces the previous subscriber's stream, which then ends.

        The stream opens at once with what is pending (maybe nothing): from that batch on, the caller
        gets every step. Take a `kv_snapshot` after it, and apply the batches with a later seq on top.
        """
        subscription, opening = self._outbox.subscribe()
        yield opening
        while (batch := self._outbox.next_batch(subscription)) is not None:
            yield batch

    def shutdown(self) -> None:
        """Stop the step loop and release the engine; the event stream ends after its last batch."""
        self._loop.stop()


def _build_engine(model: str | Path | None, engine_kwargs: dict[str, Any]) -> LLMEngine:
    # Imported here, in the actor: the router imports this module to start replicas and must not load torch.
    from engine.llm_engine import LLMEngine

    return LLMEngine(model, **engine_kwargs)  # None: the embedded tiny random model


def _describe(engine: LLMEngine, random_weights: bool) -> EngineInfo:
    config = engine.config
    return EngineInfo(
        model_dir=str(config.model),
        random_weights=random_weights,
        max_model_len=config.max_model_len,
        vocab_size=config.model_config.vocab_size,
        block_size=config.block_size,
        tensor_parallel_size=config.tensor_parallel_size,
        dtype=str(config.dtype).removeprefix("torch."),
        kv_cache_dtype=str(config.kv_cache_dtype).removeprefix("torch."),
        eos_token_ids=sorted(engine.eos_token_ids),
        num_kv_blocks=engine.block_manager.num_blocks,
        sampling_defaults=dict(config.sampling_defaults),
    )
