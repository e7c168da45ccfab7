"""A request's output text as the client sees it: incremental, and cut before a stop string.

The router, not the engine, owns the text a client receives: a failed-over request continues on
another replica whose engine never saw the earlier tokens, so only the router sees the whole
stream (a stop string may even straddle the failover). Text that could be the start of a stop
string is held back until the next tokens settle it.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.detokenizer import IncrementalDetokenizer
from engine.tokenizer import Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._stop = tuple(s for s in stop if s)
        self._text = ""
        self._num_sent = 0  # characters of _text already handed out
        self.hit_stop = False  # a stop string appeared: the text is final
        self._text_end = 0  # where the text ends once a stop string was hit

    def add(self, token_ids: Sequence[int]) -> str:
        """Feed new tokens; return the text that can be sent now."""
        if self.hit_stop:
            return ""
        self._text += self._detokenizer.add(token_ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text at the end of the stream (nothing is held back any more)."""
        if not self.hit_stop:
            self._text += self._detokenizer.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        end = len(self._text)
        if self._stop and not self.hit_stop:
            longest = max(map(len, self._stop))
            search_from = max(0, self._num_sent - longest + 1)
            hits = [i for i in (self._text.find(s, search_from) for s in self._stop) if i >= 0]
            if hits:
                self.hit_stop = True
                end = self._text_end = min(hits)
            elif not final:
                end -= _held_back(self._text, self._stop)
        if self.hit_stop:
            end = self._text_end
        chunk = self._text[self._num_sent : end]
        self._num_sent = max(self._num_sent, end)
        return chunk


def _held_back(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    for n in range(min(len(text), max(map(len, stop)) - 1), 0, -1):
        tail = text[-n:]
        if any(s.startswith(tail) for s in stop):
            return n
    return 0
