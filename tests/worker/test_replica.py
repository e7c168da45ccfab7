"""Replica as a real Ray actor on a local CPU cluster: streaming, batching, abort, KV snapshots, errors, naming."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import ray

from engine import LLMEngine, SamplingParams
from worker import ReplicaHandle, RequestDelta, RequestSpec, StepEvents, SubmitError

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parents[2]
VOCAB = 1024  # the tiny checkpoint's vocabulary
# 32 blocks of 16 tokens: small enough that two rounds of 100-token prompts evict cached blocks.
ENGINE_KWARGS: dict[str, Any] = dict(device="cpu", dtype="float32", num_kv_blocks=32, max_model_len=256)
MAX_QUEUED = 4
TIMEOUT_S = 60.0
# One loop for every call of this module's tests: an event stream lives on the loop it was opened on.
LOOP = asyncio.new_event_loop()


def run(call: Awaitable[T]) -> T:
    return LOOP.run_until_complete(call)


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(n)]


def spec(request_id: str, token_ids: list[int], max_tokens: int, **params: Any) -> RequestSpec:
    """A greedy request that ignores EOS; `params` override."""
    params = {"temperature": 0.0, "max_tokens": max_tokens, "ignore_eos": True, **params}
    return RequestSpec(request_id, token_ids, params)


class Stream:
    """A subscription to a replica's event batches, read with a timeout."""

    def __init__(self, replica: ReplicaHandle) -> None:
        self._events = replica.events()
        self.opening = self.next()

    def next(self) -> StepEvents:
        return run(asyncio.wait_for(anext(self._events), TIMEOUT_S))

    def until_finished(self, request_ids: list[str]) -> list[StepEvents]:
        """Batches until every one of `request_ids` has finished."""
        batches: list[StepEvents] = []
        unfinished = set(request_ids)
        while unfinished:
            batches.append(self.next())
            unfinished -= {d.request_id for d in batches[-1].outputs if d.finished}
        return batches


def deltas_of(batches: list[StepEvents]) -> dict[str, list[RequestDelta]]:
    by_id: dict[str, list[RequestDelta]] = {}
    for batch in batches:
        for delta in batch.outputs:
            by_id.setdefault(delta.request_id, []).append(delta)
    return by_id


def tokens_of(deltas: list[RequestDelta]) -> list[int]:
    return [t for d in deltas for t in d.new_token_ids]


def submit(replica: ReplicaHandle, specs: list[RequestSpec]) -> list[SubmitError | None]:
    return run(replica.submit(specs, TIMEOUT_S))


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    # Workers import `worker` and `engine` from this checkout, as the driver does.
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})
    yield
    LOOP.run_until_complete(LOOP.shutdown_asyncgens())
    LOOP.close()
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint: Callable[..., Path]) -> Path:
    return tiny_checkpoint("tied-gqa2-hd16")


@pytest.fixture(scope="module")
def replica(ray_cluster: None, model_dir: Path) -> Iterator[ReplicaHandle]:
    handle = ReplicaHandle.start(
        f"test-{uuid.uuid4().hex[:8]}", model_dir, ENGINE_KWARGS, max_queued_requests=MAX_QUEUED
    )
    assert run(handle.health(TIMEOUT_S)).state in ("loading", "running")  # answers at once
    run(handle.describe(TIMEOUT_S))  # waits for the engine
    assert run(handle.health(TIMEOUT_S)).state == "running"
    yield handle
    run(handle.kill())


def test_greedy_stream_matches_offline_generate(replica: ReplicaHandle, model_dir: Path) -> None:
    token_ids = prompt(1, 40)
    offline = LLMEngine(model_dir, **ENGINE_KWARGS).generate(
        token_ids, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False
    )
    stream = Stream(replica)
    assert submit(replica, [spec("greedy", token_ids, 16)]) == [None]
    deltas = deltas_of(stream.until_finished(["greedy"]))["greedy"]
    assert tokens_of(deltas) == offline["token_ids"]  # type: ignore[index]
    assert (deltas[-1].finish_reason, deltas[-1].num_prompt_tokens) == ("length", 40)


