"""A chat answer's reasoning apart from its content, as it streams (vLLM's `--reasoning-parser qwen3`).

Qwen3 thinks first: with thinking on (its chat template's default), the answer opens with `<think>`, reasons,
and closes the span with `</think>` before the reply. An answer that does not open with `<think>` (thinking
off: `chat_template_kwargs={"enable_thinking": false}`) is all content. A span still open at the end (the token
budget ran out mid-thought) stays reasoning, whole or streamed alike. The split runs in the router on the text
the client is sent, so a failed-over stream splits exactly as an undisturbed one.
"""

from __future__ import annotations

from router.text_stream import held_back

REASONING_PARSERS = ("qwen3",)
THINK_START, THINK_END = "<think>", "</think>"


class ReasoningSplitter:
    """Feed the answer's text in pieces; each call returns the (reasoning, content) it settles. Text that may
    still be the start of a tag is held back until the next piece (or the end) settles it."""

    def __init__(self) -> None:
        self._state = "opening"  # before the answer shows whether it opens with THINK_START
        self._held = ""

    def split(self, text: str, final: bool = False) -> tuple[str, str]:
        text, self._held = self._held + text, ""
        if self._state == "opening":
            if text.startswith(THINK_START):
                self._state, text = "reasoning", text[len(THINK_START):]
            elif THINK_START.startswith(text) and not final:
                self._held = text
                return "", ""
            else:
                self._state = "content"
        if self._state == "content":
            return "", text
        end = text.find(THINK_END)
        if end >= 0:
            self._state = "content"
            return text[:end], text[end + len(THINK_END):]
        held = 0 if final else held_back(text, (THINK_END,))
        self._held = text[len(text) - held:] if held else ""
        return text[: len(text) - held], ""

