"""One choice of a request (SamplingParams.n) as its client sees it: the tokens sent, and its text cut at a stop
string, split into reasoning, text and tool calls. Each choice stops on its own, so each has its own."""

from __future__ import annotations

from collections.abc import Sequence

from engine.sequence import FinishReason
from engine.tokenizer import Tokenizer
from proto import nanoserve_pb2 as pb
from router.reasoning import ReasoningSplitter
from router.text_stream import TextStream
from router.tool_calls import ToolCallParser
from router.validation import PreparedRequest


class ChoiceOutput:
    """The output of choice `index` across its attempts: every token sent, and the parsers of its text."""

    def __init__(self, index: int, prepared: PreparedRequest, tokenizer: Tokenizer) -> None:
        self.index = index
        self.token_ids: list[int] = []
        self.finish_reason: FinishReason | None = None
        self._text = TextStream(tokenizer, prepared.params.stop)
        self._reasoning = ReasoningSplitter() if prepared.split_reasoning else None
        self._tool_calls = ToolCallParser() if prepared.parse_tool_calls else None  # parses the reply, not reasoning

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, token_ids: Sequence[int], engine_finish: FinishReason | None) -> tuple[str, str, list[pb.ToolCall]]:
        """Apply new tokens (and the engine's finish reason, if it finished the choice); the (reasoning, text,
        tool calls) to send now. A stop string in the text finishes the choice too."""
        self.token_ids += token_ids
        text = self._text.add(token_ids)
        self.finish_reason = "stop" if self._text.hit_stop else engine_finish
        if self.finished:
            text += self._text.finish()
        reasoning, text = self._reasoning.split(text, self.finished) if self._reasoning else ("", text)
        text, tool_calls = self._tool_calls.parse(text, self.finished) if self._tool_calls else (text, [])
        return reasoning, text, tool_calls
