"""The replica's step loop: one thread that owns the engine, steps it while it has work and runs posted calls."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, TypeVar

from worker.messages import ReplicaState
from worker.outbox import Outbox

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine

log = logging.getLogger(__name__)

T = TypeVar("T")


class EngineUnavailableError(RuntimeError):
    """The engine failed or was shut down; the replica must be replaced to serve again."""


class StepLoop:
    """Builds an engine on its own thread and is then the only code that touches it.

    Other threads `call(fn)`: fn(engine) runs on the loop thread between two steps. So engine
    calls are never concurrent, a call waits for at most one step (a lock would let the loop
    re-take it step after step and starve callers), and a snapshot taken in a call is
    consistent with the steps the outbox has seen. Idle, the loop sleeps on an event.
    """

    def __init__(self, name: str, make_engine: Callable[[], LLMEngine], outbox: Outbox) -> None:
        self._outbox = outbox
        self._calls: queue.SimpleQueue[tuple[Callable[[LLMEngine], object], Future[object]]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()  # orders posting a call against the loop's end (see `_finish`)
        self._stopping = False
        # Progress, written by the loop thread only; read anywhere for health (an attribute read is atomic).
        self.state: ReplicaState = "running"
        self.error: str | None = None
        self.has_work = False
        self.num_steps = 0
        self.last_step_at: float | None = None  # time.monotonic() of the latest step
        built: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, args=(make_engine, built), name=f"{name}-steps", daemon=True)
        self._thread.start()
        built.result()  # re-raises the engine's construction error

    def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run fn(engine) on the loop thread between steps and return its result (or raise its error)."""
        future: Future[object] = Future()
        with self._lock:
            if self.state != "running":
                raise EngineUnavailableError(f"engine is {self.state}" + (f": {self.error}" if self.error else ""))
            self._calls.put((fn, future))
        self._wake.set()
        return future.result()  # type: ignore[return-value]

    def stop(self) -> None:
        """Finish the calls already posted, stop stepping and release the engine."""
        self._stopping = True
        self._wake.set()
        self._thread.join()

    def _run(self, make_engine: Callable[[], LLMEngine], built: Future[None]) -> None:
        """The thread: the engine lives in this frame only, so it is closed and released when the loop ends."""
        try:
            engine = make_engine()
        except BaseException as e:
            built.set_exception(e)
            self._finish("failed", repr(e))
            return
        built.set_result(None)
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
            self.has_work = engine.has_unfinished()
            if self.has_work:
                self._step(engine)
            else:
                self._wake.wait()

    def _step(self, engine: LLMEngine) -> None:
        outputs = engine.step()
        self.num_steps += 1  # counted before the outbox wakes the subscriber, who may then ask for health
        self.last_step_at = time.monotonic()
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
            future.set_exception(EngineUnavailableError(f"engine is {state}"))
        self._outbox.close()
