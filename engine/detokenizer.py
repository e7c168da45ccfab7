"""Streaming detokenization: new text per generated token, never a broken UTF-8 character."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

REPLACEMENT_CHAR = "\ufffd"
# Tokens decoded before the unread ones, as context: decoders such as SentencePiece's drop the leading
# space of the first token they see, so a window must not start at the token being read.
NUM_CONTEXT_TOKENS = 4


class IncrementalDetokenizer:
    """Turn a growing stream of token ids into text chunks, decoding only a short window per call.

    Window invariants: tokens before `_read_offset` are fully emitted, and (until `flush`) their decoded
    text is final: appending tokens never changes it. Each call decodes `ids[_prefix_offset:_read_offset]`
    (context) and `ids[_prefix_offset:]`; the difference is the text of the unread tokens. Of that,
    `_num_unread_chars_emitted` characters are already out.

    A trailing U+FFFD may be a character whose bytes have not all arrived, so it is held back. Only the
    last one can be: the decoder turns each maximal invalid byte run into one U+FFFD, and every run but
    the last is already closed by the bytes after it. The read offset then moves up to the last token
    whose text is final, so a long run of invalid bytes keeps the window short (not quadratic).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._token_ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._num_unread_chars_emitted = 0
        self._chunks: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]  # join once, not on every access
        return self._chunks[0] if self._chunks else ""

    def add(self, token_ids: Sequence[int]) -> str:
        """Append generated tokens; return the text that is now complete and was not returned before."""
        self._token_ids.extend(token_ids)
        unread_text = self._decode_unread()
        if not unread_text.endswith(REPLACEMENT_CHAR):
            chunk = unread_text[self._num_unread_chars_emitted :]
            self._advance()
            return self._emit(chunk)
        final_end = len(unread_text) - 1  # all but the last U+FFFD (see the class docstring)
        chunk = unread_text[self._num_unread_chars_emitted : final_end]
        self._num_unread_chars_emitted = max(self._num_unread_chars_emitted, final_end)
        self._advance_over_final_tokens(unread_text[:final_end])
        return self._emit(chunk)

    def flush(self) -> str:
        """Return whatever is held back at the end of the stream (U+FFFD for bytes that never completed)."""
        chunk = self._decode_unread()[self._num_unread_chars_emitted :]
        self._advance()
        return self._emit(chunk)

    def _decode_unread(self) -> str:
        """Text of the tokens from `_read_offset` on, decoded with a few tokens of context before them."""
        window = self._token_ids[self._prefix_offset :]
        num_context = self._read_offset - self._prefix_offset
        context_text = self._decode(window[:num_context]) if num_context else ""
        window_text = self._decode(window)
        if not window_text.startswith(context_text):
            # Not seen with byte-level BPE; fall back to the safe (slower) full decode.
            log.warning("detokenizer window changed its context text; decoding the whole output")
            context_text = self._decode(self._token_ids[: self._read_offset])
            window_text = self._decode(self._token_ids)
        return window_text[len(context_text) :]

    def _advance(self) -> None:
        """Mark every token read: the decoded text ended on a complete character."""
        self._move_read_offset(len(self._token_ids))
        self._num_unread_chars_emitted = 0

    def _advance_over_final_tokens(self, final_text: str) -> None:
        """Mark read the unread tokens up to the last one whose text is final, i.e. lies within `final_text`.

        The held-back character's bytes come from at most the last 3 tokens (an incomplete UTF-8 sequence
        has at most 3 bytes), so one of the 3 cut points before them ends in final text, unless a token
        holds no byte (a skipped special token); then the window stays and the next call tries again.
        """
        window = self._token_ids[self._prefix_offset :]
        num_context = self._read_offset - self._prefix_offset
        context_text = self._decode(window[:num_context]) if num_context else ""
        for cut in range(len(window) - 1, max(num_context, len(window) - 4), -1):
            head_text = self._decode(window[:cut])
            if head_text.startswith(context_text) and final_text.startswith(head_text[len(context_text) :]):
                self._num_unread_chars_emitted -= len(head_text) - len(context_text)
                self._move_read_offset(self._prefix_offset + cut)
                return

    def _move_read_offset(self, read_offset: int) -> None:
        self._read_offset = read_offset
        self._prefix_offset = max(0, read_offset - NUM_CONTEXT_TOKENS)

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)

    def _emit(self, chunk: str) -> str:
        if chunk:
            self._chunks.append(chunk)
        return chunk
