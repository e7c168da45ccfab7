"""The client-facing text: incremental, cut before stop strings even when they straddle tokens."""

from __future__ import annotations

from engine.tokenizer import Tokenizer
from router.text_stream import TextStream


def stream_text(tokenizer: Tokenizer, token_ids: list[int], stop: list[str], step: int = 1) -> tuple[list[str], bool]:
    stream = TextStream(tokenizer, stop)
    chunks = [stream.add(token_ids[i : i + step]) for i in range(0, len(token_ids), step)]
    chunks.append(stream.finish())
    return chunks, stream.hit_stop


def test_without_stop_strings_the_text_is_the_decoded_text(qwen_tokenizer: Tokenizer) -> None:
    ids = qwen_tokenizer.encode("Hello, world! Ünïcödé 你好 🙂 done.")
    chunks, hit = stream_text(qwen_tokenizer, ids, [])
    assert "".join(chunks) == qwen_tokenizer.decode(ids) and not hit


def test_stop_string_spanning_tokens_cuts_the_text_before_it(qwen_tokenizer: Tokenizer) -> None:
    text = "The quick brown fox jumps over the lazy dog"
    ids = qwen_tokenizer.encode(text)
    for stop in ("brown fox", "x jum", "dog", "quick"):
        for step in (1, 3):
            chunks, hit = stream_text(qwen_tokenizer, ids, ["never", stop], step)
            assert hit
            assert "".join(chunks) == text[: text.index(stop)]


def test_a_possible_stop_prefix_is_held_back_until_settled(qwen_tokenizer: Tokenizer) -> None:
    ids = qwen_tokenizer.encode("abc END")
    stream = TextStream(qwen_tokenizer, ["ENDING"])
    sent = "".join(stream.add([t]) for t in ids)
    assert not sent.endswith("END")  # could still become ENDING
    assert sent + stream.finish() == "abc END"  # the stream ended: it was not a stop after all


def test_a_long_stream_keeps_only_a_short_tail(qwen_tokenizer: Tokenizer) -> None:
    text = "Streaming text, token by token, with a stop string that may start anywhere. " * 200
    ids = qwen_tokenizer.encode(text + "STOP and more")
    stream = TextStream(qwen_tokenizer, ["STOP", "never seen"])
    sent = []
    for token_id in ids:
        sent.append(stream.add([token_id]))
        assert len(stream._tail) <= len("never seen") + 8  # not the whole text: each token costs the same
    sent.append(stream.finish())
    assert "".join(sent) == text and stream.hit_stop
