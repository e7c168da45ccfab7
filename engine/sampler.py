"""Turn one step's logits into next tokens, each row with its own SamplingParams.

Per row, computed in float32:

0. Penalties (rows whose params set any; SamplingParams says what each does): from the row's output
   token ids (counts) and, for repetition_penalty, its prompt ids, scattered into [P, V] tensors of
   the penalised rows only. A row's newest output token may not be known on the host when the batch is
   built (the step before is still sampling it); the model runner adds it on the device (`with_output_tokens`).
0b. Logit bias and allow-lists (rows whose params set either): each row's biases are added to its logits, in
   float32, and a row with allowed_token_ids has every other token's logit set to -inf; so has a row under a
   grammar (structured output) every token its `token_mask` bit does not allow.
1. Suppression: each (row, token) pair in `suppress_rows`/`suppress_token_ids` gets logit -inf
   (min_tokens bans EOS and the stop ids this way).
2. Greedy rows (temperature 0) take the argmax of the suppressed logits; no mask applies to them.
3. Sampled rows divide the logits by temperature, then mask in the order top-k, top-p, min-p, each
   stage working on the distribution the stage before left:
   - top-k keeps every token whose logit is >= the k-th largest, so tokens tied at the k-th value are
     all kept (the result cannot depend on how the sort orders equal values); k >= vocab is off.
   - top-p keeps the shortest run of most-probable tokens whose cumulative probability reaches top_p
     (never fewer than one), widened the same way to every token tied with the last one kept.
   - min-p keeps tokens whose probability is >= min_p * the largest probability.
   top-k and top-p share one descending sort, done only when a sampled row uses either, and both
   reduce to a per-row logit floor compared against the unsorted logits (no scatter needed). Each
   stage is skipped when no sampled row uses it, decided by host-side flags, so no device sync.
4. The token is argmax(probs / E), E ~ Exp(1) i.i.d. per vocab entry: the exponential race, which
   picks token i with probability probs[i] (it is Gumbel-max in another form). A row's E comes from
   a stream keyed only by (seed, position), so its token is a function of its logits, params, seed
   and position, and not of the batch around it, the row order or any global RNG state. Re-running
   from any position reproduces the same tokens. On a GPU, sampled rows without top-k/top-p/min-p
   run the race in one fused pass in log space, argmax(logits / T - log E) (same E, same
   distribution; which path a row takes depends on its own params only).

Log-probs, when some row asks (num_logprobs >= 0), are of the raw model distribution:
log_softmax of the unscaled, unsuppressed logits.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from engine.sampling_params import SamplingParams
from engine.token_mask import TokenMask
from engine.transfer import arrays_to_device, to_device
from kernels.exponential_noise import exponential_noise as kernel_exponential_noise
from kernels.exponential_noise import exponential_noise_ref, exponential_race
from kernels.triton_compat import HAS_TRITON


@dataclass(frozen=True, slots=True)
class SamplingBatch:
    """Per-row sampling inputs for one step (built on the host, moved to the device once)."""

    temperatures: torch.Tensor  # [B] float32, 0.0 = greedy
    top_ks: torch.Tensor  # [B] int64, -1 = off
    top_ps: torch.Tensor  # [B] float32, 1.0 = off
    min_ps: torch.Tensor  # [B] float32, 0.0 = off
    seeds: torch.Tensor  # [B] int64
    positions: torch.Tensor  # [B] int64, index in prompt + output of the token being sampled
    suppress_rows: torch.Tensor  # [S] int64, with suppress_token_ids: (row, token) pairs forced to -inf
    suppress_token_ids: torch.Tensor  # [S] int64
    num_logprobs: int  # largest top-N any row asked for; -1 when no row asked for logprobs
    # Host-side facts, so forward() can skip work without reading the device.
    all_greedy: bool
    any_greedy: bool
    any_top_k: bool  # these three look at sampled rows only: masks never apply to greedy rows
    any_top_p: bool
    any_min_p: bool
    masked: torch.Tensor | None  # [B] bool: the row uses top-k, top-p or min-p; None when no sampled row does
    sampled_rows: tuple[int, ...]  # rows with temperature > 0
    # On the device: rng_key(seed, position) of each sampled row (its 64 bits as int64), and sampled_rows.
    streams: tuple[torch.Tensor, torch.Tensor]
    penalties: Penalties | None  # None when no row uses a penalty
    biases: Biases | None  # None when no row sets logit_bias or allowed_token_ids
    token_mask: TokenMask | None = None  # grammar rows' allowed tokens, set once the host has filled them

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        seeds: list[int],
        positions: list[int],
        suppressed: list[list[int]],
        device: torch.device,
        histories: list[tuple[list[int], list[int]] | None] | None = None,
    ) -> SamplingBatch:
        """Pack one step's rows; `suppressed[i]` lists the token ids banned for row i; `histories[i]` is
        (prompt ids, output ids) of a row with penalties (None for the others)."""
        if not len(params) == len(seeds) == len(positions) == len(suppressed):
            raise ValueError(
                f"row counts differ: params={len(params)} seeds={len(seeds)} "
                f"positions={len(positions)} suppressed={len(suppressed)}"
            )
        sampled = [i for i, p in enumerate(params) if not p.is_greedy]
        sampled_params = [params[i] for i in sampled]
        asked = [p.logprobs for p in params if p.logprobs is not None]
        keys = rng_keys([seeds[i] for i in sampled], [positions[i] for i in sampled])
        host = {
            "temperatures": np.array([0.0 if p.is_greedy else p.temperature for p in params], np.float32),
            "top_ks": np.array([p.top_k for p in params], np.int64),
            "top_ps": np.array([p.top_p for p in params], np.float32),
            "min_ps": np.array([p.min_p for p in params], np.float32),
            "seeds": np.array(seeds, np.int64),
            "positions": np.array(positions, np.int64),
            "suppress_rows": np.array([row for row, ids in enumerate(suppressed) for _ in ids], np.int64),
            "suppress_token_ids": np.array([tok for ids in suppressed for tok in ids], np.int64),
            "masked": np.array([_is_masked(p) for p in params], np.bool_),
            "keys": keys.view(np.int64),
            "rows": np.array(sampled, np.int64),
        }
        moved = dict(zip(host, arrays_to_device(list(host.values()), device)))  # one copy for all of them
        streams = (moved.pop("keys"), moved.pop("rows"))
        if not any(_is_masked(p) for p in sampled_params):
            moved["masked"] = None
        return cls(
            **moved,
            num_logprobs=max(asked, default=-1),
            all_greedy=not sampled,
            any_greedy=len(sampled) < len(params),
            any_top_k=any(p.top_k != -1 for p in sampled_params),
            any_top_p=any(p.top_p < 1.0 for p in sampled_params),
            any_min_p=any(p.min_p > 0.0 for p in sampled_params),
            sampled_rows=tuple(sampled),
            streams=streams,
            penalties=Penalties.build(params, histories, device) if any(p.has_penalties for p in params) else None,
            biases=Biases.build(params, device) if any(p.has_bias_or_allow_list for p in params) else None,
        )

    def with_output_tokens(self, rows: list[int], token_ids: torch.Tensor) -> SamplingBatch:
        """The same batch with `token_ids[k]` (on the device) one more output token of row `rows[k]`, a row with
        penalties: a token the host does not know yet counts without the host waiting for it."""
        pen = self.penalties
        assert pen is not None
        index = {row: j for j, row in enumerate(pen.host_rows)}
        output_rows = to_device([index[row] for row in rows], token_ids.device, torch.int64)
        penalties = dataclasses.replace(pen, output_rows=torch.cat([pen.output_rows, output_rows]),
                                        output_token_ids=torch.cat([pen.output_token_ids, token_ids]))
        return dataclasses.replace(self, penalties=penalties)


@dataclass(frozen=True, slots=True)
class Penalties:
    """The penalised rows of a step and the token ids their penalties count, on the device."""

    rows: torch.Tensor  # [P] int64: rows of the batch with a penalty
    host_rows: tuple[int, ...]  # the same, on the host
    presence: torch.Tensor  # [P] float32
    frequency: torch.Tensor  # [P] float32
    repetition: torch.Tensor  # [P] float32
    output_rows: torch.Tensor  # [N] int64 in [0, P): whose output token each of output_token_ids is
    output_token_ids: torch.Tensor  # [N] int64
    prompt_rows: torch.Tensor  # [M] int64 in [0, P), for repetition_penalty only
    prompt_token_ids: torch.Tensor  # [M] int64
    any_repetition: bool

    @classmethod
    def build(
        cls, params: list[SamplingParams], histories: list[tuple[list[int], list[int]] | None] | None,
        device: torch.device,
    ) -> Penalties:
        rows = [i for i, p in enumerate(params) if p.has_penalties]
        if histories is None or any(histories[i] is None for i in rows):
            raise ValueError("rows with penalties need their (prompt, output) token ids")
        output_rows, output_ids, prompt_rows, prompt_ids = [], [], [], []
        for j, i in enumerate(rows):
            prompt, output = histories[i]  # type: ignore[misc]
            output_rows += [j] * len(output)
            output_ids += output
            if params[i].repetition_penalty != 1.0:
                prompt_rows += [j] * len(prompt)
                prompt_ids += prompt
        return cls(
            rows=to_device(rows, device, torch.int64),
            host_rows=tuple(rows),
            presence=to_device([params[i].presence_penalty for i in rows], device, torch.float32),
            frequency=to_device([params[i].frequency_penalty for i in rows], device, torch.float32),
            repetition=to_device([params[i].repetition_penalty for i in rows], device, torch.float32),
            output_rows=to_device(output_rows, device, torch.int64),
            output_token_ids=to_device(output_ids, device, torch.int64),
            prompt_rows=to_device(prompt_rows, device, torch.int64),
            prompt_token_ids=to_device(prompt_ids, device, torch.int64),
            any_repetition=any(params[i].repetition_penalty != 1.0 for i in rows),
        )


@dataclass(frozen=True, slots=True)
class SamplerOutput:
    """The tokens chosen for one step and, when asked for, their log-probs."""

    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] float32, log-prob of the chosen token under the raw distribution
    top_token_ids: torch.Tensor | None  # [B, N] int64, N = num_logprobs (may be 0)
    top_logprobs: torch.Tensor | None  # [B, N] float32


@dataclass(frozen=True, slots=True)
class Biases:
    """The rows of a step with a logit bias or an allow-list, and their (row, token) pairs, on the device."""

    rows: torch.Tensor  # [R] int64: rows of the batch with either
    bias_rows: torch.Tensor  # [N] int64 in [0, R), with bias_token_ids and bias_values: one bias each
    bias_token_ids: torch.Tensor  # [N] int64
    bias_values: torch.Tensor  # [N] float32
    allow_rows: torch.Tensor  # [A] int64 in [0, R), with allow_token_ids: the tokens a restricted row may take
    allow_token_ids: torch.Tensor  # [A] int64
    restricted: torch.Tensor  # [R] bool: the row has an allow-list
    any_allow_list: bool

    @classmethod
    def build(cls, params: list[SamplingParams], device: torch.device) -> Biases:
        rows = [i for i, p in enumerate(params) if p.has_bias_or_allow_list]
        bias = [(j, t, b) for j, i in enumerate(rows) for t, b in params[i].logit_bias]
        allow = [(j, t) for j, i in enumerate(rows) for t in params[i].allowed_token_ids or ()]
        return cls(
            rows=to_device(rows, device, torch.int64),
            bias_rows=to_device([j for j, _, _ in bias], device, torch.int64),
            bias_token_ids=to_device([t for _, t, _ in bias], device, torch.int64),
            bias_values=to_device([b for _, _, b in bias], device, torch.float32),
            allow_rows=to_device([j for j, _ in allow], device, torch.int64),
            allow_token_ids=to_device([t for _, t in allow], device, torch.int64),
            restricted=to_device([params[i].allowed_token_ids is not None for i in rows], device, torch.bool),
            any_allow_list=bool(allow),
        )


class Sampler(torch.nn.Module):
    """Samples one token per row: suppression, greedy or temperature/top-k/top-p/min-p, then logprobs."""

    def forward(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """Pick a token per row of `logits` [B, V] (any float dtype; the math is float32)."""
        biased = _bias(_penalize(logits, batch), batch)
        masked = biased if batch.token_mask is None else batch.token_mask.apply(biased)
        suppressed = _suppress(masked, batch)  # [B, V], in the logits' dtype
        token_ids = _choose(suppressed, batch)  # [B]
        if batch.num_logprobs < 0:
            return SamplerOutput(token_ids, None, None, None)
        raw_logprobs = logits.float().log_softmax(dim=-1)  # [B, V]
        chosen = raw_logprobs.gather(1, token_ids[:, None]).squeeze(1)  # [B]
        top_logprobs, top_token_ids = raw_logprobs.topk(batch.num_logprobs, dim=-1)  # [B, N] each
        return SamplerOutput(token_ids, chosen, top_token_ids, top_logprobs)


def rng_key(seed: int, position: int) -> int:
    """Mix (seed, position) into the 64-bit key of that token's random stream."""
    return int(rng_keys([seed], [position])[0])


