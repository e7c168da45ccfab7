"""Scenario 6: the router process is SIGKILLed with streams in flight; a new one takes over."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import ray

from router.client import Client
from router.config import RouterConfig
from tests.chaos.load import Load, assert_no_lost_request, mixed_requests, wait_for
from worker import ReplicaHandle

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "chaos-router"


def start_router_process(model_dir: Path) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "router", "--replicas", "2", "--model", str(model_dir), "--port", "0",
         "--metrics-port", "-1", "--device", "cpu", "--dtype", "float32", "--num-kv-blocks", "128",
         "--max-model-len", "512", "--ray-address", ray.get_runtime_context().gcs_address,
         "--replica-prefix", PREFIX],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    assert "listening on" in line, process.stderr.read() if process.poll() is not None else line
    return process, "127.0.0.1:" + line.rsplit(":", 1)[1].strip()


class _Address:
    def __init__(self, address: str) -> None:
        self.address = address


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # drains, then stops the replicas
            process.wait(60)


def test_router_killed_then_replaced(ray_cluster: None, model_dir: Path,
                                     processes: list[subprocess.Popen[str]]) -> None:
    first, address = start_router_process(model_dir)
    processes.append(first)
    replicas = [ReplicaHandle.find(f"{PREFIX}-{i}") for i in range(2)]
    assert None not in replicas
    epochs = [asyncio.run(r.health(timeout_s=30)).epoch for r in replicas]  # type: ignore[union-attr]
    load = Load(_Address(address), mixed_requests(16, seed=6, max_tokens=400), concurrency=16)  # type: ignore[arg-type]
    load.wait_until_streaming()
    os.kill(first.pid, signal.SIGKILL)
    outcomes = load.finish()
    assert_no_lost_request([o for o in outcomes if o.code != grpc.StatusCode.OK],
                           allowed=frozenset({grpc.StatusCode.UNAVAILABLE}))
    assert any(o.code == grpc.StatusCode.UNAVAILABLE for o in outcomes)

    def quiet() -> bool:  # the replicas abort the orphaned requests on their own (no router heartbeat)
        stats = [asyncio.run(r.stats(timeout_s=10)).engine for r in replicas]  # type: ignore[union-attr]
        return all(s.num_running == s.num_waiting == s.num_kv_blocks_used == 0 for s in stats)

    orphan_timeout_s = RouterConfig().replica_orphan_timeout_s  # the router process runs with the defaults
    wait_for(quiet, orphan_timeout_s + 10, "replicas aborting the dead router's requests")
    second, address = start_router_process(model_dir)
    processes.append(second)
    assert [asyncio.run(r.health(timeout_s=30)).epoch for r in replicas] == epochs  # type: ignore[union-attr]
    started = time.monotonic()
    with Client(address) as client:
        assert len(client.complete([1, 2, 3], timeout=30, max_tokens=4, ignore_eos=True).token_ids) == 4
    assert time.monotonic() - started < 10
