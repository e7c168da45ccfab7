"""router/reasoning_grammar.py through the validator: a chat answer with thinking on (Qwen3's template, the
reasoning parser on) gets a grammar that may open with a reasoning span; thinking off, or no reasoning parser,
a template that does not think or a text prompt, keeps the grammar that holds the answer from its first token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer as HFTokenizer

from engine.qwen_tokenizer import CHAT_TEMPLATE
from engine.structured_output import ReasoningSpan
from engine.tokenizer import Tokenizer
from proto import nanoserve_pb2 as pb
from router.validation import RequestValidator
from tests.router.test_validation import INFO

THINK, END_THINK, IM_END = 151667, 151668, 151645
NOT_THINKING = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # a template that never writes the tags


def validator(qwen_tokenizer_dir: Path, template: str = CHAT_TEMPLATE,
              parser: str | None = "qwen3") -> RequestValidator:
    hf = HFTokenizer.from_file(str(qwen_tokenizer_dir / "tokenizer.json"))
    return RequestValidator(Tokenizer(hf, frozenset({IM_END}), chat_template=template), INFO, parser)


def chat(thinking: bool | None = None, tool_choice: str = "", stop_token_ids: tuple[int, ...] = (),
         ) -> pb.GenerateRequest:
    """A chat request held to a regex (a tool call with `tool_choice`); `thinking`: enable_thinking, if given."""
    messages = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")])
    if thinking is not None:
        messages.template_kwargs.update({"enable_thinking": thinking})
    params = pb.SamplingParams(max_tokens=8, stop_token_ids=stop_token_ids)
    if tool_choice:
        messages.tools.add(name="f")
        messages.tool_choice.mode = tool_choice
    else:
        params.structured_output.regex = "[a-c]+"
    return pb.GenerateRequest(chat=messages, params=params)


def reasoning(check: RequestValidator, request: pb.GenerateRequest) -> Any:
    spec = check.prepare(request).params.structured_output
    assert spec is not None
    return spec.reasoning


def test_thinking_on_lets_the_answer_reason_before_the_grammar_holds_it(qwen_tokenizer_dir: Path) -> None:
    check = validator(qwen_tokenizer_dir)
    span = ReasoningSpan(THINK, END_THINK, (7, IM_END))  # EOS and the stop id held out of the span
    assert reasoning(check, chat(stop_token_ids=(7,))) == span
    assert reasoning(check, chat(thinking=True)) == ReasoningSpan(THINK, END_THINK, (IM_END,))
    assert reasoning(check, chat(tool_choice="required")) == ReasoningSpan(THINK, END_THINK, (IM_END,))


@pytest.mark.parametrize(("case", "request_", "template", "parser"), [
    ("enable_thinking false", chat(thinking=False), CHAT_TEMPLATE, "qwen3"),
    ("no reasoning parser", chat(), CHAT_TEMPLATE, None),
    ("a template that does not think", chat(), NOT_THINKING, "qwen3"),
    ("a text prompt", pb.GenerateRequest(text="hi", params=chat().params), CHAT_TEMPLATE, "qwen3"),
    ("a forced call, thinking off", chat(thinking=False, tool_choice="required"), CHAT_TEMPLATE, "qwen3"),
])
def test_otherwise_the_grammar_holds_the_answer_from_its_first_token(
    qwen_tokenizer_dir: Path, case: str, request_: pb.GenerateRequest, template: str, parser: str | None
) -> None:
    assert reasoning(validator(qwen_tokenizer_dir, template, parser), request_) is None, case
