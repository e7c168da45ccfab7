"""Routing policies: which healthy replica gets a request, each named for the command line."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Candidate:
    """One healthy replica as a policy sees it for one request."""

    name: str  # replica name
    load_tokens: int  # tokens queued + running on it (the router's live estimate)
    num_inflight: int  # requests the router has in flight on it
    cached_prefix_blocks: int  # leading prompt blocks it holds (from its KVView)


class RoutingPolicy(Protocol):
    """Picks a replica from a non-empty list of healthy candidates (the caller handles none)."""

    name: str

    def choose(self, candidates: Sequence[Candidate], num_prompt_blocks: int) -> Candidate:
        """The candidate that gets a request whose prompt has `num_prompt_blocks` full blocks."""
        ...


class RoundRobinPolicy:
    """Each request to the next replica in name order, blind to load and cache: the baseline.

    Indexing the sorted names with a counter keeps the rotation going when replicas join or leave.
    """

    name = "round-robin"

    def __init__(self) -> None:
        self._num_chosen = 0

    def choose(self, candidates: Sequence[Candidate], num_prompt_blocks: int) -> Candidate:
        """The next candidate in name order."""
        ordered = sorted(candidates, key=lambda c: c.name)
        chosen = ordered[self._num_chosen % len(ordered)]
        self._num_chosen += 1
        return chosen


class LeastLoadPolicy:
    """The fewest tokens queued + running, then the fewest in-flight requests; exact ties rotate in name order
    (an idle cluster would otherwise send every request to the same replica)."""

    name = "least-load"

    def __init__(self) -> None:
        self._ties = TieBreaker()

    def choose(self, candidates: Sequence[Candidate], num_prompt_blocks: int) -> Candidate:
        """The least-loaded candidate."""
        return self._ties.best(candidates, key=lambda c: (c.load_tokens, c.num_inflight))


class PrefixAwarePolicy:
    """The longest cached prefix among the replicas whose load is within a bound of the least load.

    Eligible: load_tokens <= imbalance_ratio * (least load) + imbalance_slack_tokens, so the
    least-loaded replica always is. Among the eligible, most cached leading blocks wins, then less
    load, then fewer in-flight requests; exact ties rotate in name order, so cold requests at equal
    load (each prefix group's first) spread over the replicas instead of all landing on one. A
    replica holding the prefix but loaded past the bound is skipped: with loads that uneven, load
    wins over affinity, and with no cache on the eligible ones the choice is plain least load.
    """

    name = "prefix"

    def __init__(self, imbalance_ratio: float = 1.5, imbalance_slack_tokens: int = 4096) -> None:
        if imbalance_ratio < 1:
            raise ValueError(f"imbalance_ratio: must be >= 1, got {imbalance_ratio}")
        if imbalance_slack_tokens < 0:
            raise ValueError(f"imbalance_slack_tokens: must be >= 0, got {imbalance_slack_tokens}")
        self.imbalance_ratio = imbalance_ratio
        self.imbalance_slack_tokens = imbalance_slack_tokens
        self._ties = TieBreaker()

    def choose(self, candidates: Sequence[Candidate], num_prompt_blocks: int) -> Candidate:
        """The eligible candidate with the longest cached prefix (see the class docstring)."""
        bound = self.imbalance_ratio * min(c.load_tokens for c in candidates) + self.imbalance_slack_tokens
        eligible = [c for c in candidates if c.load_tokens <= bound]
        return self._ties.best(eligible, key=_prefix_rank)


def _prefix_rank(candidate: Candidate) -> tuple[int, int, int]:
    """Sort key of `PrefixAwarePolicy`: smaller is better."""
    return -candidate.cached_prefix_blocks, candidate.load_tokens, candidate.num_inflight


class TieBreaker:
    """Picks the candidate with the smallest key; among exact ties, the next one in name order each time."""

    def __init__(self) -> None:
        self._num_tie_breaks = 0

    def best(self, candidates: Sequence[Candidate], key: Callable[[Candidate], tuple[int, ...]]) -> Candidate:
        """The candidate with the smallest key (candidates is not empty)."""
        smallest = min(map(key, candidates))
        ties = sorted((c for c in candidates if key(c) == smallest), key=lambda c: c.name)
        if len(ties) == 1:
            return ties[0]
        chosen = ties[self._num_tie_breaks % len(ties)]
        self._num_tie_breaks += 1
        return chosen


POLICIES: dict[str, Callable[[], RoutingPolicy]] = {
    PrefixAwarePolicy.name: PrefixAwarePolicy,  # the default
    LeastLoadPolicy.name: LeastLoadPolicy,
    RoundRobinPolicy.name: RoundRobinPolicy,
}
POLICY_NAMES = tuple(POLICIES)  # for the command line's `choices`


def make_policy(name: str, imbalance_ratio: float = 1.5, imbalance_slack_tokens: int = 4096) -> RoutingPolicy:
    """A fresh policy by its command-line name (the imbalance bound is the prefix policy's; see its docstring);
    ValueError naming the field `policy` for an unknown one."""
    if name == PrefixAwarePolicy.name:
        return PrefixAwarePolicy(imbalance_ratio, imbalance_slack_tokens)
    factory = POLICIES.get(name)
    if factory is None:
        raise ValueError(f"policy: unknown routing policy {name!r}; expected one of {', '.join(POLICY_NAMES)}")
    return factory()
