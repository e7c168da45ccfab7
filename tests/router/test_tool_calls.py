"""Qwen's <tool_call> blocks parsed into calls apart from the text, whole or in any pieces (router/tool_calls.py)."""

from __future__ import annotations

import itertools

import pytest

from router.tool_calls import ToolCallParser

WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
TIME = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
Call = tuple[str, str]  # (name, arguments)
WEATHER_CALL: Call = ("get_weather", '{"city": "Paris", "days": 2}')
TIME_CALL: Call = ("get_time", "{}")

ANSWERS: dict[str, tuple[str, tuple[str, list[Call]]]] = {
    "a call": (WEATHER, ("", [WEATHER_CALL])),
    "text before a call": ("Let me look.\n\n" + WEATHER, ("Let me look.\n\n", [WEATHER_CALL])),
    "several calls": (WEATHER + "\n" + TIME + "\n", ("", [WEATHER_CALL, TIME_CALL])),
    "text between and after": (WEATHER + "\nthen \n" + TIME + " done", ("\nthen \n done", [WEATHER_CALL, TIME_CALL])),
    "no call": ("Paris is sunny.  \n", ("Paris is sunny.  \n", [])),
    "whitespace only": ("\n \n", ("\n \n", [])),
    "not JSON": ("ok <tool_call>{name: f}</tool_call>", ("ok <tool_call>{name: f}</tool_call>", [])),
    "no arguments object": ('<tool_call>{"name": "f", "arguments": "x=1"}</tool_call>',
                            ('<tool_call>{"name": "f", "arguments": "x=1"}</tool_call>', [])),
    "no name": ('\n<tool_call>{"arguments": {}}</tool_call>', ('\n<tool_call>{"arguments": {}}</tool_call>', [])),
    "a malformed call after a good one": (
        WEATHER + "\n<tool_call>[1]</tool_call>", ("<tool_call>[1]</tool_call>", [WEATHER_CALL])),
    "unclosed at the end": (' <tool_call>{"name": "f", "argu', (' <tool_call>{"name": "f", "argu', [])),
    "a bare start tag at the end": ("x <tool_call>", ("x <tool_call>", [])),
    "a tag's prefix at the end": ("x <tool_ca", ("x <tool_ca", [])),
    "an end tag alone": ("</tool_call> ", ("</tool_call> ", [])),
    "unicode arguments": ('<tool_call>{"name": "say", "arguments": {"text": "héllo 世界"}}</tool_call>',
                          ("", [("say", '{"text": "héllo 世界"}')])),
}


def parse_in_pieces(text: str, cuts: tuple[int, ...]) -> tuple[str, list[Call]]:
    """Feed `text` cut at `cuts` (the last piece final); the joined text and calls."""
    parser, out, calls = ToolCallParser(), "", []
    bounds = [0, *cuts, len(text)]
    for i in range(len(bounds) - 1):
        piece, piece_calls = parser.parse(text[bounds[i] : bounds[i + 1]], final=i == len(bounds) - 2)
        out += piece
        calls += [(c.name, c.arguments) for c in piece_calls]
    return out, calls


@pytest.mark.parametrize("name", ANSWERS)
def test_the_whole_answer_parses_as_expected(name: str) -> None:
    text, expected = ANSWERS[name]
    assert parse_in_pieces(text, ()) == expected


@pytest.mark.parametrize("name", ANSWERS)
def test_every_split_in_two_and_three_pieces_parses_as_the_whole(name: str) -> None:
    text, expected = ANSWERS[name]
    for cuts in itertools.chain(itertools.combinations(range(len(text) + 1), 1),
                                itertools.combinations(range(0, len(text) + 1, 3), 2)):
        assert parse_in_pieces(text, cuts) == expected, cuts


def test_character_by_character_parses_as_the_whole() -> None:
    text = "Sure.\n" + WEATHER + "\n\n" + TIME + "\n<tool_call>oops</tool_call>\n"
    expected = ("Sure.\n<tool_call>oops</tool_call>\n", [WEATHER_CALL, TIME_CALL])
    assert parse_in_pieces(text, ()) == expected
    assert parse_in_pieces(text, tuple(range(1, len(text)))) == expected


def test_what_is_held_back_and_when_a_call_is_sent() -> None:
    parser = ToolCallParser()
    assert parser.parse("Hi <tool_") == ("Hi ", [])  # may start a call
    assert parser.parse('call>{"name": "f", "arguments": {}}</tool') == ("", [])  # a call, not yet closed
    text, [call] = parser.parse("_call>\n")  # sent whole at its end tag; the newline may still touch a call
    assert text == "" and (call.name, call.arguments) == ("f", "{}")
    assert call.id.startswith("call_") and len(call.id) == len("call_") + 24
    assert parser.parse("\nBye") == ("\n\nBye", [])  # text after all: the whitespace with it
    assert parser.parse(" ") == (" ", [])  # text is not held once a run has some


def test_each_call_gets_its_own_id() -> None:
    _, calls = ToolCallParser().parse(WEATHER + TIME + WEATHER, final=True)
    assert len({c.id for c in calls}) == 3
