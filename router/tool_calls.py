"""A chat answer's tool calls apart from its text, as it streams (vLLM's hermes parser, which it uses for Qwen).

Qwen2.5 and Qwen3 call a tool by writing `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, a call
a block. A block whose JSON parses to a name and an arguments object becomes a ToolCall, sent whole once
its closing tag arrives; any other block (not JSON, no name, unclosed at the end) stays text, as the model
wrote it. Text outside the blocks is the answer's text, except whitespace-only text next to a call (the
newlines between calls), which is dropped. The parse runs in the router on the text the client is sent, so
any chunking, and a stream failed over mid-way, parses as the whole answer does.
"""

from __future__ import annotations

import json
import uuid

from proto import nanoserve_pb2 as pb
from router.text_stream import held_back

CALL_START, CALL_END = "<tool_call>", "</tool_call>"


class ToolCallParser:
    """Feed the answer's text in pieces; each call returns the (text, tool calls) it settles. Held back until
    settled: a possible start tag, a call until its end tag, and whitespace that may turn out to touch a call."""

    def __init__(self) -> None:
        self._held = ""  # unsettled text: in a block (after its start tag), or the current run's held tail
        self._in_call = False
        self._run_has_text = False  # the text since the last block has more than whitespace (it is being sent)
        self._after_call = False  # the last block was a call: whitespace-only text after it is dropped
        self._before_block = ""  # whitespace-only text before the open block: dropped if the block is a call

    def parse(self, text: str, final: bool = False) -> tuple[str, list[pb.ToolCall]]:
        text, self._held = self._held + text, ""
        out: list[str] = []
        calls: list[pb.ToolCall] = []
        while text or (final and self._in_call):
            if self._in_call:
                text = self._in_block(text, final, out, calls)
            else:
                text = self._in_run(text, final, out)
        if final and not self._in_call and not self._run_has_text and not self._after_call:
            out.append(self._held)  # an answer ending in whitespace that touches no call keeps it
        if final:
            self._held = ""
        return "".join(out), calls

    def _in_run(self, text: str, final: bool, out: list[str]) -> str:
        """Text outside blocks, up to the next start tag; what follows it (the block), or ""."""
        start = text.find(CALL_START)
        run = text if start < 0 else text[:start]
        held = 0 if final or start >= 0 else held_back(run, (CALL_START,))
        run, self._held = run[: len(run) - held], run[len(run) - held:]
        if not self._run_has_text and run.strip():
            self._run_has_text = True
        if self._run_has_text:
            out.append(run)
        elif start >= 0 and not self._after_call:
            self._before_block = run
        elif start < 0:  # whitespace only so far: hold it with any tag prefix
            self._held = run + self._held
        if start < 0:
            return ""
        self._in_call, self._run_has_text, self._held = True, False, ""
        return text[start + len(CALL_START):]

    def _in_block(self, text: str, final: bool, out: list[str], calls: list[pb.ToolCall]) -> str:
        """The body of an open block; what follows its end tag, or "" (the block held, or text at the end)."""
        end = text.find(CALL_END)
        if end < 0:
            if final:  # never closed: text, as written
                out.append(self._before_block + CALL_START + text)
                self._in_call, self._after_call, self._before_block = False, False, ""
            else:
                self._held = text
            return ""
        call = _call(text[:end])
        if call is None:
            out.append(self._before_block + CALL_START + text[: end + len(CALL_END)])
        else:
            calls.append(call)
        self._in_call, self._after_call, self._before_block = False, call is not None, ""
        return text[end + len(CALL_END):]


def _call(body: str) -> pb.ToolCall | None:
    """The call a block's body describes; None when it is not a JSON object with a name and an arguments object."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    if not isinstance(value.get("arguments"), dict):
        return None
    return pb.ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=value["name"],
                       arguments=json.dumps(value["arguments"], ensure_ascii=False))
