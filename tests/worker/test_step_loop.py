"""StepLoop with a scripted stand-in engine: calls between steps, idling, stop, a failing engine, and the
heartbeat that tells a hung loop from a busy one."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import pytest

from engine.block_manager import KVEvents
from engine.heartbeat import Heartbeat
from engine.outputs import RequestOutput
from worker.outbox import Outbox
from worker.step_loop import IDLE_BEAT_INTERVAL_S, EngineUnavailableError, StepLoop


class FakeEngine:
    """Each queued request yields one token per step for `steps` steps; `fail` makes step() raise."""

    def __init__(self) -> None:
        self.remaining: dict[str, int] = {}
        self.fail = False
        self.closed = False
        self.stepping = threading.Lock()  # held during step(): a call that runs meanwhile is a bug
        self.heartbeat = Heartbeat()

    def add(self, request_id: str, steps: int) -> None:
        assert not self.stepping.locked()
        self.remaining[request_id] = steps

    def has_unfinished(self) -> bool:
        return bool(self.remaining)

    def step(self) -> list[RequestOutput]:
        with self.stepping:
            if self.fail:
                raise RuntimeError("rank 1 died")
            outputs = []
            for request_id in list(self.remaining):
                self.remaining[request_id] -= 1
                done = self.remaining[request_id] == 0
                outputs.append(RequestOutput(request_id, [1], done, "length" if done else None, 2, 0))
                if done:
                    del self.remaining[request_id]
            return outputs

    def take_kv_events(self) -> KVEvents:
        return KVEvents()

    def close(self) -> None:
        self.closed = True


def start(engine: FakeEngine) -> tuple[StepLoop, Outbox, int]:
    outbox = Outbox("r", "e")
    subscription, _ = outbox.subscribe()
    return StepLoop("r", lambda: cast(Any, engine), outbox), outbox, subscription


def drain(outbox: Outbox, subscription: int) -> dict[str, list[int]]:
    """Token ids per request until every request seen has finished."""
    tokens: dict[str, list[int]] = {}
    unfinished: set[str] = set()
    while True:
        batch = outbox.next_batch(subscription)
        assert batch is not None
        for delta in batch.outputs:
            tokens.setdefault(delta.request_id, []).extend(delta.new_token_ids)
            if delta.finished:
                unfinished.discard(delta.request_id)
            else:
                unfinished.add(delta.request_id)
        if not unfinished:
            return tokens


def test_calls_run_between_steps_and_the_loop_idles_after() -> None:
    engine = FakeEngine()
    loop, outbox, sub = start(engine)
    loop.call(lambda e: e.add("a", 3))
    loop.call(lambda e: e.add("b", 5))
    assert drain(outbox, sub) == {"a": [1] * 3, "b": [1] * 5}
    assert loop.call(lambda e: e.has_unfinished()) is False
    assert loop.num_steps >= 5 and loop.heartbeat is engine.heartbeat
    assert (loop.state, loop.has_work) == ("running", False)
    loop.stop()
    assert loop.state == "stopped" and engine.closed
    with pytest.raises(EngineUnavailableError, match="stopped"):
        loop.call(lambda e: None)


def test_a_call_error_goes_back_to_its_caller_and_the_loop_goes_on() -> None:
    def bad_call(engine: FakeEngine) -> None:
        raise ValueError("bad")

    loop, _, _ = start(FakeEngine())
    with pytest.raises(ValueError, match="bad"):
        loop.call(bad_call)
    assert loop.call(lambda e: 42) == 42
    loop.stop()


def test_a_failing_step_marks_the_loop_failed_and_closes_the_stream() -> None:
    engine = FakeEngine()
    loop, outbox, sub = start(engine)
    engine.fail = True
    loop.call(lambda e: e.add("a", 3))
    assert outbox.next_batch(sub) is None  # closed with nothing pending
    assert loop.state == "failed" and "rank 1 died" in (loop.error or "")
    loop.stop()
    assert engine.closed
    with pytest.raises(EngineUnavailableError, match="rank 1 died"):
        loop.call(lambda e: None)


def test_an_engine_that_cannot_be_built_fails_its_calls_with_the_reason() -> None:
    def broken() -> Any:
        raise ValueError("model: no config.json")

    loop = StepLoop("r", broken, Outbox("r", "e"))
    with pytest.raises(EngineUnavailableError, match="failed to load: ValueError.*no config.json"):
        loop.call(lambda e: None)
    assert loop.state == "failed"


def test_calls_made_while_the_engine_loads_wait_for_it() -> None:
    release = threading.Event()
    engine = FakeEngine()

    def slow_build() -> Any:
        release.wait(10)
        return engine

    loop = StepLoop("r", slow_build, Outbox("r", "e"))  # returns at once: the actor answers health meanwhile
    assert loop.state == "loading"
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(loop.call, lambda e: e is engine)
        time.sleep(0.2)
        assert not answer.done()
        release.set()
        assert answer.result(10) is True
    assert loop.state == "running"
    loop.stop()


def test_an_idle_loop_beats_and_a_hung_one_does_not() -> None:
    engine = FakeEngine()
    loop, _, _ = start(engine)
    loop.call(lambda e: None)  # built
    time.sleep(3 * IDLE_BEAT_INTERVAL_S)
    assert time.monotonic() - loop.heartbeat.beat_at < 2 * IDLE_BEAT_INTERVAL_S  # idle, and beating
    release = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        pool.submit(loop.call, lambda e: release.wait(10))  # a call that hangs the loop thread
        time.sleep(4 * IDLE_BEAT_INTERVAL_S)
        assert time.monotonic() - loop.heartbeat.beat_at > 3 * IDLE_BEAT_INTERVAL_S
        release.set()
    loop.stop()
