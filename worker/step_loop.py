"""The replica's step loop: one thread that owns the engine, steps it while it has work and runs posted calls."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, TypeVar

from engine.heartbeat import Heartbeat
from worker.messages import ReplicaState
from worker.outbox import Outbox

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine

log = logging.getLogger(__name__)

T = TypeVar("T")
# How often an idle loop beats; a health check sees a beat at most this old from a live, idle replica.
IDLE_BEAT_INTERVAL_S = 0.5


class EngineUnavailableError(RuntimeError):
    """The engine failed or was shut down; the replica must be replaced to serve again."""


class StepLoop:
    """Builds an engine on its own thread and is then the only code that touches it.

    Other threads `call(fn)`: fn(engine) runs on the loop thread between two steps. So engine
    calls are never concurrent, a call waits for at most one step (a lock would let the loop
    re-take it step after step and starve callers), and a snapshot taken in a call is
    consistent with the steps the outbox has seen. Idle, the loop sleeps on an event.

    Liveness is the engine's `Heartbeat`, which only this thread beats: between steps, within a step
    (after each layer), and every IDLE_BEAT_INTERVAL_S while idle. A posted call or a step that hangs
    stops the beats; a slow step does not.
    """

    def __init__(self, name: str, make_engine: Callable[[], LLMEngine], outbox: Outbox) -> None:
        self._outbox = outbox
        self._calls: queue.SimpleQueue[tuple[Callable[[LLMEngine], object], Future[object]]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()  # orders posting a call against the loop's end (see `_finish`)
        self._stopping = False
        # Progress, written by the loop thread only; read anywhere for health (an attribute read is atomic).
        self.state: ReplicaState = "loading"
        self.error: str | None = None
        self.has_work = False
        self.num_steps = 0
        self.heartbeat = Heartbeat()  # the engine's, once it is built
        self._thread = threading.Thread(target=self._run, args=(make_engine,), name=f"{name}-steps", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run fn(engine) on the loop thread between steps and return its result (or raise its error). While
        the engine loads, the call waits for it; if it fails to load, the call raises EngineUnavailableError."""
        future: Future[object] = Future()
        with self._lock:
            if self.state not in ("loading", "running"):
                raise EngineUnavailableError(f"engine is {self.state}" + (f": {self.error}" if self.error else ""))
            self._calls.put((fn, future))
        self._wake.set()
        return future.result()  # type: ignore[return-value]

    def stop(self) -> None:
        """Finish the calls already posted, stop stepping and release the engine."""
        self._stopping = True
        self._wake.set()
        self._thread.join()

    def _run(self, make_engine: Callable[[], LLMEngine]) -> None:
        """The thread: the engine lives in this frame only, so it is closed and released when the loop ends."""
        try:
            engine = make_engine()
        except BaseException as e:
            log.exception("the engine failed to load")
            self._finish("failed", f"the engine failed to load: {e!r}")
            return
        self.heartbeat = engine.heartbeat
        self.state = "running"
        try:
            self._serve(engine)
        except Exception as e:
            log.exception("engine step failed; this replica is down")
            self._finish("failed", repr(e))
        else:
            self._finish("stopped", None)
        finally:
            engine.close()  # stops its tensor-parallel rank processes

    def _serve(self, engine: LLMEngine) -> None:
        while True:
            self._wake.clear()  # before the calls are run: a call posted after this wakes the wait below
            self._run_calls(engine)
            if self._stopping:
                return
            self.heartbeat.beat()
            self.has_work = engine.has_unfinished()
            if self.has_work:
                self._step(engine)
            else:
                self._wake.wait(IDLE_BEAT_INTERVAL_S)

    def _step(self, engine: LLMEngine) -> None:
        outputs = engine.step()
        self.num_steps += 1  # counted before the outbox wakes the subscriber, who may then ask for health
        self._outbox.add(outputs, engine.take_kv_events())

    def _run_calls(self, engine: LLMEngine) -> None:
        while True:
            try:
                fn, future = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(fn(engine))
            except Exception as e:  # the caller's error, handed back to the caller
                future.set_exception(e)

    def _finish(self, state: ReplicaState, error: str | None) -> None:
        """Refuse new calls, fail the ones still queued, and let the subscriber drain the outbox."""
        with self._lock:
            self.state, self.error, self.has_work = state, error, False
        while True:
            try:
                _, future = self._calls.get_nowait()
            except queue.Empty:
                break
            future.set_exception(EngineUnavailableError(f"engine is {state}" + (f": {error}" if error else "")))
        self._outbox.close()
