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
    """Keeps only the text not yet sent plus the few characters before it a stop string could start in,
    so each token costs the same however long the output grows (a whole-text string grew quadratically)."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._stop = tuple(s for s in stop if s)
        self._lookbehind = max(map(len, self._stop), default=1) - 1  # sent characters a stop may start in
        self._tail = ""  # the text from the lookbehind on: up to `_lookbehind` sent characters, then unsent ones
        self._num_sent_in_tail = 0
        self.hit_stop = False  # a stop string appeared: the text is final

    def add(self, token_ids: Sequence[int]) -> str:
        """Feed new tokens; return the text that can be sent now."""
        if self.hit_stop:
            return ""
        self._tail += self._detokenizer.add(token_ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text at the end of the stream (nothing is held back any more)."""
        if not self.hit_stop:
            self._tail += self._detokenizer.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        tail, end = self._tail, len(self._tail)
        if self._stop and not self.hit_stop:
            hits = [i for i in (tail.find(s) for s in self._stop) if i >= 0]
            if hits:
                self.hit_stop = True
                end = min(hits)
            elif not final:
                end -= held_back(tail, self._stop)
        chunk = tail[self._num_sent_in_tail : end]
        if self.hit_stop:  # nothing after the stop string is ever sent
            self._tail, self._num_sent_in_tail = "", 0
            return chunk
        keep_from = max(0, end - self._lookbehind)
        self._tail, self._num_sent_in_tail = tail[keep_from:], max(self._num_sent_in_tail, end) - keep_from
        return chunk


def held_back(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    for n in range(min(len(text), max(map(len, stop)) - 1), 0, -1):
        tail = text[-n:]
        if any(s.startswith(tail) for s in stop):
            return n
    return 0
