"""A request's n choices (SamplingParams.n): n sequences of one prompt that compute its prefill once.

Choice 0 is queued at once; choices 1.. are held until it has sampled its first token. By then the K/V of the
prompt's full blocks are computed and in the prefix cache (a block's hash is published only once its K/V are
computed, so choices queued together would each prefill the whole prompt in the same step). Released, a choice
is admitted as any request whose prompt is cached: it takes a reference to each of those blocks (a ref count,
no copy) and computes only the prompt's tail after them, into a block of its own: at most block_size tokens, at
least the last one, whose logits sample the choice's first token.

Recomputing the tail rather than copying choice 0's partial last block (copy-on-write) is deliberate: every
choice needs the last prompt token's logits anyway, so a copy would also need one logits row fanned out into n
sampling rows, and a block copy on the device of every rank, to save fewer than block_size tokens per choice.
The tail's K/V and logits are those of choice 0 (a token's logits do not depend on the batch or the cache:
docs/architecture.md). From then on a choice is an ordinary sequence: preempted, it recomputes through the prefix
cache like any other, and shared blocks go back to the cache only when the last choice holding them lets go.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True, eq=False)
class Request:
    """One request id's choices, by index."""

    choices: list[Sequence]
    held: list[Sequence]  # choices not queued yet: until choices[0] has sampled a token
    num_unreported: int  # choices whose final output step() has not returned yet


class Requests:
    """The engine's requests by id, each with its choices; holds back the later choices of a request until its
    prompt is in the prefix cache. A request id is in use until every choice's final output is returned."""

    def __init__(self, scheduler: Scheduler, block_size: int) -> None:
        self._scheduler = scheduler
        self._block_size = block_size
        self._by_id: dict[str, Request] = {}
        self._holding: list[Request] = []

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._by_id

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_id)

    def add(self, choices: list[Sequence]) -> None:
        """Queue a new request's choices: all of them when its prompt has no full block to share, else choice 0
        now and the others once it has sampled (`release_held`)."""
        first = choices[0]
        shares_a_block = (first.num_prompt_tokens - 1) // self._block_size > 0  # the last token is never cached
        request = Request(choices, choices[1:] if shares_a_block else [], len(choices))
        self._by_id[first.request_id] = request
        for seq in request.held:
            seq.status = SequenceStatus.HELD
        if request.held:
            self._holding.append(request)
        for seq in choices[:1] if request.held else choices:
            self._scheduler.add(seq)

    def held(self) -> list[Sequence]:
        """The choices held back now: waiting, as far as the replica's load and queue limits are concerned."""
        return [seq for request in self._holding for seq in request.held]

    def release_held(self) -> None:
        """Queue the held choices of each request whose choice 0 has sampled a token (so its prompt's full blocks
        are cached), ahead of the waiting requests: they belong to one already running."""
        for request in [r for r in self._holding if r.choices[0].output_token_ids]:
            for seq in request.held:
                seq.num_cached_tokens = request.choices[0].num_cached_tokens  # the prompt's cache hit, counted once
            self._scheduler.add_ahead(request.held)
            request.held = []
            self._holding.remove(request)

    def abort(self, request_id: str) -> list[Sequence]:
        """The unfinished choices of `request_id` (none if unknown), for the caller to finish; held ones are let
        go (they own no block)."""
        request = self._by_id.get(request_id)
        if request is None:
            return []
        if request.held:
            request.held = []
            self._holding.remove(request)
        return [seq for seq in request.choices if not seq.is_finished]

    def report_final(self, seq: Sequence) -> None:
        """`seq`'s final output is being returned: forget its request once every choice's has been."""
        request = self._by_id[seq.request_id]
        request.num_unreported -= 1
        if request.num_unreported == 0:
            del self._by_id[seq.request_id]
