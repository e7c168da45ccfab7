"""SamplingParams crosses the router -> replica Ray call as keyword arguments: they must rebuild it exactly."""

from __future__ import annotations

import dataclasses

import pytest

from engine.sampling_params import FIELD_NAMES, SamplingParams


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