def test_n_choices_stream_with_their_index_as_the_offline_engine_samples_them(
    replica: ReplicaHandle, model_dir: Path
) -> None:
    """n = 3: each choice's deltas carry its index, and its tokens are the offline engine's for that choice."""
    token_ids, params = prompt(3, 40), dict(temperature=0.9, seed=11, max_tokens=12, ignore_eos=True, n=3)
    offline = LLMEngine(model_dir, **ENGINE_KWARGS).generate(token_ids, SamplingParams(**params), use_tqdm=False)
    stream = Stream(replica)
    assert submit(replica, [RequestSpec("three", token_ids, params)]) == [None]
    batches: list[StepEvents] = []
    while sum(d.finished for b in batches for d in b.outputs) < 3:
        batches.append(stream.next())
    deltas = deltas_of(batches)["three"]
    by_choice = [tokens_of([d for d in deltas if d.index == i]) for i in range(3)]
    assert by_choice == [choice["token_ids"] for choice in offline]  # type: ignore[index]
    assert len({tuple(tokens) for tokens in by_choice}) == 3


def test_each_batch_carries_every_request_of_its_steps(replica: ReplicaHandle) -> None:
    stream = Stream(replica)
    steps_before = run(replica.health(TIMEOUT_S)).num_steps
    lengths = {f"c{i}": max_tokens for i, max_tokens in enumerate((3, 6, 9, 12))}
    specs = [spec(rid, prompt(10 + i, 20 + 10 * i), n) for i, (rid, n) in enumerate(lengths.items())]
    assert submit(replica, specs) == [None] * 4
    batches = stream.until_finished(list(lengths))
    seqs = [b.seq for b in batches]
    assert seqs == list(range(stream.opening.seq + 1, stream.opening.seq + 1 + len(batches)))
    for batch in batches:
        ids = [d.request_id for d in batch.outputs]
        assert len(ids) == len(set(ids)), "a request appears once per batch"
    deltas = deltas_of(batches)
    assert {rid: len(tokens_of(deltas[rid])) for rid in lengths} == lengths
    steps = run(replica.health(TIMEOUT_S)).num_steps - steps_before
    assert sum(b.num_steps for b in batches) == steps  # every step went into exactly one batch


def test_abort_frees_kv_blocks_at_once(replica: ReplicaHandle) -> None:
    stream = Stream(replica)
    assert submit(replica, [spec("long", prompt(2, 40), 200)]) == [None]
    while "long" not in deltas_of([stream.next()]):
        pass
    assert run(replica.stats(TIMEOUT_S)).engine.num_kv_blocks_used > 0
    replica.abort(["long"])
    last = deltas_of(stream.until_finished(["long"]))["long"][-1]
    assert (last.finished, last.finish_reason) == (True, "abort")
    engine_stats = run(replica.stats(TIMEOUT_S)).engine
    assert (engine_stats.num_kv_blocks_used, engine_stats.num_running, engine_stats.num_waiting) == (0, 0, 0)


def test_snapshot_plus_later_events_equals_a_later_snapshot(replica: ReplicaHandle) -> None:
    """The router's view: a snapshot taken mid-run, plus every later batch, is exact (evictions included)."""
    stream = Stream(replica)
    rounds = [[spec(f"kv{r}{i}", prompt(100 + 10 * r + i, 100), 20) for i in range(3)] for r in range(2)]
    assert submit(replica, rounds[0]) == [None] * 3
    batches = [stream.next()]
    snapshot = run(replica.kv_snapshot(TIMEOUT_S))
    assert submit(replica, rounds[1]) == [None] * 3
    batches += stream.until_finished([s.request_id for r in rounds for s in r])
    view = set(snapshot.block_hashes)
    for batch in batches:
        if batch.seq > snapshot.seq:
            view.update(batch.kv_stored)
            view.difference_update(batch.kv_evicted)
    later = run(replica.kv_snapshot(TIMEOUT_S))
    assert later.seq == batches[-1].seq and later.epoch == snapshot.epoch
    assert view == set(later.block_hashes)
    assert any(b.kv_evicted for b in batches if b.seq > snapshot.seq), "the cache should have been too small"


def test_a_bad_request_fails_alone(replica: ReplicaHandle) -> None:
    stream = Stream(replica)
    good = prompt(3, 10)
    errors = submit(replica, [
        spec("ok1", good, 2),
        spec("bad-token", good[:3] + [VOCAB] + good[4:], 2),
        spec("bad-param", good, 2, temperature=-1.0),
        spec("ok1", good, 2),  # its id is in use
        spec("ok2", good, 2),
    ])
    assert errors[0] is None and errors[4] is None
    for error, field in zip(errors[1:4], ("prompt", "temperature", "request_id")):
        assert error is not None and error.code == "invalid_argument" and error.message.startswith(field), error
    stream.until_finished(["ok1", "ok2"])


