"""Structured output through the engine (engine/grammar.py): the tiny random model's output, which is gibberish
unconstrained, matches its schema, regex, choice or grammar; in batches with unconstrained rows; resumed; refused
by name when the spec is bad."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace
from typing import Any

import jsonschema
import pytest

from engine import LLMEngine, SamplingParams
from engine.sampling_params import InvalidRequest
from engine.structured_output import StructuredOutput
from tests.engine.llm_engine_runs import HELLO, assert_idle, drain, many, one, tokens_of

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 2},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}
REGEX = r"[a-c]{3}-[0-9]{2,4}"
CHOICE = ["yes", "no", "maybe not"]
GREEDY = dict(temperature=0.0)
SAMPLED = dict(temperature=1.0, top_p=0.95, top_k=50)
THINK, END_THINK = 151667, 151668  # Qwen3's <think> and </think>
EOS = [151643, 151645]
SPAN = {"start": THINK, "end": END_THINK, "ends": EOS}
MODES = pytest.mark.parametrize("mode", [GREEDY, SAMPLED], ids=["greedy", "sampled"])


def params(structured_output: Any = None, max_tokens: int = 120, seed: int = 0, **kwargs: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, seed=seed, structured_output=structured_output, **kwargs)


def closing_bias(engine: LLMEngine) -> dict[int, float]:
    """A pull towards '"' and '}', so the random model ends its free-form strings and objects in a few tokens."""
    return {engine.tokenizer.encode(text)[0]: 8.0 for text in ('"', "}")}


@MODES
def test_json_schema_output_validates(engine: LLMEngine, mode: dict[str, Any]) -> None:
    results = many(engine, [HELLO, "{", [5, 6, 7]], params({"json_schema": SCHEMA}, **mode))
    for result in results:
        assert result["finish_reason"] == "stop", result["text"]
        jsonschema.validate(json.loads(result["text"]), SCHEMA)


def test_without_the_schema_the_output_is_no_json(engine: LLMEngine) -> None:
    """The control: unconstrained, the random model writes no JSON (so the schema is what made it valid)."""
    for mode in (GREEDY, SAMPLED):
        text = one(engine, HELLO, params(**mode))["text"]
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)


@MODES
def test_json_object_output_is_an_object(engine: LLMEngine, mode: dict[str, Any]) -> None:
    for seed in range(3):
        result = one(engine, HELLO, params({"json_object": True}, 200, seed, logit_bias=closing_bias(engine), **mode))
        assert result["finish_reason"] == "stop", result["text"]
        assert isinstance(json.loads(result["text"]), dict)


@MODES
def test_regex_and_choice_outputs_match(engine: LLMEngine, mode: dict[str, Any]) -> None:
    for seed in range(3):
        assert re.fullmatch(REGEX, one(engine, HELLO, params({"regex": REGEX}, seed=seed, **mode))["text"])
        assert one(engine, HELLO, params({"choice": CHOICE}, seed=seed, **mode))["text"] in CHOICE


def test_a_grammar_in_lark_and_in_gbnf(engine: LLMEngine) -> None:
    lark = 'start: "(" item ("," item)* ")"\nitem: /[0-9]/ | "x"'
    gbnf = 'root ::= "<" [a-z] [a-z]? ">"'
    assert re.fullmatch(r"\((\d|x)(,(\d|x))*\)", one(engine, HELLO, params({"grammar": lark}, **SAMPLED))["text"])
    assert re.fullmatch(r"<[a-z]{1,2}>", one(engine, HELLO, params({"grammar": gbnf}, **SAMPLED))["text"])


def test_a_complete_grammar_allows_a_stop_id(engine: LLMEngine) -> None:
    """Once the output is complete, EOS or a stop id: here the stop id, which logit_bias favours."""
    stop_id = engine.tokenizer.encode("!")[0]
    result = one(engine, HELLO, params({"choice": ["ok"]}, stop_token_ids=[stop_id], logit_bias={stop_id: 50.0},
                                       **GREEDY))
    assert result["token_ids"][-1] == stop_id and result["text"].startswith("ok")


def test_a_reasoning_span_may_open_the_output_before_the_grammar_holds_it(engine: LLMEngine) -> None:
    """With a span, the output may open with free reasoning between the tags, and what follows matches the schema;
    the control: without it, the same pull towards <think> cannot open one, and the output is JSON from its start."""
    bias = {THINK: 100.0, END_THINK: 12.0, **closing_bias(engine)}
    thought = one(engine, HELLO, params({"json_schema": SCHEMA, "reasoning": SPAN}, logit_bias=bias, **SAMPLED))
    ids = thought["token_ids"]
    assert ids[0] == THINK and ids.index(END_THINK) > 1 and thought["finish_reason"] == "stop"
    jsonschema.validate(json.loads(engine.tokenizer.decode(ids[ids.index(END_THINK) + 1:])), SCHEMA)
    control = one(engine, HELLO, params({"json_schema": SCHEMA}, logit_bias=bias, **SAMPLED))
    assert THINK not in control["token_ids"]
    jsonschema.validate(json.loads(control["text"]), SCHEMA)


def test_a_span_never_closed_runs_into_max_tokens(engine: LLMEngine) -> None:
    """The span holds out the tokens that would end the output (`ends`: EOS, stop ids), so a model that never
    closes it runs into max_tokens ("length") instead of ending mid-thought with no answer; the control: a span
    without them ends at once on the pulled EOS."""
    stop_id = engine.tokenizer.encode("!")[0]
    pull = {THINK: 100.0, stop_id: 50.0, **{t: 50.0 for t in EOS}}
    spec = {"regex": "[a-c]+", "reasoning": {**SPAN, "ends": [*EOS, stop_id]}}
    held = one(engine, HELLO, params(spec, max_tokens=12, stop_token_ids=[stop_id], logit_bias=pull, **GREEDY))
    assert held["finish_reason"] == "length" and held["token_ids"][0] == THINK and len(held["token_ids"]) == 12
    assert not {END_THINK, stop_id, *EOS} & set(held["token_ids"])
    spec["reasoning"]["ends"] = []
    control = one(engine, HELLO, params(spec, max_tokens=12, stop_token_ids=[stop_id], logit_bias=pull, **GREEDY))
    assert control["finish_reason"] == "stop" and len(control["token_ids"]) == 2


@MODES
def test_unconstrained_rows_beside_constrained_ones_sample_as_alone(engine: LLMEngine, mode: dict[str, Any]) -> None:
    """A batch mixing both kinds (and so sampling after the step before is read) changes no free row's tokens."""
    free = [params(max_tokens=30, seed=i, ignore_eos=True, **mode) for i in range(3)]
    alone = many(engine, [HELLO] * 3, free)
    constrained = [params({"json_schema": SCHEMA}, seed=9, **mode), params({"regex": REGEX}, seed=8, **mode)]
    mixed = many(engine, [HELLO] * 5, [free[0], constrained[0], free[1], constrained[1], free[2]])
    assert [r["token_ids"] for r in (mixed[0], mixed[2], mixed[4])] == [r["token_ids"] for r in alone]
    jsonschema.validate(json.loads(mixed[1]["text"]), SCHEMA)
    assert re.fullmatch(REGEX, mixed[3]["text"])
    drain(engine)  # the step launched before the last request's stop was known
    assert_idle(engine)


