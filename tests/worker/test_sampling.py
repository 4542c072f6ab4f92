"""Sampling parameters and the sampler."""
from __future__ import annotations

import math

import pytest
import torch

from kvweave.errors import InvalidRequestError
from kvweave.sampling_params import SamplingParams
from worker.sampling import _filter_top_k_top_p, sample

PROBS = [0.5, 0.3, 0.15, 0.05]
"""A hand-made distribution: cumulative 0.5, 0.8, 0.95, 1.0."""


def probs_logits(probs: list[float] = PROBS) -> torch.Tensor:
    return torch.tensor(probs).log()


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"top_p": -0.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"stop": ""}, "stop"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"stop": [3]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"seed": "7"}, "seed"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"min_tokens": -1}, "min_tokens"),
])
def test_invalid_params_raise_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**kwargs)


def test_validate_catches_later_changes() -> None:
    params = SamplingParams()
    params.max_tokens = 0
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        params.validate()


def test_valid_edge_values() -> None:
    SamplingParams(max_tokens=1, temperature=0, top_p=1.0, top_k=-1, logprobs=0, seed=0)
    SamplingParams(top_k=0, top_p=1e-6, logprobs=20, stop=["a", "b"], stop_token_ids=[0])
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(temperature=0).greedy and not SamplingParams(temperature=0.01).greedy


def test_greedy_is_argmax() -> None:
    logits = torch.randn(5, 64, generator=seeded(0))
    res = sample(logits, [SamplingParams(temperature=0)] * 5, [None] * 5)
    assert res.token_ids == logits.argmax(-1).tolist()
    assert res.logprobs is None


def test_top_k_1_equals_greedy() -> None:
    logits = torch.randn(8, 64, generator=seeded(1))
    params = [SamplingParams(temperature=1.5, top_k=1, seed=i) for i in range(8)]
    for trial in range(5):
        res = sample(logits, params, [seeded(100 * trial + i) for i in range(8)])
        assert res.token_ids == logits.argmax(-1).tolist()


@pytest.mark.parametrize("top_p, kept", [
    (0.3, {0}), (0.49, {0}), (0.51, {0, 1}), (0.79, {0, 1}), (0.81, {0, 1, 2}), (0.94, {0, 1, 2}),
    (0.96, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3}),
])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p: float, kept: set[int]) -> None:
    filtered = _filter_top_k_top_p(probs_logits(), -1, top_p)
    assert set(torch.isfinite(filtered).nonzero().flatten().tolist()) == kept
    # The kept tokens keep their logits, so they keep their relative probabilities.
    idx = sorted(kept)
    assert torch.equal(filtered[idx], probs_logits()[idx])


@pytest.mark.parametrize("top_k, kept", [(1, {0}), (2, {0, 1}), (3, {0, 1, 2}), (4, {0, 1, 2, 3}), (0, {0, 1, 2, 3})])
def test_top_k_keeps_the_k_most_likely(top_k: int, kept: set[int]) -> None:
    # Shuffled order, so position does not give the answer away.
    logits = probs_logits([0.15, 0.5, 0.05, 0.3])
    order = [1, 3, 0, 2]  # ids by decreasing probability
    filtered = _filter_top_k_top_p(logits, top_k, 1.0)
    assert set(torch.isfinite(filtered).nonzero().flatten().tolist()) == {order[i] for i in kept}


def test_top_k_then_top_p() -> None:
    # top-k 3 renormalizes to ~[0.526, 0.316, 0.158]; top-p 0.8 then keeps two.
    filtered = _filter_top_k_top_p(probs_logits(), 3, 0.8)
    assert set(torch.isfinite(filtered).nonzero().flatten().tolist()) == {0, 1}


def test_sampled_tokens_stay_inside_the_top_p_set_and_cover_it() -> None:
    n = 400
    logits = probs_logits().repeat(n, 1)
    res = sample(logits, [SamplingParams(top_p=0.85, seed=i) for i in range(n)], [seeded(i) for i in range(n)])
    counts = [res.token_ids.count(t) for t in range(4)]
    assert counts[3] == 0
    # Renormalized to 0.5/0.95, 0.3/0.95, 0.15/0.95: each kept token shows up (P(miss) < 1e-25).
    assert all(c > 0 for c in counts[:3])


