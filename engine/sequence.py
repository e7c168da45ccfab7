"""A request's state inside the engine: its tokens, its KV blocks and how far it has been computed."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from llguidance import LLMatcher

    from engine.detokenizer import IncrementalDetokenizer

FinishReason = Literal["stop", "length", "abort"]


class SequenceStatus(enum.Enum):
    HELD = enum.auto()  # not queued yet: a request's later choice, until its prompt is cached (engine/choices.py)
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass(slots=True)
class TokenLogprobs:
    """Log-probability of one sampled token and the top-N alternatives."""

    logprob: float
    top: dict[int, float]


@dataclass(slots=True, eq=False)
class Sequence:
    """One request, or one of its choices (SamplingParams.n). `token_ids` is prompt + output, known ids only;
    `num_pending` more tokens follow them that launched steps are still sampling (steps overlap: see
    engine/step_plan.py). `num_tokens` counts both; the first `num_computed_tokens` have K/V in the cache.

    A step computes tokens `num_computed_tokens : num_computed_tokens + n`; when that reaches `num_tokens` the
    step also samples the next token. A decode is simply n == 1 (its token may be pending: the device takes it
    from the step before), and a preempted request restarts with num_computed_tokens = 0 (recompute).
    """

    request_id: str
    arrival: int
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    seed: int
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int | None = None  # prompt tokens served by the prefix cache, set at first schedule
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hashes of the leading full, computed blocks
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    detokenizer: IncrementalDetokenizer | None = None  # only for requests with stop strings
    stop_text_len: int | None = None  # output text length before a matched stop string
    resumed_tokens: int = 0  # the prompt's last tokens that an earlier attempt generated (a failover)
    num_pending: int = 0  # output tokens sampled by launched steps, not yet read back: they follow token_ids
    matcher: LLMatcher | None = None  # structured output: the grammar's state after the known output tokens
    index: int = 0  # which of its request's choices (SamplingParams.n) this is

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        """The known output ids: all of them once the request has finished."""
        return self.token_ids[self.num_prompt_tokens :]

    def penalty_history(self) -> tuple[list[int], list[int]]:
        """(prompt, output) known token ids as penalties see them (pending ones are added on the device): a
        resumed request's earlier output counts as output, so its continuation is the one an undisturbed run
        would have produced."""
        start = self.num_prompt_tokens - self.resumed_tokens
        return self.token_ids[:start], self.token_ids[start:]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
