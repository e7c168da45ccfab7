"""Routing policies: each rule, the spread of cold requests, the imbalance fallback, and a shared-prefix workload."""

from __future__ import annotations

import random
from collections import OrderedDict, deque

import pytest

from engine.block_hash import hash_blocks
from router.kv_view import KVView
from router.policies import (
    POLICY_NAMES,
    Candidate,
    LeastLoadPolicy,
    PrefixAwarePolicy,
    RoundRobinPolicy,
    RoutingPolicy,
    make_policy,
)
from worker.messages import KVSnapshot, StepEvents


def cand(name: str, load: int = 0, inflight: int = 0, cached: int = 0) -> Candidate:
    return Candidate(name, load_tokens=load, num_inflight=inflight, cached_prefix_blocks=cached)


def names_chosen(policy: RoutingPolicy, candidates: list[Candidate], times: int) -> list[str]:
    return [policy.choose(candidates, 8).name for _ in range(times)]


def test_round_robin_cycles_in_name_order() -> None:
    assert names_chosen(RoundRobinPolicy(), [cand("b"), cand("c", load=99), cand("a")], 4) == ["a", "b", "c", "a"]


def test_round_robin_keeps_going_when_a_replica_leaves_or_joins() -> None:
    policy = RoundRobinPolicy()
    assert names_chosen(policy, [cand("a"), cand("b"), cand("c")], 2) == ["a", "b"]
    assert names_chosen(policy, [cand("a"), cand("c")], 2) == ["a", "c"]
    assert names_chosen(policy, [cand("a"), cand("b"), cand("c"), cand("d")], 4) == ["a", "b", "c", "d"]


def test_least_load_breaks_ties_by_inflight_then_in_turn() -> None:
    policy = LeastLoadPolicy()
    assert policy.choose([cand("a", load=50), cand("b", load=10, cached=8)], 8).name == "b"
    assert policy.choose([cand("a", load=10, inflight=3), cand("b", load=10, inflight=1)], 8).name == "b"
    # Exact ties rotate in name order: an idle cluster spreads requests instead of piling them on one replica.
    assert names_chosen(policy, [cand("c", load=10), cand("b", load=10), cand("a", load=10)], 6) == ["a", "b", "c"] * 2
    assert names_chosen(policy, [cand("a", load=10), cand("b", load=10), cand("c", load=9)], 2) == ["c", "c"]


def test_prefix_prefers_the_longest_cached_prefix_at_equal_load() -> None:
    candidates = [cand("a", load=100, cached=2), cand("b", load=100, cached=7), cand("c", load=100)]
    assert names_chosen(PrefixAwarePolicy(), candidates, 3) == ["b", "b", "b"]


def test_prefix_accepts_more_load_within_the_bound() -> None:
    policy = PrefixAwarePolicy(imbalance_ratio=1.5, imbalance_slack_tokens=100)
    # Bound: 1.5 * 1000 + 100 = 1600.
    assert policy.choose([cand("a", load=1000), cand("b", load=1600, cached=1)], 8).name == "b"
    assert policy.choose([cand("a", load=1000), cand("b", load=1601, cached=8)], 8).name == "a"


def test_prefix_balances_on_load_alone_when_loads_are_too_uneven() -> None:
    policy = PrefixAwarePolicy()
    holder = cand("a", load=20_000, cached=100)  # bound: 1.5 * 2000 + 4096 = 7096
    assert policy.choose([holder, cand("b", load=3000, inflight=2), cand("c", load=2000, inflight=5)], 8).name == "c"


def test_prefix_skips_an_overloaded_holder_for_an_eligible_one_with_less_cache() -> None:
    policy = PrefixAwarePolicy()
    candidates = [cand("a", load=20_000, cached=100), cand("b", load=1000, cached=60), cand("c")]
    assert policy.choose(candidates, 100).name == "b"


def test_prefix_with_no_cache_anywhere_is_least_load() -> None:
    candidates = [cand("a", load=900), cand("b", load=300, inflight=4), cand("c", load=300, inflight=2)]
    assert PrefixAwarePolicy().choose(candidates, 8).name == "c"


def test_prefix_spreads_cold_requests_at_equal_load() -> None:
    candidates = [cand("r2"), cand("r0"), cand("r1"), cand("r3")]
    assert names_chosen(PrefixAwarePolicy(), candidates, 8) == ["r0", "r1", "r2", "r3"] * 2


def test_prefix_rejects_bad_knobs() -> None:
    with pytest.raises(ValueError, match="imbalance_ratio"):
        PrefixAwarePolicy(imbalance_ratio=0.5)
    with pytest.raises(ValueError, match="imbalance_slack_tokens"):
        PrefixAwarePolicy(imbalance_slack_tokens=-1)


