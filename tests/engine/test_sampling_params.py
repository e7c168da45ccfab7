"""SamplingParams crosses the router -> replica Ray call as keyword arguments: they must rebuild it exactly."""

from __future__ import annotations

import dataclasses

import pytest

from engine.sampling_params import FIELD_NAMES, InvalidRequest, SamplingParams


def test_as_kwargs_rebuilds_every_field() -> None:
    params = SamplingParams(
        temperature=0.7, top_p=0.9, top_k=5, min_p=0.1, max_tokens=7, min_tokens=2, stop=("a", "bc"),
        stop_token_ids=(3, 4), ignore_eos=True, seed=11, logprobs=2, presence_penalty=0.5,
        frequency_penalty=-0.5, repetition_penalty=1.2,
    )
    assert set(params.as_kwargs()) == {f.name for f in dataclasses.fields(SamplingParams)} == set(FIELD_NAMES)
    assert all(params.as_kwargs()[f.name] != f.default for f in dataclasses.fields(SamplingParams))  # none left default
    assert SamplingParams.from_kwargs(**params.as_kwargs()) == params


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