def test_draws_follow_the_distribution_and_never_pick_a_zero_probability_token() -> None:
    probs = [0.5, 0.0, 0.3, 0.15, 0.0, 0.05]  # zeros inside the CDF: flat steps that u never lands on
    n = 20000
    logits = torch.tensor(probs).log().repeat(n, 1)
    torch.manual_seed(0)
    res = sample(logits, [SamplingParams(temperature=1.0)] * n, [None] * n)
    counts = [res.token_ids.count(t) for t in range(len(probs))]
    assert counts[1] == counts[4] == 0
    for t, p in enumerate(probs):
        if p:  # within 4 standard deviations of the expected frequency
            assert abs(counts[t] / n - p) < 4 * math.sqrt(p * (1 - p) / n), (t, counts)


def test_temperature_sharpens_and_flattens() -> None:
    n = 400
    logits = probs_logits().repeat(n, 1)
    cold = sample(logits, [SamplingParams(temperature=0.02, seed=i) for i in range(n)], [seeded(i) for i in range(n)])
    hot = sample(logits, [SamplingParams(temperature=5.0, seed=i) for i in range(n)], [seeded(i) for i in range(n)])
    # At T=0.02 token 0 is e^(ln(0.5/0.3)/0.02) ~ 1e11 times as likely as token 1; at T=5 all four appear.
    assert cold.token_ids == [0] * n
    assert all(hot.token_ids.count(t) > 0 for t in range(4))


def test_same_seed_same_tokens_whatever_else_is_in_the_batch() -> None:
    vocab, steps = 32, 20
    logits = torch.randn(steps, vocab, generator=seeded(3))  # one row per decode step
    mine = SamplingParams(temperature=1.0, seed=1234)

    def run(batch_extra: int, other_seeded: bool) -> list[int]:
        gen = seeded(1234)
        others = [torch.Generator().manual_seed(99 + j) if other_seeded else None for j in range(batch_extra)]
        other_params = [SamplingParams(temperature=0.7, seed=99 + j) if other_seeded else SamplingParams()
                        for j in range(batch_extra)]
        tokens = []
        for t in range(steps):
            noise = torch.randn(batch_extra, vocab, generator=seeded(1000 + t))
            batch = torch.cat([noise[: batch_extra // 2], logits[t:t + 1], noise[batch_extra // 2:]])
            res = sample(batch, other_params[: batch_extra // 2] + [mine] + other_params[batch_extra // 2:],
                         others[: batch_extra // 2] + [gen] + others[batch_extra // 2:])
            tokens.append(res.token_ids[batch_extra // 2])
        return tokens

    alone = run(0, False)
    assert run(3, True) == alone
    assert run(4, False) == alone  # unseeded neighbours draw from the global generator
    # The seed matters: another seed gives another sequence (and sampling is not argmax).
    gen = seeded(4321)
    other = [sample(logits[t:t + 1], [mine], [gen]).token_ids[0] for t in range(steps)]
    assert other != alone
    assert alone != logits.argmax(-1).tolist()


def test_logprobs_are_log_softmax_of_the_raw_logits() -> None:
    logits = torch.randn(3, 50, generator=seeded(5))
    params = [SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0.5, seed=1, logprobs=0),
              SamplingParams(temperature=0)]
    res = sample(logits, params, [None, seeded(1), None])
    expected = logits.double().log_softmax(-1)
    lp, alts = res.logprobs[0]
    assert lp == pytest.approx(float(expected[0, res.token_ids[0]]), abs=1e-6)
    top = expected[0].topk(3)
    assert list(alts) == top.indices.tolist()
    assert list(alts.values()) == pytest.approx(top.values.tolist(), abs=1e-6)
    assert res.token_ids[0] == list(alts)[0]
    # logprobs=0: the sampled token's logprob (before temperature) and no alternatives.
    lp, alts = res.logprobs[1]
    assert lp == pytest.approx(float(expected[1, res.token_ids[1]]), abs=1e-6) and alts == {}
    assert res.logprobs[2] is None
    assert sum(math.exp(v) for v in expected[0].tolist()) == pytest.approx(1.0)