@MODES
def test_a_resumed_request_continues_as_undisturbed(engine: LLMEngine, mode: dict[str, Any]) -> None:
    """A failover resubmits prompt + the tokens already sent: the grammar's state follows them, so the rest
    equals the undisturbed run's (the control: a matcher that starts over does not)."""
    prompt = engine.tokenizer.encode(HELLO)
    undisturbed = one(engine, prompt, params({"json_schema": SCHEMA}, **mode))["token_ids"]
    for cut in (1, 5, len(undisturbed) // 2):
        sent = undisturbed[:cut]
        rest = params({"json_schema": SCHEMA}, 120 - cut, **mode)
        engine.add_request(prompt + sent, rest, "resumed", resumed_tokens=cut)
        assert sent + tokens_of(drain(engine)["resumed"]) == undisturbed
        engine.add_request(prompt + sent, rest, "started-over", resumed_tokens=0)
        assert sent + tokens_of(drain(engine)["started-over"]) != undisturbed
    assert_idle(engine)


def test_a_request_resumed_in_or_after_its_reasoning_continues_as_undisturbed(engine: LLMEngine) -> None:
    """A failover inside the span, at its end tag or just after it: the grammar's state follows the tokens sent."""
    prompt = engine.tokenizer.encode(HELLO)
    bias = {THINK: 100.0, END_THINK: 12.0, **closing_bias(engine)}
    spec = {"json_schema": SCHEMA, "reasoning": SPAN}
    undisturbed = one(engine, prompt, params(spec, logit_bias=bias, **SAMPLED))["token_ids"]
    end = undisturbed.index(END_THINK)
    for cut in (1, end, end + 1):
        engine.add_request(prompt + undisturbed[:cut], params(spec, 120 - cut, logit_bias=bias, **SAMPLED), "resumed",
                           resumed_tokens=cut)
        assert undisturbed[:cut] + tokens_of(drain(engine)["resumed"]) == undisturbed
    assert_idle(engine)


@pytest.mark.parametrize("structured_output, field", [
    ({"json_schema": {"type": "foo"}}, "structured_output.json_schema"),
    ({"json_schema": {"properties": 3}}, "structured_output.json_schema"),
    ({"regex": "a("}, "structured_output.regex"),
    ({"grammar": "start: foo"}, "structured_output.grammar"),
    ({"grammar": "root ::= ("}, "structured_output.grammar"),
    ({"choice": []}, "structured_output.choice"),
    ({"regex": "a", "choice": ["b"]}, "structured_output"),
])
def test_a_bad_spec_is_refused_by_name_and_leaks_nothing(engine: LLMEngine, structured_output: Any, field: str) -> None:
    with pytest.raises(InvalidRequest) as error:
        engine.add_request(HELLO, params(structured_output))
    assert error.value.field == field
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):  # a batch of which one is bad queues nothing
        many(engine, [HELLO, HELLO], [params({"regex": "a"}), params(structured_output)])
    drain(engine)
    assert_idle(engine)


