"""Scenario 10: clients that read slower than their requests generate, or stop reading, under a steady load.

The router holds a bounded amount for each (it pauses the request, freeing its replica's blocks, and resumes
it when the client catches up, with the output an undisturbed run gives), ends a stream whose client took
nothing for the stalled-stream timeout, and the other clients see nothing of it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from proto import nanoserve_pb2_grpc as pb_grpc
from router.client import build_request
from tests.chaos.load import (
    Load,
    Outcome,
    Request,
    assert_identical_outputs,
    assert_kv_conserved,
    assert_no_lost_request,
    expected_outputs,
    mixed_requests,
    wait_for,
)
from tests.serving import RouterThread

# A client channel whose HTTP/2 receive window stays ~1 KB (no BDP growth): gRPC's flow control then pushes
# back after a few chunks, so the router's own buffer is what a slow reader fills (as with a real client
# that stops reading after gRPC filled its window of up to a few MB).
SMALL_WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
MAX_BUFFER_TOKENS = 32
STALL_TIMEOUT_S = 6.0


def read_slowly(channel: grpc.Channel, request: Request, request_id: str, outcome: Outcome,
                seconds_per_chunk: float) -> None:
    """Stream the request, taking one chunk every `seconds_per_chunk`."""
    call = pb_grpc.NanoServeStub(channel).Generate(build_request(request.prompt, request_id, request.params),
                                                   timeout=120)
    try:
        for chunk in call:
            outcome.token_ids += chunk.token_ids
            time.sleep(seconds_per_chunk)
        outcome.code = grpc.StatusCode.OK
    except grpc.RpcError as e:
        outcome.code, outcome.details = e.code(), e.details() or ""
    outcome.num_terminal += 1


def test_slow_and_stalled_clients_are_bounded_and_the_rest_unaffected(
    start_router: Callable[..., RouterThread], model_dir: Path
) -> None:
    router = start_router(num_replicas=2, policy="least-load", max_stream_buffer_tokens=MAX_BUFFER_TOKENS,
                          stalled_stream_timeout_s=STALL_TIMEOUT_S)
    slow_clients = router.router.metrics.slow_clients
    count = lambda event: slow_clients.labels(event)._value.get()  # noqa: E731
    stalled = Request(list(range(1, 21)), dict(max_tokens=400, temperature=0.0, ignore_eos=True))
    slow = Request(list(range(30, 50)), dict(max_tokens=200, temperature=0.8, top_p=0.95, seed=5, ignore_eos=True))
    load = mixed_requests(32, seed=12, max_tokens=40)
    [stalled_expected, slow_expected, *load_expected] = expected_outputs(model_dir, [stalled, slow, *load])

    # A client that takes one chunk, then nothing: its request is paused, its replica's blocks freed at once.
    stalled_channel = grpc.insecure_channel(router.address, options=SMALL_WINDOW)
    stalled_call = pb_grpc.NanoServeStub(stalled_channel).Generate(
        build_request(stalled.prompt, "stalled-client", stalled.params), timeout=120)
    stalled_tokens = list(next(stalled_call).token_ids)
    wait_for(lambda: count("paused") >= 1, 30, "the stalled client's request paused")
    pool = router.router.pool
    assert not any(key.startswith("stalled-client#") for slot in pool.slots for key in slot.inflight)
    [held] = [r for r in router.router.core.streaming() if r.request_id == "stalled-client"]
    assert held.num_pending_tokens <= 2 * MAX_BUFFER_TOKENS  # the bound, plus at most the delta that crossed it
    assert_kv_conserved(router, timeout_s=5)  # nothing left on the replicas, while the client still holds on

    # A client that keeps reading, slowly, beside 32 ordinary ones: paused and resumed, output exact.
    slow_outcome = Outcome()
    slow_channel = grpc.insecure_channel(router.address, options=SMALL_WINDOW)
    slow_reader = threading.Thread(target=read_slowly, args=(slow_channel, slow, "slow-client", slow_outcome, 0.05))
    slow_reader.start()
    outcomes = Load(router, load, concurrency=32).finish()
    slow_reader.join(120)
    assert_no_lost_request([*outcomes, slow_outcome])
    assert_identical_outputs([*outcomes, slow_outcome], [*load_expected, slow_expected])
    assert count("resumed") >= 1

    # The stalled stream was ended after the timeout; reading it now gives its tokens so far, then the status.
    wait_for(lambda: count("ended") == 1, 30, "the stalled stream ended")
    assert router.router.metrics.requests.labels("RESOURCE_EXHAUSTED")._value.get() == 1
    try:
        for chunk in stalled_call:
            stalled_tokens += chunk.token_ids
        raise AssertionError("the stalled stream ended without an error")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "stalled_stream_timeout_s" in (e.details() or "")
    assert stalled_tokens == stalled_expected[: len(stalled_tokens)] and 0 < len(stalled_tokens) < 400
    assert not router.router.core.streaming()
    assert_kv_conserved(router)
    stalled_channel.close()
    slow_channel.close()
