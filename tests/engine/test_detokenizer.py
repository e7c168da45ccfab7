"""IncrementalDetokenizer: streamed text equals a one-shot decode and never shows a broken character."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from engine.detokenizer import NUM_CONTEXT_TOKENS, IncrementalDetokenizer
from engine.qwen_tokenizer import load_qwen_ranks
from engine.tokenizer import Tokenizer

TEXTS = [
    "Hello, world! This is a plain English sentence.",
    "Emoji 😀👍🏽 families 👨‍👩‍👧‍👦 flags 🇺🇸🇯🇵 and 🏳️‍🌈 rainbow",
    "人工智能正在改变世界。𠀀𪚥 rare CJK, 日本語のテキスト, 한국어 문장",
    "mixed: café ñ ü ß — “quotes” … \t\n  code = {'k': [1, 2]}\r\n",
    "<think>\nreasoning\n</think>\n\nanswer 🙂",
]


@pytest.fixture(scope="module")
def byte_ids() -> dict[int, int]:
    """Token id of each single byte (byte-level BPE has one token per byte value)."""
    ranks = load_qwen_ranks()
    return {b: ranks[bytes([b])] for b in range(256)}


def stream(
    detokenizer: IncrementalDetokenizer, token_ids: Sequence[int], chunk_sizes: Sequence[int]
) -> list[str]:
    """Feed `token_ids` in chunks of the given sizes (cycled), then flush; return every chunk emitted."""
    chunks: list[str] = []
    start, i = 0, 0
    while start < len(token_ids):
        size = chunk_sizes[i % len(chunk_sizes)]
        chunks.append(detokenizer.add(token_ids[start : start + size]))
        start, i = start + size, i + 1
    chunks.append(detokenizer.flush())
    return chunks


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk_sizes", [[1], [2, 1, 3], [100]])
def test_stream_equals_one_shot(qwen_tokenizer: Tokenizer, text: str, chunk_sizes: list[int]) -> None:
    token_ids = qwen_tokenizer.encode(text)
    detokenizer = IncrementalDetokenizer(qwen_tokenizer)
    chunks = stream(detokenizer, token_ids, chunk_sizes)
    assert "".join(chunks) == detokenizer.text == qwen_tokenizer.decode(token_ids) == text
    assert not any("\ufffd" in chunk for chunk in chunks)


def test_split_character_is_held_back(qwen_tokenizer: Tokenizer, byte_ids: dict[int, int]) -> None:
    detokenizer = IncrementalDetokenizer(qwen_tokenizer)
    assert detokenizer.add([byte_ids[ord("a")], byte_ids[0xF0]]) == "a"
    assert detokenizer.add([byte_ids[0x9F]]) == ""
    assert detokenizer.add([byte_ids[0x98]]) == ""
    assert detokenizer.add([byte_ids[0x80]]) == "😀"
    assert detokenizer.flush() == ""
    assert detokenizer.text == "a😀"


def test_flush_truncated_character(qwen_tokenizer: Tokenizer, byte_ids: dict[int, int]) -> None:
    detokenizer = IncrementalDetokenizer(qwen_tokenizer)
    assert detokenizer.add([byte_ids[ord("A")], byte_ids[0xE4], byte_ids[0xB8]]) == "A"
    assert detokenizer.flush() == "\ufffd"
    assert detokenizer.text == "A\ufffd"
    assert detokenizer.flush() == ""


def test_invalid_byte_mid_stream(qwen_tokenizer: Tokenizer, byte_ids: dict[int, int]) -> None:
    detokenizer = IncrementalDetokenizer(qwen_tokenizer)
    # A lone continuation byte is invalid, but a trailing U+FFFD looks the same as an unfinished
    # character, so it is held until the next character arrives.
    assert detokenizer.add([byte_ids[0x80]]) == ""
    assert detokenizer.add([byte_ids[ord("x")]]) == "\ufffdx"


def test_skip_special_tokens(qwen_tokenizer: Tokenizer) -> None:
    text = "<|im_start|>assistant\n<think>hm</think>Hi 😀<|im_end|>"
    token_ids = qwen_tokenizer.encode(text)
    skipping = IncrementalDetokenizer(qwen_tokenizer)
    assert "".join(stream(skipping, token_ids, [1])) == "assistant\n<think>hm</think>Hi 😀"
    keeping = IncrementalDetokenizer(qwen_tokenizer, skip_special_tokens=False)
    assert "".join(stream(keeping, token_ids, [1])) == text


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_ids_match_one_shot(qwen_tokenizer: Tokenizer, skip_special_tokens: bool) -> None:
    rng = random.Random(7)
    for _ in range(20):
        # Mostly byte tokens (which split characters), some ordinary and some added tokens.
        token_ids = [
            rng.choice([rng.randrange(256), rng.randrange(qwen_tokenizer.vocab_size)]) for _ in range(60)
        ]
        detokenizer = IncrementalDetokenizer(qwen_tokenizer, skip_special_tokens)
        streamed = "".join(stream(detokenizer, token_ids, [1, 2]))
        assert streamed == qwen_tokenizer.decode(token_ids, skip_special_tokens)


class CountingTokenizer:
    """Stands in for Tokenizer and records the length of every decoded window."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self.window_lengths: list[int] = []

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.window_lengths.append(len(token_ids))
        return self._tokenizer.decode(token_ids, skip_special_tokens)


