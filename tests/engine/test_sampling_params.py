"""SamplingParams crosses the router -> replica Ray call as keyword arguments: they must rebuild it exactly."""

from __future__ import annotations

import dataclasses

import pytest

from engine.sampling_params import FIELD_NAMES, InvalidRequest, SamplingParams


def test_as_kwargs_rebuilds_every_field() -> None:
    params = SamplingParams(
        temperature=0.7, top_p=0.9, top_k=5, min_p=0.1, max_tokens=7, min_tokens=2, stop=("a", "bc"),
        stop_token_ids=(3, 4), ignore_eos=True, seed=11, logprobs=2, presence_penalty=0.5,
        frequency_penalty=-0.5, repetition_penalty=1.2, logit_bias={9: -1.5, 2: 3.0}, allowed_token_ids=[2, 5], n=3,
    )
    assert set(params.as_kwargs()) == {f.name for f in dataclasses.fields(SamplingParams)} == set(FIELD_NAMES)
    # None left default but structured_output, which takes no min_tokens: it goes in a copy without them.
    assert [f.name for f in dataclasses.fields(SamplingParams) if params.as_kwargs()[f.name] == f.default] == [
        "structured_output"]
    structured = dataclasses.replace(params, min_tokens=0, structured_output={"choice": ["a", "b"]})
    for p in (params, structured):
        assert SamplingParams.from_kwargs(**p.as_kwargs()) == p


def test_from_kwargs_names_the_unknown_parameter() -> None:
    with pytest.raises(ValueError, match=r"unknown sampling parameter\(s\): max_token; known: .*max_tokens"):
        SamplingParams.from_kwargs(max_token=3)


def test_a_bad_value_is_an_invalid_request_naming_the_field() -> None:
    """A ValueError, as the Python API always raised, that also carries the field as an attribute."""
    with pytest.raises(ValueError, match=r"^top_p: must be in \(0, 1\], got 1.5$") as error:
        SamplingParams(top_p=1.5)
    assert isinstance(error.value, InvalidRequest)
    assert (error.value.field, error.value.message) == ("top_p", "must be in (0, 1], got 1.5")
    assert error.value.within("params").field == "params.top_p"


@pytest.mark.parametrize("given, field, message", [
    (dict(logit_bias={5: 100.5}), "logit_bias[5]", "must be in [-100, 100], got 100.5"),
    (dict(logit_bias={-1: 1.0}), "logit_bias", "token ids must be >= 0, got -1"),
    (dict(logit_bias=[(4, 1.0), (4, 2.0)]), "logit_bias", "names a token id twice"),
    (dict(logit_bias="4"), "logit_bias", "must map token ids to biases, got '4'"),
    (dict(allowed_token_ids=[]), "allowed_token_ids", "must not be empty (leave it unset to allow every token)"),
    (dict(allowed_token_ids=[3, -2]), "allowed_token_ids", "must be >= 0, got -2"),
])
def test_logit_bias_and_allowed_token_ids_are_checked(given: dict, field: str, message: str) -> None:
    with pytest.raises(InvalidRequest) as error:
        SamplingParams(**given)
    assert (error.value.field, error.value.message) == (field, message)


def test_token_ids_outside_the_vocabulary_are_named() -> None:
    params = SamplingParams(stop_token_ids=[3], logit_bias={7: 1.0}, allowed_token_ids=[1, 12])
    params.check_token_ids(13)
    with pytest.raises(InvalidRequest, match=r"^allowed_token_ids\[1\]: 12 is outside the vocabulary \[0, 12\)$"):
        params.check_token_ids(12)
    with pytest.raises(InvalidRequest, match=r"^logit_bias\[7\]: 7 is outside"):
        params.check_token_ids(7)