def rng_keys(seeds: list[int], positions: list[int]) -> np.ndarray:
    """`rng_key` for many rows at once: splitmix64(splitmix64(seed) ^ position), as uint64 [S]."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps modulo 2**64, as intended
        mixed = _splitmix64(np.array(seeds, dtype=np.uint64)) ^ np.array(positions, dtype=np.uint64)
        return _splitmix64(mixed)


def exponential_noise(batch: SamplingBatch, vocab_size: int, device: torch.device) -> torch.Tensor:
    """Exp(1) noise [B, V]: a sampled row's from its (seed, position) stream, greedy rows get ones.

    The sampler's only source of randomness: a Philox kernel on the GPU, a generator per row on CPU.
    """
    noise = torch.ones(batch.temperatures.shape[0], vocab_size, device=device)  # [B, V]
    if not batch.sampled_rows:
        return noise
    keys, rows = batch.streams
    if _on_gpu(device):
        kernel_exponential_noise(keys, rows, noise)
    else:
        exponential_noise_ref(keys, rows, noise)
    return noise


def _is_masked(params: SamplingParams) -> bool:
    return params.top_k != -1 or params.top_p < 1.0 or params.min_p > 0.0


def _on_gpu(device: torch.device) -> bool:
    return device.type == "cuda" and HAS_TRITON


def _choose(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Greedy or sampled token per row of suppressed logits [B, V] -> [B]."""
    if batch.all_greedy:
        return logits.argmax(dim=-1)
    if _on_gpu(logits.device):
        sampled = _race_in_one_pass(logits, batch)  # [B]
        if batch.masked is not None:
            sampled = torch.where(batch.masked, _sample(logits, batch), sampled)
    else:
        sampled = _sample(logits, batch)  # [B]
    if not batch.any_greedy:
        return sampled
    # Greedy rows' noise is 1, so `sampled` is already their softmax argmax; this makes it exactly
    # the logits' argmax, whatever float rounding does in the softmax.
    return torch.where(batch.temperatures == 0.0, logits.argmax(dim=-1), sampled)