def test_decodes_only_a_short_window(qwen_tokenizer: Tokenizer) -> None:
    token_ids = qwen_tokenizer.encode(" ".join(TEXTS) * 20)
    counting = CountingTokenizer(qwen_tokenizer)
    detokenizer = IncrementalDetokenizer(counting)  # type: ignore[arg-type]
    for token_id in token_ids:
        detokenizer.add([token_id])
    assert detokenizer.flush() == ""
    assert detokenizer.text == qwen_tokenizer.decode(token_ids)
    # Context plus the few tokens of one character split across byte tokens.
    assert max(counting.window_lengths) <= NUM_CONTEXT_TOKENS + 4


@pytest.mark.parametrize("byte_run", [[0x80], [0xF0], [0xF0, 0x9F], [0xE2, 0x82, 0x80, 0x80]])
def test_a_long_run_of_invalid_bytes_keeps_the_window_short(
    qwen_tokenizer: Tokenizer, byte_ids: dict[int, int], byte_run: list[int]
) -> None:
    """Text ending in U+FFFD token after token (lone continuation bytes, lead bytes that never complete)
    used to keep every token unread: each call decoded the whole run, quadratic in its length."""
    token_ids = [byte_ids[b] for b in byte_run] * (2000 // len(byte_run))
    counting = CountingTokenizer(qwen_tokenizer)
    detokenizer = IncrementalDetokenizer(counting)  # type: ignore[arg-type]
    emitted = [detokenizer.add([token_id]) for token_id in token_ids]
    emitted.append(detokenizer.flush())
    assert "".join(emitted) == detokenizer.text == qwen_tokenizer.decode(token_ids)
    assert max(counting.window_lengths) <= NUM_CONTEXT_TOKENS + 4
    assert len("".join(emitted[:-1])) >= len(detokenizer.text) - 1  # all but the last U+FFFD came out on the way


def test_random_bytes_in_random_chunks_match_one_shot(qwen_tokenizer: Tokenizer, byte_ids: dict[int, int]) -> None:
    """Valid, truncated and invalid UTF-8 sequences mixed: what is emitted early is never taken back."""
    pieces = [b"a", "é".encode(), "€".encode(), "😀".encode(), b"\x80", b"\xf0\x9f", b"\xe2\x82", b"\xc3", b"\xff"]
    rng = random.Random(3)
    for _ in range(200):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 30)))
        token_ids = [byte_ids[b] for b in data]
        detokenizer = IncrementalDetokenizer(qwen_tokenizer)
        streamed = "".join(stream(detokenizer, token_ids, [rng.randint(1, 4) for _ in range(5)]))
        assert streamed == qwen_tokenizer.decode(token_ids) == data.decode("utf-8", errors="replace")
