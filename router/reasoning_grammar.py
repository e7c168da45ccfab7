"""Room for a thinking answer's reasoning before the part a grammar holds (vLLM's structured output with a
reasoning parser).

Qwen3 with thinking on opens its answer with `<think>` ... `</think>` and replies after it. A grammar that held the
answer from its first token (a response_format, a regex, tool_choice "required" or a named function) would forbid
the thinking; vLLM holds only what follows the reasoning, and so does this: with `--reasoning-parser qwen3`, a chat
answer with thinking on gets a grammar that lets it open with a reasoning span (StructuredOutput.reasoning), free
text, and holds what follows `</think>` from the next token on, so the content the reasoning parser returns parses
as it is. The span's text holds out EOS and the request's stop ids: a model that never closes the span runs into
max_tokens (finish_reason "length", all of it reasoning, no content) rather than ending mid-thought.

Thinking is on when the served vocabulary has both tags as single tokens, the chat template writes them, and the
rendered prompt does not already close a span (Qwen3's template closes an empty one for enable_thinking false).
Without the reasoning parser nothing changes: the content would hold the span, and no longer parse.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

from engine.structured_output import ReasoningSpan, StructuredOutput
from engine.tokenizer import Tokenizer
from router.reasoning import THINK_END, THINK_START


@dataclass(frozen=True, slots=True)
class ThinkTags:
    """The reasoning tags as token ids of the served vocabulary."""

    start: int
    end: int

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> ThinkTags | None:
        """The tags, or None when the checkpoint does not think (its template never writes them) or its vocabulary
        spells them in pieces (a grammar could not tell the tags from text)."""
        start, end = tokenizer.encode(THINK_START), tokenizer.encode(THINK_END)
        if len(start) != 1 or len(end) != 1 or THINK_END not in (tokenizer.chat_template_source or ""):
            return None
        return cls(start[0], end[0])

    @staticmethod
    def thinking(prompt: str) -> bool:
        """Whether the answer to chat `prompt` (rendered) may think: its template did not close a span already."""
        return not prompt.rstrip().endswith(THINK_END)

    def before(self, spec: StructuredOutput, ends: Iterable[int]) -> StructuredOutput:
        """`spec`, which the answer may now reach after a reasoning span; `ends`: the tokens that end the answer
        (EOS, stop ids), which the span's text holds out."""
        return dataclasses.replace(spec, reasoning=ReasoningSpan(self.start, self.end, tuple(sorted(set(ends)))))