def test_resumed_tokens_off_the_grammar_are_refused(engine: LLMEngine) -> None:
    prompt = engine.tokenizer.encode(HELLO)
    with pytest.raises(InvalidRequest) as error:
        engine.add_request(prompt + engine.tokenizer.encode("nope"), params({"regex": "[0-9]+"}), resumed_tokens=1)
    assert error.value.field == "resumed_tokens"
    assert_idle(engine)


def test_aborted_constrained_requests_free_their_blocks(engine: LLMEngine) -> None:
    ids = [engine.add_request(HELLO, params({"json_schema": SCHEMA}, seed=i)) for i in range(3)]
    engine.add_request(HELLO, params(max_tokens=40))
    for _ in range(4):
        engine.step()
    for request_id in ids:
        engine.abort(request_id)
    drain(engine)
    assert_idle(engine)


def test_generate_takes_the_spec_as_a_keyword(engine: LLMEngine) -> None:
    result = one(engine, HELLO, max_tokens=20, temperature=0.0, structured_output={"choice": CHOICE})
    assert result["text"] in CHOICE


def test_a_steps_tokens_advance_every_matcher_and_one_off_the_grammar_is_logged(
    engine: LLMEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """One parallel call advances a step's rows (Grammars.accept); each matcher takes its own token, and a row whose
    token breaks its grammar is the one left in error, named in the log."""
    digit, letter = engine.tokenizer.encode("7"), engine.tokenizer.encode("x")
    assert len(digit) == len(letter) == 1
    rows = [SimpleNamespace(request_id=f"r{i}", matcher=m)
            for i, m in enumerate(engine.grammars.matchers(StructuredOutput(regex="[0-9]+"), [], 2))]
    with caplog.at_level("WARNING", logger="engine.grammar"):
        engine.grammars.accept([(rows[0], digit[0]), (rows[1], letter[0])])  # type: ignore[list-item]
    assert not rows[0].matcher.is_error() and rows[1].matcher.is_error()
    assert [r.message.split(":")[0] for r in caplog.records] == ["request r1"]
