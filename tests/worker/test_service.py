"""The worker's gRPC service over real loopback sockets: a WorkerServer (no Redis) per test.

Greedy outputs are compared exactly with `LLMEngine.generate` on the lively tiny model, whose
greedy tokens depend on the context.
"""
from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from kvweave.convert import (finish_reason_from_proto, finish_reason_to_proto, sampling_from_proto,
                             sampling_to_proto)
from kvweave.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from worker.async_engine import compute_load
from kvweave.errors import InvalidRequestError
from kvweave.sampling_params import SamplingParams
from worker.server import WorkerOptions, WorkerServer

PROMPTS = [list(range(3, 40)), [7, 9, 11, 13, 200, 300, 17, 19, 23] * 3, list(range(100, 150, 2))]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
LONG = common_pb2.SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def lively_model(tiny_model_variant):
    return tiny_model_variant("gqa")


@pytest.fixture(scope="module")
def expected(lively_model, tiny_engine_factory):
    """Greedy outputs of the plain engine for PROMPTS."""
    return tiny_engine_factory(lively_model).generate(PROMPTS, GREEDY)


@contextlib.asynccontextmanager
async def serving(engine):
    server = WorkerServer(engine.config, WorkerOptions(worker_id="w-test"), engine=engine)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield worker_pb2_grpc.WorkerStub(channel), server
    finally:
        await server.stop()


@pytest.fixture
def engine(lively_model, tiny_engine_factory):
    return tiny_engine_factory(lively_model)


def _request(prompt, sampling=None, req_id="", namespace="") -> worker_pb2.WorkerGenerateRequest:
    sampling = sampling or sampling_to_proto(GREEDY)
    return worker_pb2.WorkerGenerateRequest(request_id=req_id, prompt_token_ids=prompt, sampling=sampling,
                                            cache_namespace=namespace)


async def _collect(stub, request) -> list[worker_pb2.WorkerGenerateResponse]:
    return [msg async for msg in stub.Generate(request)]


async def _read_rest(call) -> list[worker_pb2.WorkerGenerateResponse]:
    messages = []
    while (msg := await call.read()) is not grpc.aio.EOF:
        messages.append(msg)
    return messages


async def _wait_idle(server: WorkerServer) -> None:
    for _ in range(300):
        load = server.engine.get_load()  # published after the engine thread's turn
        if server.engine.num_requests == 0 and load.num_running + load.num_waiting == 0:
            return
        await asyncio.sleep(0.01)


def test_sampling_params_convert_both_ways():
    assert sampling_from_proto(common_pb2.SamplingParams()) == SamplingParams()
    assert sampling_from_proto(None) == SamplingParams()
    params = SamplingParams(max_tokens=7, temperature=0.7, top_p=0.9, top_k=5, seed=-3, stop=["\n", "end"],
                            stop_token_ids=[2, 5], ignore_eos=True, logprobs=0, min_tokens=2)
    assert sampling_from_proto(sampling_to_proto(params)) == params  # float32 read back as 0.7, 0.9
    assert sampling_from_proto(common_pb2.SamplingParams(temperature=0.0)).temperature == 0.0
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        sampling_from_proto(common_pb2.SamplingParams(max_tokens=0))
    for reason in ("stop", "length", "abort", None):
        assert finish_reason_from_proto(finish_reason_to_proto(reason)) == reason


@pytest.mark.asyncio
async def test_streamed_greedy_tokens_match_the_engine(engine, expected):
    async with serving(engine) as (stub, _):
        results = await asyncio.gather(*(_collect(stub, _request(p)) for p in PROMPTS))
    for messages, exp in zip(results, expected):
        assert [m.finished for m in messages] == [False] * (len(messages) - 1) + [True]
        assert [t for m in messages for t in m.token_ids] == exp.token_ids
        assert "".join(m.text for m in messages) == exp.text
        last = messages[-1]
        assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH and last.stop_reason == ""
        assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(exp.prompt_token_ids), 12)
        assert not any(m.logprobs for m in messages)


