"""Shared fixtures for engine tests: the Qwen3 tokenizer, built once per machine and loaded once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.qwen_tokenizer import cached_qwen_tokenizer_dir
from engine.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    """Folder with Qwen3's tokenizer.json and tokenizer_config.json (cached across runs)."""
    return cached_qwen_tokenizer_dir()


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen_tokenizer_dir: Path) -> Tokenizer:
    """Our Tokenizer wrapper over the cached Qwen3 tokenizer."""
    return Tokenizer.from_dir(qwen_tokenizer_dir)
