"""What a new user does in the first hour with `python -m router` on a small CPU machine, run as a subprocess (with
its own local Ray, or joining the tests' one): a long prompt after the replica sat idle, more replicas than CPUs,
a max_tokens beyond the context, a request that crashes the replicas it runs on."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import grpc
import pytest
import ray

from proto import nanoserve_pb2 as pb
from router.client import Client
from tests.faults import DEADLY_PROMPT, die_on
from worker import ReplicaHandle

ROOT = Path(__file__).resolve().parents[2]
WORDS = ("serving", "replica", "token", "cache", "prefix", "router", "engine", "stream", "block", "kernel", "the", "of",
         "request", "batch", "model", "and", "every", "step")  # 200,000 characters of them are ~34k tokens


class RouterProcess:
    """`python -m router ...` with its log collected; `address` (and `http`) once it listens, within start_s."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, start_s: float = 240.0) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "router", "--port", "0", "--metrics-port", "-1", "--device", "cpu", *args],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "RAY_DEDUP_LOGS": "0", **(env or {})}, start_new_session=True,
        )
        self.log: list[str] = []
        self._printed: queue.Queue[str] = queue.Queue()
        for stream, into in ((self.process.stderr, self.log.append), (self.process.stdout, self._printed.put)):
            threading.Thread(target=_read_lines, args=(stream, into), daemon=True).start()
        lines = [self._next_printed(start_s) for _ in range(2 if "--http-port" in args else 1)]
        assert "listening on" in lines[0], "".join(self.log)
        self.address = "127.0.0.1:" + lines[0].rsplit(":", 1)[1].strip()
        self.http = lines[1].split("http://", 1)[1].strip().replace("0.0.0.0", "127.0.0.1") if len(lines) > 1 else ""

    def _next_printed(self, timeout_s: float) -> str:
        try:
            return self._printed.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError(f"the router printed nothing within {timeout_s:.0f} s:\n{''.join(self.log)}") from None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _read_lines(stream: IO[str] | None, into: Callable[[str], None]) -> None:
    assert stream is not None
    for line in stream:
        into(line)
    stream.close()


@contextmanager
def running_router(args: list[str], env: dict[str, str] | None = None) -> Iterator[RouterProcess]:
    router = RouterProcess(args, env)
    try:
        yield router
    finally:
        router.stop()


def long_text(num_chars: int) -> str:
    rng = random.Random(0)
    text = ""
    while len(text) < num_chars:
        text += " ".join(rng.choice(WORDS) for _ in range(16)) + ". "
    return text[:num_chars]


