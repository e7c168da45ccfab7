"""The engine the LLMEngine API tests share (one per module): a tiny random Qwen3 with the full Qwen vocabulary."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine import LLMEngine
from tests.engine.llm_engine_runs import HELLO, LONG_GREEDY, VOCAB, greedy, one


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint: Callable[..., Path]) -> Path:
    return tiny_checkpoint("tied-gqa2-hd16", vocab_size=VOCAB)


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> LLMEngine:
    return LLMEngine(model_dir, device="cpu", dtype="float32", max_model_len=256)


@pytest.fixture(scope="module")
def hello_greedy(engine: LLMEngine) -> dict[str, Any]:
    """The reference: HELLO's greedy continuation, EOS ignored."""
    return one(engine, HELLO, greedy(LONG_GREEDY))