@pytest.mark.asyncio
async def test_prefix_cache_hits_are_reported_per_namespace(engine):
    prompt = list(range(3, 43))  # 40 tokens: 2 full blocks of 16 are reusable
    async with serving(engine) as (stub, _):
        first = await _collect(stub, _request(prompt, namespace="tenant-a"))
        again = await _collect(stub, _request(prompt, namespace="tenant-a"))
        other = await _collect(stub, _request(prompt, namespace="tenant-b"))
    assert [m.usage.cached_tokens for m in (first[-1], again[-1], other[-1])] == [0, 32, 0]
    assert [t for m in again for t in m.token_ids] == [t for m in first for t in m.token_ids]


@pytest.mark.asyncio
async def test_stop_token_and_logprobs(engine, expected):
    stop_tok = expected[0].token_ids[2]
    n = expected[0].token_ids.index(stop_tok) + 1
    sampling = common_pb2.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_tok],
                                         logprobs=2)
    async with serving(engine) as (stub, _):
        messages = await _collect(stub, _request(PROMPTS[0], sampling))
    assert [t for m in messages for t in m.token_ids] == expected[0].token_ids[:n]
    assert messages[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    assert messages[-1].stop_reason == str(stop_tok)
    for m in messages:
        assert [lp.token_id for lp in m.logprobs] == list(m.token_ids)
        assert all(len(lp.top_logprobs) == 2 and lp.logprob <= 0 for lp in m.logprobs)
        # greedy: the sampled token is the most likely one
        assert all(max(lp.top_logprobs.values()) == pytest.approx(lp.logprob, abs=1e-6) for lp in m.logprobs)


@pytest.mark.asyncio
async def test_invalid_requests_get_invalid_argument_and_the_server_keeps_serving(engine, expected):
    too_long = list(range(3, 300)) * 2  # 594 tokens, context 512
    cases = [
        (_request([]), "prompt is empty"),
        (_request(PROMPTS[0], common_pb2.SamplingParams(max_tokens=0)), "max_tokens"),
        (_request(PROMPTS[0], common_pb2.SamplingParams(top_p=1.5)), "top_p"),
        (_request(PROMPTS[0], common_pb2.SamplingParams(temperature=-1.0)), "temperature"),
        (_request(PROMPTS[0], common_pb2.SamplingParams(logprobs=50)), "logprobs"),
        (_request(too_long), "context length is 512"),
        (_request([5, 100_000]), "token ids must be in"),
    ]
    async with serving(engine) as (stub, _):
        for request, message in cases:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _collect(stub, request)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in info.value.details() and "Traceback" not in info.value.details()
        messages = await _collect(stub, _request(PROMPTS[0]))
    assert [t for m in messages for t in m.token_ids] == expected[0].token_ids


@pytest.mark.asyncio
async def test_abort_ends_the_stream_with_abort(engine):
    async with serving(engine) as (stub, server):
        call = stub.Generate(_request(PROMPTS[1], LONG, req_id="long-1"))
        first = await call.read()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _collect(stub, _request(PROMPTS[0], req_id="long-1"))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "already in use" in info.value.details()
        assert (await stub.Abort(common_pb2.AbortRequest(request_id="long-1"))).found
        rest = await _read_rest(call)
        assert not (await stub.Abort(common_pb2.AbortRequest(request_id="long-1"))).found
        assert not (await stub.Abort(common_pb2.AbortRequest(request_id="never-seen"))).found
        await _wait_idle(server)
        load = (await stub.GetLoad(worker_pb2.GetLoadRequest())).load
    assert not first.finished and rest[-1].finished
    assert rest[-1].finish_reason == common_pb2.FINISH_REASON_ABORT
    assert len(first.token_ids) + sum(len(m.token_ids) for m in rest) < 300
    assert (load.num_running, load.num_waiting, load.num_kv_blocks_used) == (0, 0, 0)


@pytest.mark.asyncio
async def test_a_cancelled_stream_aborts_its_request(engine, expected):
    async with serving(engine) as (stub, server):
        call = stub.Generate(_request(PROMPTS[2], LONG, req_id="cancel-me"))
        await call.read()
        call.cancel()
        await _wait_idle(server)
        assert "cancel-me" not in server.engine.engine.scheduler.requests
        bm = server.engine.engine.block_manager
        assert bm.num_free_blocks == bm.num_blocks
        messages = await _collect(stub, _request(PROMPTS[0]))
    assert [t for m in messages for t in m.token_ids] == expected[0].token_ids


@pytest.mark.asyncio
async def test_get_load_reports_running_requests_and_blocks(engine):
    async with serving(engine) as (stub, server):
        idle = await stub.GetLoad(worker_pb2.GetLoadRequest())
        call = stub.Generate(_request(PROMPTS[0], LONG, req_id="busy"))
        await call.read()
        for _ in range(300):  # the load is published after the engine thread's turn
            busy = (await stub.GetLoad(worker_pb2.GetLoadRequest())).load
            if busy.num_running == 1 and busy.num_queued_prefill_tokens == 0:
                break
            await asyncio.sleep(0.01)
        call.cancel()
    assert idle.worker_id == "w-test"
    assert (idle.load.num_running, idle.load.num_waiting, idle.load.num_queued_prefill_tokens) == (0, 0, 0)
    assert (idle.load.num_kv_blocks_used, idle.load.num_kv_blocks_total) == (0, 256)
    assert (busy.num_running, busy.num_waiting, busy.num_queued_prefill_tokens) == (1, 0, 0)
    assert busy.num_kv_blocks_used >= 3 and busy.num_kv_blocks_total == 256  # 37 prompt tokens and more


def test_queued_prefill_tokens_count_uncomputed_prompt_tokens(tiny_engine_factory):
    engine = tiny_engine_factory(max_num_batched_tokens=32, attention_cost_len=0)  # chunks count tokens only
    engine.add_request(list(range(3, 43)), GREEDY)  # 40 tokens
    engine.add_request(list(range(50, 80)), GREEDY)  # 30 tokens
    loads = [compute_load(engine)]
    for _ in range(2):
        engine.step()
        loads.append(compute_load(engine))
    # step 1: 32 of A's 40; step 2: A's last 8 (then it decodes), 24 of B's 30
    assert [(l.num_running, l.num_waiting, l.num_queued_prefill_tokens) for l in loads] == \
        [(0, 2, 70), (1, 1, 38), (2, 0, 6)]
    assert [l.num_kv_blocks_used for l in loads] == [0, 2, 5]


@pytest.mark.asyncio
async def test_an_engine_failure_is_internal_and_the_server_keeps_serving(engine, expected, monkeypatch):
    real_execute = engine.runner.execute
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real_execute(*args, **kwargs)

    monkeypatch.setattr(engine.runner, "execute", flaky)
    async with serving(engine) as (stub, _):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _collect(stub, _request(PROMPTS[1]))
        messages = await _collect(stub, _request(PROMPTS[0]))
    assert info.value.code() == grpc.StatusCode.INTERNAL
    # The exception's text stays in the worker's log: it may name shapes, layouts or paths.
    assert info.value.details() == "internal error in the worker (see its log)"
    assert [t for m in messages for t in m.token_ids] == expected[0].token_ids


@pytest.mark.asyncio
async def test_a_call_waiting_for_its_first_token_gets_heartbeats_then_its_tokens(lively_model, tiny_engine_factory,
                                                                                   expected):
    """One running request at a time: the second call queues behind a long one and hears empty
    responses (heartbeats: the router's stall detection must not take it for a hung worker) until
    its tokens come; a call that streams gets none."""
    engine = tiny_engine_factory(lively_model, max_num_seqs=1)
    async with serving(engine) as (stub, server):
        server.service.heartbeat_s = 0.01
        long_call = stub.Generate(_request(PROMPTS[1], LONG))
        first = await long_call.read()
        assert first.token_ids  # it runs: the next call has to wait for its 300 tokens
        queued = await _collect(stub, _request(PROMPTS[0]))
        rest = await _read_rest(long_call)
    beats = [m == worker_pb2.WorkerGenerateResponse() for m in queued]
    assert beats[0] and not beats[-1] and beats == sorted(beats, reverse=True)  # heartbeats, then tokens
    assert [t for m in queued for t in m.token_ids] == expected[0].token_ids
    assert all(m != worker_pb2.WorkerGenerateResponse() for m in rest)