@pytest.mark.slow
def test_a_200k_character_prompt_after_idle_is_served_and_max_tokens_past_the_context_is_refused() -> None:
    """Before: the health check counted an idle replica's quiet time as a stall, so the first long step after
    idle took the replica down (503), and steps longer than the stall bound killed every replica in turn."""
    stall_timeout_s = 8
    with running_router(["--replicas", "1", "--stall-timeout", str(stall_timeout_s), "--http-port", "0"]) as router, \
            Client(router.address) as client:
        assert client.complete("Hi", timeout=60, max_tokens=2).finish_reason == pb.FINISH_REASON_LENGTH
        threading.Event().wait(stall_timeout_s + 2)  # idle for longer than the stall bound
        answer = client.complete(long_text(200_000), timeout=600, max_tokens=2, temperature=0)
        assert answer.finish_reason == pb.FINISH_REASON_LENGTH and answer.usage.completion_tokens == 2
        assert answer.usage.prompt_tokens > 25_000
        [replica] = client.cluster_status(timeout=10).replicas
        assert replica.num_restarts == 0 and replica.state == pb.REPLICA_STATE_SERVING
        assert not any(" down (" in line for line in router.log), "".join(router.log)

        with pytest.raises(grpc.RpcError) as refused:  # item 5: refused at once, on both front doors
            client.complete("Hi", timeout=60, max_tokens=10**9)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "params.max_tokens: 1000000000 exceeds the" in (refused.value.details() or "")
        body = json.dumps({"prompt": "Hi", "max_tokens": 10**9}).encode()
        request = urllib.request.Request(f"http://{router.http}/completions", body,
                                         {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as http_refused:
            urllib.request.urlopen(request, timeout=60)
        error = json.loads(http_refused.value.read())["error"]
        assert http_refused.value.code == 400 and error["param"] == "max_tokens"
        assert error["message"].startswith("max_tokens: 1000000000 exceeds the")


@pytest.mark.slow
def test_four_replicas_on_two_cpus_all_serve() -> None:
    """Before: each replica took a whole CPU from Ray; two served, two waited for ever, and the ports never
    opened. Ray here has 2 CPUs whatever the machine has (RAY_OVERRIDE_RESOURCES)."""
    with running_router(["--replicas", "4"], env={"RAY_OVERRIDE_RESOURCES": json.dumps({"CPU": 2})}) as router, \
            Client(router.address) as client:
        replicas = client.cluster_status(timeout=10).replicas
        assert [r.state for r in replicas] == [pb.REPLICA_STATE_SERVING] * 4
        assert client.complete("Hi", timeout=60, max_tokens=2).finish_reason == pb.FINISH_REASON_LENGTH
        assert any("placement: 4 replicas share 2 CPUs, 0.5 CPU each" in line for line in router.log)
        assert not any("Token authentication is enabled" in line for line in router.log)  # no warning at start
        # Item 11: the commands the log prints to inspect the router's Ray work as printed.
        inspect = next(line for line in router.log if "Inspect it from a shell with" in line)
        status_command = inspect.split("`")[1]
        assert status_command.startswith("RAY_AUTH_MODE=token RAY_ADDRESS=") and status_command.endswith("ray status")
        ray_bin = str(Path(sys.executable).parent / "ray")
        for command, expected in ((status_command, "/2.0 CPU"), (status_command.replace("ray status",
                                  "ray list actors"), "nanoserve-replica-3")):
            env_part, _, ray_args = command.partition(" ray ")
            env = dict(part.split("=", 1) for part in env_part.split())
            out = subprocess.run([ray_bin, *ray_args.split()], env={**os.environ, **env}, capture_output=True,
                                 text=True, timeout=120)
            assert out.returncode == 0 and expected in out.stdout, out.stderr


@pytest.mark.slow
def test_a_query_of_death_is_stopped_after_two_replicas_while_the_others_stream_on(ray_cluster: None) -> None:
    """Before: the request moved on after each replica it crashed, up to max_failovers_per_request, and took four
    down. The router here joins the tests' Ray (--ray-address), so the test can arm its replicas' fault hook."""
    prefix = f"qod-{uuid.uuid4().hex[:6]}"
    args = ["--replicas", "3", "--ray-address", ray.get_runtime_context().gcs_address, "--replica-prefix", prefix]
    with running_router(args) as router, Client(router.address) as client, ThreadPoolExecutor(6) as streams:
        for i in range(3):
            replica = ReplicaHandle.find(f"{prefix}-{i}")
            assert replica is not None
            asyncio.run(replica.run(die_on(DEADLY_PROMPT[:4]), timeout_s=30))
        others = [streams.submit(client.complete, [5 + i] * 20, timeout=120, max_tokens=60, temperature=0.0,
                                 ignore_eos=True) for i in range(6)]
        with pytest.raises(grpc.RpcError) as stopped:
            client.complete(DEADLY_PROMPT, timeout=120, max_tokens=8, temperature=0.0)
        assert stopped.value.code() == grpc.StatusCode.ABORTED
        assert f"replicas {prefix}-" in (stopped.value.details() or "") and "died while running this request" in (
            stopped.value.details() or "")
        assert all(len(other.result(120).token_ids) == 60 for other in others)
        deadline = time.monotonic() + 120
        while (status := client.cluster_status(timeout=10)).replicas and any(
                r.state != pb.REPLICA_STATE_SERVING for r in status.replicas):
            assert time.monotonic() < deadline, status
            time.sleep(0.5)
        assert sum(r.num_restarts for r in status.replicas) == 2
        assert any("stopped: replicas" in line and "it may be what kills them" in line for line in router.log)
