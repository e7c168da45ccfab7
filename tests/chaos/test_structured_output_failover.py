"""A replica killed mid-stream under requests whose output a grammar holds (a JSON schema, a regex, a Lark
grammar): each moved stream resumes its grammar from the tokens already sent, and equals an undisturbed run."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from engine import LLMEngine, SamplingParams
from router.inflight import InFlightRequest
from router.replica_slot import ReplicaSlot
from tests.chaos.load import (
    Load,
    assert_identical_outputs,
    assert_kv_conserved,
    assert_no_lost_request,
    expected_outputs,
    mixed_requests,
    wait_for,
)
from tests.chaos.test_replica_failures import actor_call, all_serving
from tests.serving import RouterThread, handle_of

# Strings by pattern, so the stop token below ("!", id 0) is never allowed before the output is complete.
SCHEMA = {"type": "object", "properties": {
    "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,6}$"}, "minItems": 3, "maxItems": 8},
    "n": {"type": "integer", "minimum": 0, "maximum": 999}}, "required": ["tags", "n"], "additionalProperties": False}
SPECS = [{"json_schema": SCHEMA}, {"regex": r"([a-c]{2,4}-[0-9]{2,3} ){6,10}"},
         {"grammar": 'start: "[" NUM ("," NUM)* "]"\nNUM: /[0-9]{1,3}/'}]
STOP = 0  # "!": the tiny model's vocabulary lacks Qwen's EOS, so a complete output ends on this stop id


def build_grammar_tables(router: RouterThread) -> None:
    """Each replica's engine compiles a grammar once: its llguidance token tables are built on first use and kept
    (a one-time cost per engine, which the memory check must not count as growth)."""
    for slot in router.router.pool.slots:
        actor_call(router, slot.name, lambda self: self._loop.call(compile_a_grammar))


def compile_a_grammar(engine: LLMEngine) -> None:
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=1, structured_output={"regex": "a"}), "warm-grammar")
    engine.abort("warm-grammar")


def held_mid_way_on(slot: ReplicaSlot) -> list[InFlightRequest]:
    return [r for r in list(slot.inflight.values())
            if r.prepared.params.structured_output is not None and r.num_output_tokens]


def held_mid_way(router: RouterThread) -> bool:
    return any(held_mid_way_on(slot) for slot in router.router.pool.slots)


def test_structured_streams_moved_mid_way_equal_undisturbed_runs(
    start_router: Callable[..., RouterThread], model_dir: Path
) -> None:
    router = start_router(num_replicas=2, policy="least-load", warm=build_grammar_tables)
    requests = mixed_requests(24, seed=7, max_tokens=70)
    for i, request in enumerate(requests[::2]):  # half of them held to a grammar, greedy and sampled alike
        request.params |= dict(structured_output=SPECS[i % len(SPECS)], stop_token_ids=[STOP])
    expected = expected_outputs(model_dir, requests)
    load = Load(router, requests, concurrency=24)
    load.wait_until_streaming(fraction=0.5)
    # The victim is a replica with a held stream mid-way (the busiest one may have none at that moment).
    wait_for(lambda: held_mid_way(router), 30, "a held stream mid-way on a replica")
    victim = max(router.router.pool.slots, key=lambda s: len(held_mid_way_on(s))).name
    [slot] = [s for s in router.router.pool.slots if s.name == victim]
    moved = held_mid_way_on(slot)
    asyncio.run(handle_of(router, victim).kill(wait=False))
    assert moved, "no held stream was mid-way on the killed replica"
    outcomes = load.finish()
    assert_no_lost_request(outcomes)
    assert_identical_outputs(outcomes, expected)
    assert router.router.metrics.failovers._value.get() > 0
    wait_for(lambda: all_serving(router), 60, "the killed replica serving again")
    assert_kv_conserved(router)