def _race_in_one_pass(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The exponential race of every sampled row, fused (no masks applied) -> [B] (greedy rows: garbage)."""
    keys, rows = batch.streams
    tokens = torch.zeros(logits.shape[0], dtype=torch.int64, device=logits.device)  # [B]
    return tokens.index_copy_(0, rows, exponential_race(logits, keys, rows, batch.temperatures[rows]))


def _sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Temperature, masks and the exponential race over logits [B, V] -> [B] (greedy rows: garbage)."""
    logits = logits.float()
    temperatures = torch.where(batch.temperatures > 0.0, batch.temperatures, 1.0)  # [B]
    scaled = logits / temperatures[:, None]  # [B, V]
    if batch.any_top_k or batch.any_top_p:
        floor = _top_k_top_p_floor(scaled, batch)  # [B, 1]
        scaled = scaled.masked_fill(scaled < floor, float("-inf"))
    probs = scaled.softmax(dim=-1)  # [B, V]
    if batch.any_min_p:
        probs = _min_p(probs, batch.min_ps)
    # No renormalising: argmax(probs / E) does not change when a row of probs is scaled.
    noise = exponential_noise(batch, logits.shape[-1], logits.device)  # [B, V]
    return (probs / noise).argmax(dim=-1)


def _top_k_top_p_floor(scaled: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Lowest scaled logit [B, 1] that survives top-k then top-p, from one descending sort."""
    sorted_logits = scaled.sort(dim=-1, descending=True).values  # [B, V]
    vocab_size = scaled.shape[-1]
    k = batch.top_ks
    k = torch.where((k < 1) | (k > vocab_size), vocab_size, k)  # [B], off -> whole vocab
    floor = sorted_logits.gather(1, (k - 1)[:, None])  # [B, 1]
    if not batch.any_top_p:
        return floor
    in_top_k = sorted_logits >= floor  # [B, V], a prefix of each sorted row
    probs = sorted_logits.masked_fill(~in_top_k, float("-inf")).softmax(dim=-1)  # [B, V]
    mass_before = _row_cumsum(probs) - probs  # [B, V], probability of all strictly better tokens
    top_ps = batch.top_ps[:, None]  # [B, 1]
    # top_p = 1 keeps all: rounding could otherwise push mass_before to 1.0 before the tail.
    keep = in_top_k & ((mass_before < top_ps) | (top_ps >= 1.0))  # [B, V], a prefix holding index 0
    # >= 1 (the docstring's promise) even where top_p rounds to 0 in float32 or the scaled logits overflow.
    num_kept = keep.sum(dim=-1, keepdim=True).clamp_min(1)  # [B, 1]
    return sorted_logits.gather(1, num_kept - 1)


def _row_cumsum(x: torch.Tensor) -> torch.Tensor:
    """Cumulative sums along each row of x [B, V], the same bits for a row whatever B is.

    On CUDA, torch scans a lone row with another algorithm (CUB's device scan) than rows of a batch (one
    block-wide scan per row): measured on an H200, a row's float32 sums differ in the last bits between B = 1
    and B >= 2 (bench/invariance_probe.py), which can move the top-p cut and so the sampled token. A lone row
    goes through the batched algorithm, as the first of two.
    """
    if x.shape[0] != 1 or not x.is_cuda:
        return x.cumsum(dim=-1)
    return torch.cat([x, x]).cumsum(dim=-1)[:1]


def _min_p(probs: torch.Tensor, min_ps: torch.Tensor) -> torch.Tensor:
    """Zero the probs [B, V] below min_p [B] times their row's largest."""
    threshold = min_ps[:, None] * probs.amax(dim=-1, keepdim=True)  # [B, 1]
    return probs.masked_fill(probs < threshold, 0.0)


def _penalize(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Logits [B, V] with the penalised rows' penalties applied (a new tensor when any row has one)."""
    pen = batch.penalties
    if pen is None:
        return logits
    x = logits[pen.rows].float()  # [P, V]
    counts = torch.zeros_like(x).index_put_(
        (pen.output_rows, pen.output_token_ids), torch.ones_like(pen.output_token_ids, dtype=x.dtype), accumulate=True
    )
    present = counts > 0
    if pen.any_repetition:
        true = torch.ones((), dtype=torch.bool, device=x.device)  # made on the device: no host copy
        seen = present.index_put((pen.prompt_rows, pen.prompt_token_ids), true)
        rep = pen.repetition[:, None]
        x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    x = x - pen.frequency[:, None] * counts - pen.presence[:, None] * present
    return logits.index_put((pen.rows,), x.to(logits.dtype))


def _bias(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Logits [B, V] with the rows' logit biases added and their allow-lists applied (a new tensor when any)."""
    b = batch.biases
    if b is None:
        return logits
    x = logits[b.rows].float()  # [R, V]
    x = x.index_put((b.bias_rows, b.bias_token_ids), b.bias_values, accumulate=True)
    if b.any_allow_list:
        true = torch.ones((), dtype=torch.bool, device=x.device)  # made on the device: no host copy
        allowed = torch.zeros_like(x, dtype=torch.bool).index_put((b.allow_rows, b.allow_token_ids), true)
        x = x.masked_fill(b.restricted[:, None] & ~allowed, float("-inf"))
    return logits.index_put((b.rows,), x.to(logits.dtype))


def _suppress(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Logits [B, V] with the batch's (row, token) pairs set to -inf (a new tensor when any)."""
    if batch.suppress_rows.numel() == 0:
        return logits
    minus_inf = torch.full((), float("-inf"), dtype=logits.dtype, device=logits.device)  # no host copy
    return logits.index_put((batch.suppress_rows, batch.suppress_token_ids), minus_inf)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """One splitmix64 step (uint64, wrapping): a bijection whose output bits all depend on every input bit."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))
