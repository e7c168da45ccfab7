"""Per-request sampling and stopping parameters (pure Python: the router imports it too)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

from engine.invalid_request import InvalidRequest
from engine.structured_output import StructuredOutput

GREEDY_BELOW_TEMPERATURE = 1e-5
MAX_N = 128  # choices per request: OpenAI's bound (vLLM sets none)
_CHOICE_SEED_STEP = 0x9E3779B97F4A7C15  # 2**64 / golden ratio, splitmix64's increment


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request samples and when it stops. Every field is checked in `__post_init__` (InvalidRequest).

    temperature 0 (below 1e-5) is greedy. Penalties apply first, to the raw logits, as in vLLM:
    `repetition_penalty` (> 0, 1 = off) divides the positive logits of tokens seen in the prompt or
    output and multiplies the negative ones; `frequency_penalty` (in [-2, 2]) is subtracted once per
    occurrence of a token in the output, `presence_penalty` (in [-2, 2]) once if it occurs there at
    all. Then `logit_bias` ({token id: bias in [-100, 100]}, OpenAI's) is added to the logits, and
    `allowed_token_ids` (vLLM's; None: every token) leaves only those tokens possible. Masks apply in the order
    top-k, top-p, min-p, on the temperature-scaled distribution.
    `seed` keys the random stream by (seed, token position), so re-running a request from any
    position reproduces the same tokens.
    `logprobs=N` returns the chosen token's log-probability and the top N of the model's
    (unscaled) distribution.
    `structured_output` (a StructuredOutput, or a mapping of its fields such as {"json_schema": {...}}) leaves
    possible only the tokens that keep the output a prefix of its language, and EOS (or a stop id) once the
    output is complete, applied with allowed_token_ids. The grammar decides where the output ends, so it does
    not combine with min_tokens.
    `n` (in [1, 128]) asks for n completions (choices) of the prompt, which share its prefill (engine/choices.py).
    Choice i samples with its own seed, choice_seed(seed, i) = (seed + i * 0x9E3779B97F4A7C15) mod 2**63: choice 0
    is the same request with n = 1, `for_choice(i)` runs choice i alone to the same tokens (what a failover
    resubmits), and the golden-ratio step keeps requests seeded 1, 2, 3 from sharing choices (seed + i would
    not). An unseeded request draws one random seed for all its choices. Each choice stops on its own and has
    its own grammar matcher.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    max_tokens: int = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs by id; a mapping is accepted too
    allowed_token_ids: tuple[int, ...] | None = None
    structured_output: StructuredOutput | None = None
    n: int = 1

    def __post_init__(self) -> None:
        # Normalise list/str inputs so the dataclass stays hashable and immutable.
        if self.stop is None:
            object.__setattr__(self, "stop", ())
        elif isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        if self.allowed_token_ids is not None:
            object.__setattr__(self, "allowed_token_ids", tuple(self.allowed_token_ids))
        if self.structured_output is not None:
            object.__setattr__(self, "structured_output", StructuredOutput.from_value(self.structured_output))
        self._validate()

    def _validate(self) -> None:
        _check_number("temperature", self.temperature)
        if self.temperature < 0:
            raise InvalidRequest("temperature", f"must be >= 0 (0 is greedy), got {self.temperature}")
        _check_number("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest("top_p", f"must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k)
        if self.top_k == 0 or self.top_k < -1:
            raise InvalidRequest("top_k", f"must be -1 (off) or >= 1, got {self.top_k}")
        _check_number("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequest("min_p", f"must be in [0, 1], got {self.min_p}")
        _check_int("max_tokens", self.max_tokens)
        if self.max_tokens < 1:
            raise InvalidRequest("max_tokens", f"must be >= 1, got {self.max_tokens}")
        _check_int("min_tokens", self.min_tokens)
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequest("min_tokens", f"must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequest("stop", f"must hold non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t)
            if t < 0:
                raise InvalidRequest("stop_token_ids", f"must be >= 0, got {t}")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequest("ignore_eos", f"must be a bool, got {self.ignore_eos!r}")
        if self.seed is not None:
            _check_int("seed", self.seed)
            if not 0 <= self.seed < 2**63:
                raise InvalidRequest("seed", f"must be in [0, 2**63), got {self.seed}")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs)
            if not 0 <= self.logprobs <= 20:
                raise InvalidRequest("logprobs", f"must be in [0, 20], got {self.logprobs}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_number(name, value)
            if not -2.0 <= value <= 2.0:
                raise InvalidRequest(name, f"must be in [-2, 2], got {value}")
        _check_number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0.0:
            raise InvalidRequest("repetition_penalty", f"must be > 0 (1 is off), got {self.repetition_penalty}")
        if len({t for t, _ in self.logit_bias}) < len(self.logit_bias):
            raise InvalidRequest("logit_bias", "names a token id twice")
        for t, bias in self.logit_bias:
            _check_int("logit_bias", t)
            if t < 0:
                raise InvalidRequest("logit_bias", f"token ids must be >= 0, got {t}")
            _check_number(f"logit_bias[{t}]", bias)
            if not -100.0 <= bias <= 100.0:
                raise InvalidRequest(f"logit_bias[{t}]", f"must be in [-100, 100], got {bias}")
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids:
                raise InvalidRequest("allowed_token_ids", "must not be empty (leave it unset to allow every token)")
            for t in self.allowed_token_ids:
                _check_int("allowed_token_ids", t)
                if t < 0:
                    raise InvalidRequest("allowed_token_ids", f"must be >= 0, got {t}")
        _check_int("n", self.n)
        if not 1 <= self.n <= MAX_N:
            raise InvalidRequest("n", f"must be in [1, {MAX_N}], got {self.n}")
        if self.structured_output is not None and self.min_tokens:
            raise InvalidRequest("min_tokens", "must be 0 with structured_output: the grammar decides where the "
                                 "output ends")

    def check_token_ids(self, vocab_size: int) -> None:
        """Every token id the params name (stop_token_ids, logit_bias, allowed_token_ids) is in the vocabulary."""
        named = [(f"stop_token_ids[{i}]", t) for i, t in enumerate(self.stop_token_ids)]
        named += [(f"logit_bias[{t}]", t) for t, _ in self.logit_bias]
        named += [(f"allowed_token_ids[{i}]", t) for i, t in enumerate(self.allowed_token_ids or ())]
        for name, t in named:
            if t >= vocab_size:
                raise InvalidRequest(name, f"{t} is outside the vocabulary [0, {vocab_size})")

    def for_choice(self, index: int) -> SamplingParams:
        """The params of choice `index` run alone (n = 1, its own seed): it samples exactly as within the request,
        so a failover resubmits an unfinished choice with these (and resumed_tokens)."""
        if self.seed is None:
            raise ValueError("for_choice needs the request's seed: the choice's derives from it")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.n:
            raise ValueError(f"for_choice: index must be an int in [0, n={self.n}), got {index!r}")
        return replace(self, n=1, seed=choice_seed(self.seed, index))

    @property
    def has_bias_or_allow_list(self) -> bool:
        return bool(self.logit_bias) or self.allowed_token_ids is not None

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def is_greedy(self) -> bool:
        """Temperature 0, or so close to it that sampling is argmax anyway (and logits / T would overflow)."""
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    @classmethod
    def from_kwargs(cls, **kwargs: object) -> SamplingParams:
        """Build from keyword arguments, naming any unknown one in the error."""
        unknown = sorted(set(kwargs).difference(FIELD_NAMES))
        if unknown:
            raise ValueError(
                f"unknown sampling parameter(s): {', '.join(unknown)}; known: {', '.join(sorted(FIELD_NAMES))}")
        return cls(**kwargs)  # type: ignore[arg-type]

    def as_kwargs(self) -> dict[str, object]:
        """Every field by name, as plain data: what `from_kwargs` rebuilds this from (on the far side of a Ray
        call)."""
        kwargs = {name: getattr(self, name) for name in FIELD_NAMES}
        if self.structured_output is not None:
            kwargs["structured_output"] = self.structured_output.as_dict()
        return kwargs


FIELD_NAMES = tuple(f.name for f in fields(SamplingParams))  # once, not per request


def choice_seed(seed: int, index: int) -> int:
    """The seed choice `index` of a request seeded `seed` samples with (SamplingParams says why this rule)."""
    return (seed + index * _CHOICE_SEED_STEP) % 2**63


def max_tokens_error(max_tokens: int, num_prompt_tokens: int, max_model_len: int) -> InvalidRequest:
    """Why max_tokens does not fit: the one wording of the engine and the router (which
    imports this module, not torch)."""
    room = max_model_len - num_prompt_tokens
    return InvalidRequest("max_tokens", f"{max_tokens} exceeds the {room} tokens left after the {num_prompt_tokens}-"
                          f"token prompt (max_model_len={max_model_len} is prompt + output)")


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequest(name, f"must be a finite number, got {value!r}")


def _check_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(name, f"must be an integer, got {value!r}")


def _bias_pairs(bias: object) -> tuple[tuple[int, float], ...]:
    """logit_bias as (token id, bias) pairs sorted by id, from a mapping or pairs (a Ray call sends lists)."""
    if not bias:
        return ()
    try:
        pairs = bias.items() if isinstance(bias, Mapping) else bias  # type: ignore[attr-defined]
        return tuple(sorted((t, b) for t, b in pairs))  # type: ignore[misc]
    except (TypeError, ValueError):
        raise InvalidRequest("logit_bias", f"must map token ids to biases, got {bias!r}") from None
