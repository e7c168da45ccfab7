"""Structured output in the engine, with llguidance: grammars compiled per request, matched per token.

The engine's tokenizer is turned into llguidance's token tables once, on the first structured request (about
1.3 s for Qwen's 151k tokens). Each such request compiles its grammar at submission (a bad schema, regex or
grammar is an InvalidRequest then) into a matcher that the sequence keeps and that follows its output token by
token; a resumed request's matcher first follows the output its earlier attempt streamed. Each step, the
matchers of its constrained rows fill one bitmask of allowed tokens on the host, in parallel (llguidance's
thread pool), which the sampler applies on the device (engine/token_mask.py). The vocabulary is the larger
of the model's and the tokenizer's: ids the tokenizer lacks are never allowed. Once a grammar is complete only
EOS is allowed, and the request's stop ids.
"""

from __future__ import annotations

import logging
from pathlib import Path

import llguidance
import numpy as np
import torch

from engine.grammar_text import grammar_text
from engine.invalid_request import InvalidRequest
from engine.sequence import Sequence
from engine.structured_output import StructuredOutput
from engine.token_mask import TokenMask
from engine.tokenizer import Tokenizer
from engine.transfer import to_device

log = logging.getLogger(__name__)

class Grammars:
    """One engine's grammar compiler and mask filler (llguidance's tokenizer tables, built on first use)."""

    def __init__(self, model_dir: Path, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: frozenset[int],
                 device: torch.device) -> None:
        """`model_dir` holds the tokenizer.json `tokenizer` was read from; `vocab_size` is the model's (its logits'
        width): EOS ids outside it are never allowed."""
        self._tokenizer_file = model_dir / "tokenizer.json"
        self._num_tokens = max(vocab_size, tokenizer.vocab_size)
        # Every EOS id, also one past the model's vocabulary (a small test model under Qwen's tokenizer): its bit is
        # cut off with the mask's (engine/token_mask.py), and llguidance needs at least one EOS.
        self._eos_token_ids = sorted(eos_token_ids)
        self._device = device
        self._lltokenizer: llguidance.LLTokenizer | None = None
        self._executor: llguidance.LLExecutor | None = None

    def matchers(
        self, spec: StructuredOutput | None, output_token_ids: list[int], n: int
    ) -> list[llguidance.LLMatcher | None]:
        """`n` matchers (one per choice) of `spec`'s grammar, compiled once (None without one), that have followed
        `output_token_ids` (a resumed request's earlier output); InvalidRequest naming the field when the grammar does
        not compile or the output breaks it."""
        if spec is None:
            return [None] * n
        matcher = self._matcher(spec, output_token_ids)
        return [matcher] + [matcher.deep_copy() for _ in range(n - 1)]

    def _matcher(self, spec: StructuredOutput, output_token_ids: list[int]) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(self._tokenizer_tables(), grammar_text(spec), log_level=0)
        if matcher.is_error():
            raise InvalidRequest(f"structured_output.{spec.kind}", matcher.get_error())
        if not matcher.consume_tokens(output_token_ids):
            raise InvalidRequest("resumed_tokens", f"the earlier output breaks the grammar: {matcher.get_error()}")
        return matcher

    def accept(self, new_tokens: list[tuple[Sequence, int]]) -> None:
        """Advance each sequence's matcher by its new token: one call for a step's rows, which llguidance's thread
        pool runs in parallel (one call per row cost ~2.7 us each on the GPU host: 0.69 ms a step at 256 rows).
        A token the mask allowed always fits; one that does not (every token was masked, e.g. by a stop id
        suppressed) leaves the matcher in error, allowing only EOS from then."""
        if not new_tokens:
            return
        assert self._executor is not None, "a matcher exists, so the tables were built"
        fits = self._executor.consume_token_par([(seq.matcher, token_id) for seq, token_id in new_tokens])
        for (seq, token_id), fit in zip(new_tokens, fits):
            if not fit:
                log.warning("request %s: token %d breaks its grammar; only EOS is allowed now: %s", seq.request_id,
                            token_id, seq.matcher.get_error().splitlines()[0])  # type: ignore[union-attr]

    def token_mask(self, seqs: list[Sequence]) -> TokenMask | None:
        """The allowed tokens of a step's sampling rows `seqs` whose request has a grammar (None: no such row),
        filled on the host from their matchers' current states and on its way to the device."""
        rows = [i for i, seq in enumerate(seqs) if seq.matcher is not None]
        if not rows:
            return None
        assert self._executor is not None, "a matcher exists, so the tables were built"
        num_words = -(-self._num_tokens // 32)
        on_gpu = self._device.type == "cuda"
        bitmask = torch.empty((len(rows), num_words), dtype=torch.int32, pin_memory=on_gpu)  # [R, W]
        matchers = [(seqs[i].matcher, j) for j, i in enumerate(rows)]
        self._executor.unsafe_compute_mask_ptr(matchers, bitmask.data_ptr(), num_words * 4, len(rows))
        for j, i in enumerate(rows):
            stop_token_ids = seqs[i].params.stop_token_ids
            if stop_token_ids and seqs[i].matcher.is_accepting():  # type: ignore[union-attr]
                _allow(bitmask[j].numpy().view(np.uint32), stop_token_ids)
        device_bitmask = bitmask.to(self._device, non_blocking=True) if on_gpu else bitmask
        return TokenMask(to_device(rows, self._device, torch.int64), device_bitmask)

    def _tokenizer_tables(self) -> llguidance.LLTokenizer:
        if self._lltokenizer is None:
            log.info("building llguidance's token tables for structured output (once per engine)")
            self._lltokenizer = llguidance.LLTokenizer(self._tokenizer_file.read_text(), n_vocab=self._num_tokens,
                                                       eos_token=self._eos_token_ids)
            self._executor = llguidance.LLExecutor()
        return self._lltokenizer


def _allow(words: np.ndarray, token_ids: tuple[int, ...]) -> None:
    """Set the bits of `token_ids` in one row of 32-bit words."""
    for t in token_ids:  # ids in the model's vocabulary (SamplingParams.check_token_ids), so in the words
        words[t // 32] |= np.uint32(1 << (t % 32))
