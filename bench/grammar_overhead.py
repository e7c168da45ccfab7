"""Structured output's host cost per request and per token, xgrammar against llguidance, on Qwen's tokenizer.

For a JSON schema (an object of a string, an integer, an enum and a list) and for {"type": "object"}: the
once-per-engine cost (the tokenizer's setup), the per-request cost (compiling the grammar) and, over a walk of
random allowed tokens (200 at most), the mean time to fill the next-token bitmask (151,936 tokens) and to
advance the matcher by the chosen token. The host computes the mask while the GPU runs the step, so what
matters is that it stays well under a decode step (1.2 ms at batch 1, ~9 ms at batch 256 on an H200).

    pip install xgrammar llguidance transformers && python bench/grammar_overhead.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.qwen_tokenizer import cached_qwen_tokenizer_dir  # noqa: E402

SCHEMAS = {
    "schema": {"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer"}, "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
        "required": ["name", "age", "role", "tags"], "additionalProperties": False},
    "json_object": {"type": "object"},
}
MAX_STEPS = 200


def hf_tokenizer():  # noqa: ANN201 - transformers' fast tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(cached_qwen_tokenizer_dir() / "tokenizer.json"),
                                   eos_token="<|im_end|>")


def pick(bitmask_row: torch.Tensor, vocab_size: int, generator: torch.Generator) -> int:
    """A random token among those the 32-bit-word bitmask allows."""
    bits = ((bitmask_row[:, None] >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[:vocab_size]
    allowed = bits.nonzero().flatten()
    return int(allowed[torch.randint(len(allowed), (1,), generator=generator)])


def run_xgrammar(tokenizer, vocab_size: int, schema: dict) -> tuple[float, ...]:  # noqa: ANN001
    import xgrammar as xgr

    start = time.perf_counter()
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size))
    once = time.perf_counter() - start
    compiled = compiler.compile_json_schema(json.dumps(schema))
    matcher = xgr.GrammarMatcher(compiled)
    per_request = time.perf_counter() - start - once
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    return (once, per_request, *_generate(lambda: matcher.fill_next_token_bitmask(bitmask), matcher.accept_token,
                                          matcher.is_terminated, bitmask, vocab_size))


def run_llguidance(tokenizer, vocab_size: int, schema: dict) -> tuple[float, ...]:  # noqa: ANN001
    import llguidance
    import llguidance.hf
    import llguidance.torch

    start = time.perf_counter()
    lltokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
    once = time.perf_counter() - start
    matcher = llguidance.LLMatcher(lltokenizer, llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema)))
    per_request = time.perf_counter() - start - once
    bitmask = llguidance.torch.allocate_token_bitmask(1, vocab_size)
    return (once, per_request, *_generate(lambda: llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0),
                                          matcher.consume_token, matcher.is_stopped, bitmask, vocab_size))


def _generate(fill, accept, done, bitmask: torch.Tensor, vocab_size: int) -> tuple[float, float, int]:  # noqa: ANN001
    """(mean s per mask fill, mean s per accepted token, tokens) over a random walk through the grammar."""
    generator = torch.Generator().manual_seed(0)
    fill_s = accept_s = 0.0
    steps = 0
    while steps < MAX_STEPS and not done():
        start = time.perf_counter()
        fill()
        fill_s += time.perf_counter() - start
        token = pick(bitmask[0], vocab_size, generator)
        start = time.perf_counter()
        accept(token)
        accept_s += time.perf_counter() - start
        steps += 1
    return fill_s / steps, accept_s / steps, steps


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    tokenizer = hf_tokenizer()
    vocab_size = 151936
    for name, schema in SCHEMAS.items():
        for library, run in (("xgrammar", run_xgrammar), ("llguidance", run_llguidance)):
            once, per_request, fill, accept, steps = run(tokenizer, vocab_size, schema)
            print(f"{name:11s} {library:10s}: tokenizer {once * 1e3:7.1f} ms once, grammar {per_request * 1e3:6.1f} "
                  f"ms a request, mask {fill * 1e6:6.1f} us/token, advance {accept * 1e6:5.1f} us/token "
                  f"({steps} tokens)")


if __name__ == "__main__":
    main()