def test_policies_by_name() -> None:
    assert POLICY_NAMES[0] == "prefix"
    assert set(POLICY_NAMES) == {"prefix", "least-load", "round-robin"}
    for name in POLICY_NAMES:
        assert make_policy(name).name == name
    assert make_policy("round-robin") is not make_policy("round-robin")
    policy = make_policy("prefix", imbalance_ratio=2.0, imbalance_slack_tokens=10)
    assert isinstance(policy, PrefixAwarePolicy)
    assert (policy.imbalance_ratio, policy.imbalance_slack_tokens) == (2.0, 10)
    # Bound 2 * 100 + 10 = 210: the holder at 210 is eligible, at 211 not.
    assert policy.choose([cand("a", load=100), cand("b", load=210, cached=1)], 8).name == "b"
    assert policy.choose([cand("a", load=100), cand("b", load=211, cached=1)], 8).name == "a"


def test_an_unknown_policy_names_the_field_and_the_choices() -> None:
    with pytest.raises(ValueError, match=r"policy: .*'fastest'.*prefix, least-load, round-robin"):
        make_policy("fastest")


class LRUReplica:
    """A replica's prefix cache of `capacity_blocks`, least-recently-used out, seen by the router via a KVView."""

    def __init__(self, name: str, capacity_blocks: int) -> None:
        self.name, self.capacity_blocks = name, capacity_blocks
        self.blocks: OrderedDict[int, None] = OrderedDict()
        self.view = KVView()
        self.view.reset(KVSnapshot(name, "e", 0, []))
        self.load_tokens = self.num_inflight = self.num_requests = 0

    def run(self, prompt_hashes: list[int]) -> None:
        """Serve one prompt: its blocks become most recent, the oldest go, and the router hears of both."""
        for block_hash in prompt_hashes:
            self.blocks[block_hash] = None
            self.blocks.move_to_end(block_hash)
        evicted = [self.blocks.popitem(last=False)[0] for _ in range(len(self.blocks) - self.capacity_blocks)]
        stored = [h for h in prompt_hashes if h in self.blocks]
        assert self.view.apply(StepEvents(self.name, "e", self.view.seq + 1, 1, [], stored, evicted))


def shared_prefix_workload(policy: RoutingPolicy, seed: int = 0) -> tuple[float, list[int]]:
    """32 groups x 16 requests, each a group prefix of 125 blocks + 3 blocks of its own, in random order.

    4 replicas whose caches hold 1024 blocks each: together they fit every prefix once, so hits
    depend on keeping each group on one replica. A request's load lasts for the next 4 arrivals.
    Returns the hit rate (cached blocks / prompt blocks) and the requests each replica got.
    """
    block_size, num_prefix_blocks, num_own_blocks, load_lifetime = 16, 125, 3, 4
    rng = random.Random(seed)
    arrivals = [group for group in range(32) for _ in range(16)]
    rng.shuffle(arrivals)
    replicas = [LRUReplica(f"r{i}", capacity_blocks=1024) for i in range(4)]
    live: deque[tuple[LRUReplica, int]] = deque()
    num_cached_blocks = num_prompt_blocks = 0
    for i, group in enumerate(arrivals):
        prefix = [group * 10_000 + t for t in range(num_prefix_blocks * block_size)]
        own = [1_000_000 + i * 100 + t for t in range(num_own_blocks * block_size)]
        prompt_hashes = hash_blocks(prefix + own, block_size)
        candidates = [
            Candidate(r.name, r.load_tokens, r.num_inflight, r.view.num_cached_prefix_blocks(prompt_hashes))
            for r in replicas
        ]
        chosen = policy.choose(candidates, len(prompt_hashes))
        replica = next(r for r in replicas if r.name == chosen.name)
        num_cached_blocks += chosen.cached_prefix_blocks
        num_prompt_blocks += len(prompt_hashes)
        replica.run(prompt_hashes)
        replica.num_requests += 1
        num_tokens = len(prefix) + len(own)
        replica.load_tokens += num_tokens
        replica.num_inflight += 1
        live.append((replica, num_tokens))
        if len(live) > load_lifetime:
            done, done_tokens = live.popleft()
            done.load_tokens -= done_tokens
            done.num_inflight -= 1
    return num_cached_blocks / num_prompt_blocks, [r.num_requests for r in replicas]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prefix_routing_doubles_the_hit_rate_of_round_robin_and_stays_balanced(seed: int) -> None:
    round_robin_hit_rate, _ = shared_prefix_workload(RoundRobinPolicy(), seed)
    prefix_hit_rate, requests_per_replica = shared_prefix_workload(PrefixAwarePolicy(), seed)
    assert prefix_hit_rate >= 2 * round_robin_hit_rate
    assert max(requests_per_replica) <= 1.5 * sum(requests_per_replica) / len(requests_per_replica)
