"""Containment in the engine: one request's parameters or numerics never fail another request.

A row whose parameters bypassed the validation at the edges, whose logits are not finite, or whose
sampling raises fails alone (finish reason "error" with a short reason, INTERNAL over the worker's
gRPC); the rest of the batch produces exactly the tokens it produces without it."""
from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from kvweave.limits import MAX_ID_CHARS
from kvweave.sampling_params import SamplingParams
from worker.sampling import sample
from test_service import GREEDY, PROMPTS, _request, expected, lively_model, serving  # noqa: F401 (fixtures)



def _bypassed(**fields) -> SamplingParams:
    """Parameters that passed validation, then were changed (as a request built around the edges)."""
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    for name, value in fields.items():
        setattr(params, name, value)
    return params


# ------------------------------------------------------------------------------------ the sampler

def test_non_finite_rows_fail_alone() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    logits[1, 7] = float("nan")
    logits[2, 3] = float("inf")
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0), SamplingParams(temperature=0.8),
              SamplingParams(temperature=0.8, seed=5)]
    gens = [None, None, None, torch.Generator().manual_seed(5)]
    res = sample(logits, params, gens)
    assert res.failed == {1: "sampling produced non-finite probabilities",
                          2: "sampling produced non-finite probabilities"}
    assert res.token_ids[0] == int(logits[0].argmax()) and res.token_ids[1] == res.token_ids[2] == -1
    alone = sample(logits[3:4], params[3:4], [torch.Generator().manual_seed(5)])
    assert res.token_ids[3] == alone.token_ids[0]


@pytest.mark.parametrize("fields, reason", [
    ({"temperature": float("nan")}, "temperature"),
    ({"logprobs": 10**6}, "logprobs"),
    ({"top_k": 2.5}, "top_k"),
    ({"top_p": float("nan")}, "top_p"),
    ({"stop_token_ids": None}, "invalid sampling parameters"),
])
def test_rows_with_bypassed_parameters_fail_alone(fields, reason) -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0.0, logprobs=2), _bypassed(**fields), SamplingParams(temperature=0.0)]
    res = sample(logits, params, [None] * 3)
    assert list(res.failed) == [1] and reason in res.failed[1]
    assert res.token_ids[0] == int(logits[0].argmax()) and res.token_ids[2] == int(logits[2].argmax())
    assert res.logprobs[0] is not None and len(res.logprobs[0][1]) == 2 and res.logprobs[1] is None


def test_a_row_that_raises_fails_alone() -> None:
    """The batch raises (a broken generator for row 1): each row is sampled on its own."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=0.7, seed=1), SamplingParams(temperature=0.7, seed=2),
              SamplingParams(temperature=0.0)]
    res = sample(logits, params, [torch.Generator().manual_seed(1), object(), None])
    assert res.failed == {1: "sampling failed"}
    assert res.token_ids[0] == sample(logits[:1], params[:1], [torch.Generator().manual_seed(1)]).token_ids[0]
    assert res.token_ids[2] == int(logits[2].argmax())


# ------------------------------------------------------------------------------------ the engine

def test_bad_requests_beside_good_ones_fail_alone(lively_model, tiny_engine_factory, expected) -> None:
    engine = tiny_engine_factory(lively_model)
    bad = {"nan-temperature": _bypassed(temperature=float("nan")),
           "huge-logprobs": _bypassed(logprobs=10**6),
           "huge-seed": _bypassed(temperature=0.5, seed=2**70)}
    for req_id, params in bad.items():
        req = engine.make_request(PROMPTS[0], SamplingParams(max_tokens=12), req_id=req_id)
        req.params = params  # what a caller that skipped the validation would hand the engine
        engine.submit(req)
    good = [engine.add_request(p, GREEDY, req_id=f"good-{i}") for i, p in enumerate(PROMPTS)]
    final = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                final[out.req_id] = out
    for req_id, exp in zip(good, expected):
        assert final[req_id].finish_reason == "length" and final[req_id].token_ids == exp.token_ids
    for req_id in bad:
        assert final[req_id].finish_reason == "error" and final[req_id].error
        assert "Tensor" not in final[req_id].error and "/" not in final[req_id].error
    assert not engine.scheduler.requests and not engine.runner.broken  # every request ended, state dropped
    assert engine.generate(PROMPTS[:1], GREEDY)[0].token_ids == expected[0].token_ids


# ------------------------------------------------------------------------------------ the worker's gRPC

async def _tokens(stub, request) -> list[int]:
    return [t async for msg in stub.Generate(request) for t in msg.token_ids]


@pytest.mark.asyncio
async def test_a_request_whose_processing_raises_fails_alone_over_grpc(lively_model, tiny_engine_factory,
                                                                       expected) -> None:
    engine = tiny_engine_factory(lively_model)
    process_token = engine.outputs.process_token

    def poisoned(req, logprob=None):  # an output processor that raises for one request
        if req.req_id == "poison" and req.num_output_tokens == 3:
            raise RuntimeError("tensor of shape [3, 512] at /secret/path")
        return process_token(req, logprob)

    engine.outputs.process_token = poisoned
    async with serving(engine) as (stub, _):
        results = await asyncio.gather(_tokens(stub, _request(PROMPTS[0], req_id="poison")),
                                       *(_tokens(stub, _request(p)) for p in PROMPTS), return_exceptions=True)
        bad, good = results[0], results[1:]
        assert isinstance(bad, grpc.aio.AioRpcError) and bad.code() == grpc.StatusCode.INTERNAL
        assert bad.details() == "the request failed: processing its output failed"
        assert good == [e.token_ids for e in expected]
        assert await _tokens(stub, _request(PROMPTS[1])) == expected[1].token_ids


@pytest.mark.asyncio
async def test_worker_refuses_overlong_ids(lively_model, tiny_engine_factory) -> None:
    engine = tiny_engine_factory(lively_model)
    async with serving(engine) as (stub, _):
        for request in (_request(PROMPTS[0], req_id="r" * (MAX_ID_CHARS + 1)),
                        _request(PROMPTS[0], namespace="t" * 100_000)):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _tokens(stub, request)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"at most {MAX_ID_CHARS}" in info.value.details() and len(info.value.details()) < 200
