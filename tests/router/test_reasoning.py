"""Qwen3's reasoning span apart from the content, whole or in any pieces (router/reasoning.py)."""

from __future__ import annotations

import pytest

from router.reasoning import ReasoningSplitter

ANSWERS = {
    "thinking": ("<think>\nLet me see: 2 + 2.\n</think>\n\nIt is 4.", ("\nLet me see: 2 + 2.\n", "\n\nIt is 4.")),
    "not thinking": ("It is 4. <think>not a span</think>", ("", "It is 4. <think>not a span</think>")),
    "cut mid-thought": ("<think>\nhmm, </thi", ("\nhmm, </thi", "")),
    "a lone <": ("<", ("", "<")),
    "empty span": ("<think></think>ok", ("", "ok")),
}


def split_in_pieces(text: str, size: int) -> tuple[str, str]:
    splitter, reasoning, content = ReasoningSplitter(), "", ""
    pieces = [text[i : i + size] for i in range(0, len(text), size)]
    for i, piece in enumerate(pieces):
        r, c = splitter.split(piece, final=i == len(pieces) - 1)
        reasoning, content = reasoning + r, content + c
    return reasoning, content


@pytest.mark.parametrize("name", ANSWERS)
def test_any_pieces_split_as_the_whole_answer(name: str) -> None:
    text, expected = ANSWERS[name]
    assert ReasoningSplitter().split(text, final=True) == expected
    for size in (1, 2, 3, 5, 8):
        assert split_in_pieces(text, size) == expected, size


def test_a_possible_tag_is_held_back_until_settled() -> None:
    splitter = ReasoningSplitter()
    assert splitter.split("<thi") == ("", "")  # may open a span
    assert splitter.split("nk>Hmm </th") == ("Hmm ", "")  # may close it
    assert splitter.split("ink>Hi") == ("", "Hi")
    assert splitter.split("<think>") == ("", "<think>")  # content is never held