def test_a_full_queue_refuses_with_its_own_code(replica: ReplicaHandle) -> None:
    stream = Stream(replica)
    specs = [spec(f"q{i}", prompt(20 + i, 10), 2) for i in range(MAX_QUEUED + 2)]
    errors = submit(replica, specs)
    assert errors[:MAX_QUEUED] == [None] * MAX_QUEUED
    for error in errors[MAX_QUEUED:]:
        assert error is not None and error.code == "resource_exhausted" and "queue full" in error.message
    stream.until_finished([s.request_id for s in specs[:MAX_QUEUED]])


def test_a_submit_is_word_from_the_router(ray_cluster: None) -> None:
    """A router starts its health checks once a replica serves, so its first requests may come before any: they
    are no orphans. Before, a replica whose engine took longer to load than the orphan timeout aborted them
    (the query-of-death CLI test's innocent streams, moved to a replica just restarted, ended with "abort")."""
    orphan_timeout_s = 3.0
    replica = ReplicaHandle.start(f"silent-{uuid.uuid4().hex[:8]}", None, ENGINE_KWARGS,  # the embedded model:
                                  orphan_timeout_s=orphan_timeout_s)  # slow enough that 240 tokens take seconds
    try:
        run(replica.describe(TIMEOUT_S))
        time.sleep(orphan_timeout_s + 0.5)  # idle and unchecked for longer than the timeout: nothing to abort
        stream = Stream(replica)
        assert submit(replica, [spec("first", prompt(7, 10), 240)]) == [None]
        next_check = time.monotonic() + 1.5  # as a router's first check comes a health interval after it serves
        finished: list[RequestDelta] = []
        while not finished:
            finished = [d for d in stream.next().outputs if d.finished]
            if time.monotonic() > next_check:
                run(replica.health(TIMEOUT_S))
                next_check = time.monotonic() + 0.5
        assert [d.finish_reason for d in finished] == ["length"]
    finally:
        run(replica.kill())


def test_a_detached_named_replica_is_found_again_stopped_and_killed(ray_cluster: None, model_dir: Path) -> None:
    name = f"detached-{uuid.uuid4().hex[:8]}"
    started = ReplicaHandle.start(name, model_dir, ENGINE_KWARGS)
    found = ReplicaHandle.find(name)
    assert found is not None
    assert run(found.health(TIMEOUT_S)).epoch == run(started.health(TIMEOUT_S)).epoch
    run(found.run(lambda replica: replica.shutdown(), TIMEOUT_S))
    assert run(found.health(TIMEOUT_S)).state == "stopped"
    (error,) = submit(found, [spec("late", prompt(4, 10), 2)])
    assert error is not None and error.code == "unavailable"
    run(found.kill())  # returns once the name is free
    assert ReplicaHandle.find(name) is None


def test_a_draining_replica_refuses_new_requests_finishes_its_own_then_exits(
    ray_cluster: None, model_dir: Path
) -> None:
    name = f"drain-{uuid.uuid4().hex[:8]}"
    replica = ReplicaHandle.start(name, model_dir, ENGINE_KWARGS)
    stream = Stream(replica)
    assert submit(replica, [spec("running", prompt(5, 10), 30)]) == [None]
    run(replica.run(lambda r: r.drain(), TIMEOUT_S))  # returns at once; the drain goes on in the actor
    health = run(replica.health(TIMEOUT_S))
    assert health.draining and health.state == "running"
    (error,) = submit(replica, [spec("late", prompt(6, 10), 2)])
    assert error is not None and error.code == "unavailable" and "draining" in error.message
    [finished] = [d for b in stream.until_finished(["running"]) for d in b.outputs if d.finished]
    assert finished.finish_reason == "length"  # ran to its end: a drain does not abort
    deadline = time.monotonic() + TIMEOUT_S
    while ReplicaHandle.find(name) is not None:  # then the actor exits on its own and frees its name
        assert time.monotonic() < deadline, f"drained replica {name} still registered"
        time.sleep(0.1)
