"""Test harness for the serving layer: a real router (in-process, on its own event-loop thread) over real Ray
replicas of a tiny model. Packages that use it import its fixtures into their conftest.py."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import ray

from engine import LLMEngine
from proto import nanoserve_pb2 as pb
from router.client import Client
from router.config import RouterConfig
from router.inflight import InFlightRequest
from router.server import Router
from worker.handle import ReplicaHandle

T = TypeVar("T")
VOCAB = 1024  # the tiny checkpoint's vocabulary
# The replicas run on the CPU in CI, in fp32; NANOSERVE_TEST_DEVICE=cuda runs the same serving and chaos tests
# on GPUs (one a replica, or shares of one), in bf16 through CUDA graphs and in the batch-invariant mode, as
# users serve. NANOSERVE_TEST_BATCH_INVARIANT=0 turns the mode off there: the identity checks' negative control.
DEVICE = os.environ.get("NANOSERVE_TEST_DEVICE", "cpu")
BATCH_INVARIANT = DEVICE != "cpu" and os.environ.get("NANOSERVE_TEST_BATCH_INVARIANT", "1") != "0"
ENGINE_KWARGS: dict[str, Any] = dict(device=DEVICE, dtype="float32" if DEVICE == "cpu" else "bfloat16",
                                     batch_invariant=BATCH_INVARIANT, num_kv_blocks=128, max_model_len=512)


class RouterThread:
    """Runs a Router on a background asyncio loop; tests talk to it over gRPC or through `call`."""

    def __init__(self, config: RouterConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.router = Router(config)
        self.call(self.router.start())
        self.address = f"127.0.0.1:{self.router.port}"

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def stop(self) -> None:
        if not self.thread.is_alive():
            return
        self.call(self.router.stop(kill_replicas=True))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def client(self) -> Client:
        return Client(self.address)

    def status(self) -> pb.ClusterStatus:
        with self.client() as c:
            return c.cluster_status(timeout=10)

    def wait_for(self, condition: Callable[[pb.ClusterStatus], bool], timeout: float = 60.0) -> pb.ClusterStatus:
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if condition(status):
                return status
            assert time.monotonic() < deadline, f"cluster never reached the condition: {status}"
            time.sleep(0.2)


def handle_of(router: RouterThread, name: str) -> ReplicaHandle:
    """The handle of the replica actor behind the router's replica of that name now."""
    [handle] = [slot.handle for slot in router.router.pool.slots if slot.name == name]
    assert handle is not None, f"{name} has no actor now"
    return handle


def serving_handles(router: RouterThread) -> dict[str, ReplicaHandle]:
    """The handles of the replicas the router serves from now, by name."""
    return {slot.name: slot.handle for slot in router.router.pool.slots
            if slot.state == "serving" and slot.handle is not None}


@pytest.fixture(scope="package")
def ray_cluster() -> Iterator[None]:
    """One local Ray for all router tests (starting Ray takes seconds)."""
    # Logical CPUs: each replica actor takes one while it lives, and the tests run several routers.
    ray.init(num_cpus=16, include_dashboard=False, namespace="nanoserve-test", logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="package")
def model_dir(tiny_checkpoint: Callable[..., Path]) -> Path:
    return tiny_checkpoint("tied-gqa2-hd16", vocab_size=VOCAB)


@pytest.fixture(scope="module")
def offline(model_dir: Path) -> LLMEngine:
    """An engine like the replicas', in this process: what an undisturbed run generates."""
    return LLMEngine(model_dir, **ENGINE_KWARGS)


def prompt(seed: int, n: int) -> list[int]:
    """n random token ids of the tiny vocabulary, the same for the same seed."""
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(n)]


@contextlib.contextmanager
def router_factory(model_dir: Path) -> Iterator[Callable[..., RouterThread]]:
    """start(num_replicas=2, policy="prefix", **config) -> a running router; all stopped on exit, so their
    replicas (a CPU and ~0.5 GB each) do not pile up across tests."""
    routers: list[RouterThread] = []

    def start(num_replicas: int = 2, policy: str = "prefix", **overrides: Any) -> RouterThread:
        config = RouterConfig(
            num_replicas=num_replicas, model=overrides.pop("model", str(model_dir)),
            engine_kwargs=overrides.pop("engine_kwargs", dict(ENGINE_KWARGS)), policy=policy,
            batch_invariant=overrides.pop("batch_invariant", BATCH_INVARIANT), host="127.0.0.1", port=0,
            metrics_port=overrides.pop("metrics_port", None), namespace="nanoserve-test",
            replica_prefix=overrides.pop("replica_prefix", f"test-{uuid.uuid4().hex[:6]}"), **overrides,
        )
        routers.append(RouterThread(config))
        return routers[-1]

    try:
        yield start
    finally:
        for router in routers:
            router.stop()


@pytest.fixture
def start_router(ray_cluster: None, model_dir: Path) -> Iterator[Callable[..., RouterThread]]:
    """Routers for one test, stopped when it ends."""
    with router_factory(model_dir) as start:
        yield start


@pytest.fixture(scope="module")
def start_module_router(ray_cluster: None, model_dir: Path) -> Iterator[Callable[..., RouterThread]]:
    """Routers shared by a module's tests, stopped when the module ends."""
    with router_factory(model_dir) as start:
        yield start


def kill_mid_stream(
    router: RouterThread, requests: list[tuple[list[int], dict[str, Any]]],
    has_begun: Callable[[list[pb.GenerateResponse]], bool],
) -> tuple[list[list[pb.GenerateResponse]], list[InFlightRequest]]:
    """Stream each (prompt, params) from its own thread; once `has_begun(its chunks so far)` holds for every
    stream, kill the router's first replica, and let the streams finish (none may fail). Each stream's chunks, and
    the requests the killed replica was running then."""
    streams: list[list[pb.GenerateResponse]] = [[] for _ in requests]
    started = [threading.Event() for _ in requests]
    errors: list[BaseException] = []

    def stream(i: int) -> None:
        token_ids, params = requests[i]
        try:
            with router.client() as client:
                for chunk in client.generate(token_ids, timeout=120, **params):
                    streams[i].append(chunk)
                    if has_begun(streams[i]):
                        started[i].set()
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for event in started:
        assert event.wait(60)
    victim = router.status().replicas[0].name
    [slot] = [s for s in router.router.pool.slots if s.name == victim]
    running = list(slot.inflight.values())
    asyncio.run(handle_of(router, victim).kill(wait=False))
    for t in threads:
        t.join(120)
    assert not errors, errors
    return streams, running


def greedy(max_tokens: int, **params: Any) -> dict[str, Any]:
    """Sampling kwargs of a greedy request that runs to max_tokens."""
    return dict(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **params)


def served_services(address: str) -> set[str]:
    """Check grpc.health.v1 says SERVING (overall and for NanoServe) with no credentials; return the
    service names server reflection lists."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "nanoserve.v1.NanoServe"):
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        [answer] = list(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        return {s.name for s in answer.list_services_response.service}
