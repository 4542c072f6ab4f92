"""SamplingParams refuse what the wire types cannot carry and what would fail a shared engine step,
naming the field; temperatures too small to divide by sample greedily."""
from __future__ import annotations

import math

import pytest

from kvweave.errors import InvalidRequestError
from kvweave.sampling_params import SamplingParams


@pytest.mark.parametrize("fields, field", [
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"top_p": math.nan}, "top_p"),
    ({"max_tokens": 2**32}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"top_k": 2**31}, "top_k"),
    ({"seed": 2**63}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"min_tokens": 17}, "min_tokens"),  # more than max_tokens (16)
    ({"stop_token_ids": [2**32]}, "stop_token_ids"),
    ({"stop_token_ids": list(range(1025))}, "stop_token_ids"),
    ({"stop": ["x"] * 65}, "stop"),
    ({"stop": ["x" * 1025]}, "stop"),
    ({"logprobs": 21}, "logprobs"),
])
def test_out_of_range_fields_are_refused_by_name(fields, field):
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**fields)


def test_edges_are_accepted_and_tiny_temperatures_are_greedy():
    SamplingParams(max_tokens=2**32 - 1, top_k=2**31 - 1, seed=-(2**63), min_tokens=2**32 - 1,
                   stop_token_ids=[2**32 - 1] * 1024, stop=["x" * 1024] * 64)
    assert SamplingParams(temperature=1e-40).greedy and SamplingParams(temperature=0).greedy
    assert not SamplingParams(temperature=1e-3).greedy
