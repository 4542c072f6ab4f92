"""The router end to end over real sockets: real Redis, 2 real gRPC workers on a tiny model, gRPC clients."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controlplane.procs import stop_process
from kvstore.index import KVIndex
from kvstore.keys import encode_extra_keys, hash_blocks
from kvweave.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from kvweave.sampling_params import SamplingParams
from tests.inprocess_cluster import pin_kv_costs

MODEL = "tiny-gqa"


def stub_for(router) -> inference_pb2_grpc.InferenceStub:
    return inference_pb2_grpc.InferenceStub(grpc.insecure_channel(router.grpc_address))


def greedy(max_tokens: int = 8) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def token_prompt(token_ids: list[int], max_tokens: int = 8, **fields) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=token_ids), sampling=greedy(max_tokens),
                                         **fields)


def generate(stub, request: inference_pb2.GenerateRequest) -> tuple[list[int], str, inference_pb2.GenerateResponse]:
    """(token ids, text, last message) of one request."""
    token_ids, text, last = [], "", None
    for msg in stub.Generate(request, timeout=60):
        token_ids += msg.token_ids
        text += msg.text
        last = msg
    return token_ids, text, last


def prompt_ids(seed: int, n: int, vocab: int = 200) -> list[int]:
    return [(seed * 7919 + i * 104729) % (vocab - 10) + 5 for i in range(n)]


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def wait_indexed(cluster, router, token_ids: list[int], worker_id: str, tenant: str = "") -> None:
    """Until the KV index says `worker_id` holds every full block of `token_ids`."""
    hashes = hash_blocks(token_ids, 16, encode_extra_keys((MODEL, tenant)))

    def held() -> bool:
        found = cluster.run(KVIndex(router.router.redis).lookup(hashes, [worker_id]))
        return all(found[(worker_id, "device")])
    wait_until(held)


# -------------------------------------------------------------------------------- serving

def test_greedy_output_equals_the_engine(cluster, tiny_engine_factory, tiny_model_variant):
    router = cluster.add_router()
    engine = tiny_engine_factory(tiny_model_variant("gqa"))
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    stub = stub_for(router)
    for prompt in ("The quick brown fox", prompt_ids(1, 40)):
        expected = engine.generate([prompt], params)[0]
        field = {"text": prompt} if isinstance(prompt, str) else {"token_ids": common_pb2.TokenIds(ids=prompt)}
        request = inference_pb2.GenerateRequest(model=MODEL, sampling=greedy(12), **field)
        token_ids, text, last = generate(stub, request)
        assert token_ids == expected.token_ids
        assert text == expected.text
        assert last.finished and last.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert last.usage.prompt_tokens == len(expected.prompt_token_ids)
        assert last.usage.completion_tokens == 12
        assert last.worker_id in ("w0", "w1")


def test_chat_prompt_equals_the_engine(cluster, tiny_engine_factory, tiny_model_variant):
    router = cluster.add_router()
    engine = tiny_engine_factory(tiny_model_variant("gqa"))
    messages = [{"role": "user", "content": "Hello there"}]
    expected = engine.generate([{"messages": messages}], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))[0]
    chat = common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(**m) for m in messages])
    token_ids, text, _ = generate(stub_for(router), inference_pb2.GenerateRequest(chat=chat, sampling=greedy(6)))
    assert (token_ids, text) == (expected.token_ids, expected.text)


def test_prefix_aware_follows_the_cache_and_spreads_unrelated(cluster):
    # The holder's cache alone: with the traffic term (the default) this hot prefix would spread to
    # the other worker by peer fetches (the next test).
    router = cluster.add_router("prefix_aware", traffic_weight=0.0)
    stub = stub_for(router)
    prefix = prompt_ids(2, 160)  # 10 full blocks
    _, _, first = generate(stub, token_prompt(prefix + [7, 8, 9], max_tokens=2))
    holder = first.worker_id
    wait_indexed(cluster, router, prefix, holder)
    for i in range(4):
        _, _, last = generate(stub, token_prompt(prefix + prompt_ids(100 + i, 20), max_tokens=2))
        assert last.worker_id == holder
        assert last.usage.cached_tokens >= 160
    # Unrelated prompts go first where fewer new tokens were stored lately (the policy's churn term:
    # the holder stored ~255), then to both. The other worker passes the holder's churn after ~7 of
    # these 40-token prompts; the rest leave room for a heartbeat that still shows a finished
    # request running (one running request weighs as much as ~3 of them).
    unrelated = [generate(stub, token_prompt(prompt_ids(200 + i, 40), max_tokens=2))[2].worker_id for i in range(16)]
    assert unrelated[0] != holder and set(unrelated) == {"w0", "w1"}


def test_hot_prefix_spreads_to_the_peer_that_fetches_it(cluster, monkeypatch):
    # A prefix a peer holds costs the other worker a fetch, nearly nothing next to a recompute (a
    # real model's costs: the tiny one recomputes about as fast as it fetches), so the traffic term
    # sends it some of a hot prefix's requests: it fetches the blocks, not recompute them.
    router = cluster.add_router("prefix_aware")
    pin_kv_costs(router, monkeypatch, lambda w: {"peer": 0.03, "recompute": 1.0})
    stub = stub_for(router)
    prefix = prompt_ids(3, 160)  # 10 full blocks
    holder = generate(stub, token_prompt(prefix + [7, 8, 9], max_tokens=1))[2].worker_id
    wait_indexed(cluster, router, prefix, holder)
    served = [generate(stub, token_prompt(prefix + prompt_ids(300 + i, 20), max_tokens=1))[2] for i in range(6)]
    assert served[0].worker_id == holder and {r.worker_id for r in served} == {"w0", "w1"}
    moved = next(r for r in served if r.worker_id != holder)
    assert moved.usage.route.prefix_tokens.peer == 160 and moved.usage.cached_tokens >= 160
    assert moved.usage.route.divergence == ""


def test_tenants_never_share_cache(cluster):
    router = cluster.add_router("prefix_aware")
    stub = stub_for(router)
    prefix = prompt_ids(20, 96)
    holder = generate(stub, token_prompt(prefix + [5], max_tokens=1, tenant="acme"))[2].worker_id
    wait_indexed(cluster, router, prefix, holder, tenant="acme")
    assert generate(stub, token_prompt(prefix + [6], max_tokens=1, tenant="other"))[2].usage.cached_tokens == 0
    last = generate(stub, token_prompt(prefix + [6], max_tokens=1, tenant="acme"))[2]
    assert last.worker_id == holder and last.usage.cached_tokens == 96


def test_round_robin_alternates(cluster):
    stub = stub_for(cluster.add_router("round_robin"))
    prompt = prompt_ids(3, 40)
    workers = [generate(stub, token_prompt(prompt, max_tokens=1))[2].worker_id for _ in range(4)]
    assert workers[0] != workers[1]
    assert workers == workers[:2] * 2


def test_least_loaded_avoids_the_busy_worker(cluster):
    router = cluster.add_router("least_loaded")
    stub = stub_for(router)
    long_prompt = prompt_ids(4, 20)
    # Whichever worker takes the long request stops stepping once it has a token: the request stays
    # running there (the tiny model would otherwise finish it, 512 tokens of context at most, while
    # the others are placed on a slow machine). Patched before it is sent: it cannot end first.
    steps = {}
    for w in cluster.workers:
        engine = w.engine.engine
        steps[engine] = engine.step

        def holding_step(engine=engine, step=engine.step):
            if any(r.prompt_token_ids == long_prompt and r.output_token_ids
                   for r in engine.scheduler.requests.values()):
                time.sleep(0.005)
                return []
            return step()
        engine.step = holding_step
    long_stream = stub.Generate(token_prompt(long_prompt, max_tokens=2000, request_id="long-1"), timeout=60)
    try:
        busy = next(long_stream).worker_id
        pool = router.router.pool
        for i in range(3):
            # Until the router counts the last short request as ended, and the worker that served it
            # reports no request, that worker ties with the busy one (whose engine is held: a tie
            # broken toward it would never end).
            wait_until(lambda: all(w.state().num_requests == 0 for w in pool.workers.values() if w.worker_id != busy))
            assert generate(stub, token_prompt(prompt_ids(300 + i, 20), max_tokens=2))[2].worker_id != busy
    finally:
        for engine, step in steps.items():
            engine.step = step
        long_stream.cancel()
    wait_until(lambda: cluster.num_worker_requests() == 0)  # the client's cancel reached the worker


def test_session_policy_sticks(cluster):
    stub = stub_for(cluster.add_router("session", fallback="round_robin"))
    sessions = {sid: set() for sid in ("alice", "bob")}
    for i in range(3):
        for sid in sessions:
            sessions[sid].add(generate(stub, token_prompt(prompt_ids(i, 20), max_tokens=1, session_id=sid))[2].worker_id)
    assert all(len(w) == 1 for w in sessions.values())
    assert sessions["alice"] != sessions["bob"]


def test_abort_ends_the_stream(cluster):
    router = cluster.add_router()
    stub = stub_for(router)
    stream = stub.Generate(token_prompt(prompt_ids(5, 20), max_tokens=2000, request_id="to-abort"), timeout=60)
    next(stream)
    assert stub.Abort(common_pb2.AbortRequest(request_id="to-abort")).found
    last = list(stream)[-1]
    assert last.finished and last.finish_reason == common_pb2.FINISH_REASON_ABORT
    assert not stub.Abort(common_pb2.AbortRequest(request_id="to-abort")).found
    wait_until(lambda: router.router.num_inflight == 0 and cluster.num_worker_requests() == 0)


def test_list_models_health_reflection_and_stage_metrics(cluster):
    router = cluster.add_router()
    channel = grpc.insecure_channel(router.grpc_address)
    models = inference_pb2_grpc.InferenceStub(channel).ListModels(inference_pb2.ListModelsRequest()).models
    assert [(m.id, m.max_model_len, m.num_workers) for m in models] == [(MODEL, 512, 2)]
    for service in ("", "kvweave.v1.Inference"):
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    generate(inference_pb2_grpc.InferenceStub(channel), token_prompt(prompt_ids(6, 40), max_tokens=1))
    text = router.router.metrics.exposition().decode()
    for stage in ("tokenize", "hash", "index_lookup", "scoring", "decision"):
        assert f'kvweave_router_stage_seconds_count{{stage="{stage}"}} 1.0' in text
    assert 'kvweave_router_healthy_workers{role="colocated"} 2.0' in text
    assert 'kvweave_router_requests_total{status="ok"} 1.0' in text
    assert "kvweave_worker_" not in text  # the workers serve their own metrics (tests/controlplane/test_metrics.py)


# -------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("request_fields, message", [
    ({}, "no prompt"),
    ({"text": ""}, "empty"),
    ({"token_ids": common_pb2.TokenIds(ids=list(range(1, 600)))}, "context length"),
    ({"text": "hi", "sampling": common_pb2.SamplingParams(temperature=-1.0)}, "temperature"),
    ({"text": "hi", "sampling": common_pb2.SamplingParams(top_p=1.5)}, "top_p"),
    ({"text": "hi", "model": "gpt-4"}, "not served"),
    ({"chat": common_pb2.ChatMessages()}, "messages"),
])
def test_invalid_requests_get_invalid_argument(cluster, request_fields, message):
    stub = stub_for(cluster.routers[0] if cluster.routers else cluster.add_router())
    with pytest.raises(grpc.RpcError) as exc:
        generate(stub, inference_pb2.GenerateRequest(**request_fields))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in exc.value.details()
    assert "Traceback" not in exc.value.details()
    generate(stub, token_prompt(prompt_ids(7, 20), max_tokens=1))  # still serving


def test_admission_control(cluster):
    stub = stub_for(cluster.add_router(max_inflight=1))
    long_stream = stub.Generate(token_prompt(prompt_ids(8, 20), max_tokens=2000), timeout=60)
    next(long_stream)
    with pytest.raises(grpc.RpcError) as exc:
        generate(stub, token_prompt(prompt_ids(9, 20), max_tokens=1))
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    long_stream.cancel()
    wait_until(lambda: cluster.routers[-1].router.num_inflight == 0)
    generate(stub, token_prompt(prompt_ids(9, 20), max_tokens=1))


def test_no_worker_is_unavailable(make_cluster):
    c = make_cluster(num_workers=0)
    stub = stub_for(c.add_router())
    with pytest.raises(grpc.RpcError) as exc:
        generate(stub, token_prompt(prompt_ids(10, 20)))
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    c.add_worker("late")  # the router picks it up from the registry
    wait_until(lambda: c.routers[0].router.pool.eligible())
    assert generate(stub, token_prompt(prompt_ids(10, 20)))[2].worker_id == "late"


def test_dead_worker_is_retried_before_the_first_token(make_cluster):
    c = make_cluster()
    router = c.add_router("round_robin")
    stub = stub_for(router)
    c.kill_worker(c.workers[0])  # its lease is still live: the router still lists it
    assert len(router.router.pool.eligible()) == 2
    workers = [generate(stub, token_prompt(prompt_ids(i, 20), max_tokens=2))[2].worker_id for i in range(4)]
    assert workers == ["w1"] * 4
    assert router.router.metrics.retries._value.get() >= 1
    wait_until(lambda: list(router.router.pool.workers) == ["w1"], timeout=5)  # the lease ran out


def test_worker_dying_mid_stream_is_migrated_with_the_same_greedy_output(make_cluster):
    """The request continues on the other worker from its prompt plus the tokens already sent."""
    c = make_cluster()
    router = c.add_router("round_robin")
    stub = stub_for(router)
    request = token_prompt(prompt_ids(11, 20), max_tokens=300)
    request.sampling.logprobs = 1
    want, _, _ = generate(stub, request)
    stream = stub.Generate(request, timeout=60)
    first = next(stream)
    c.kill_worker(next(w for w in c.workers if w.worker_id == first.worker_id))
    rest = list(stream)
    assert list(first.token_ids) + [t for r in rest for t in r.token_ids] == want
    assert [lp.token_id for r in [first, *rest] for lp in r.logprobs] == want  # logprobs continue
    assert {r.worker_id for r in rest[-1:]} != {first.worker_id}
    assert (rest[-1].usage.prompt_tokens, rest[-1].usage.completion_tokens) == (20, 300)
    assert router.router.metrics.migrations._value.get() == 1


def test_worker_dying_mid_stream_past_max_migrations_is_a_clear_error(make_cluster):
    c = make_cluster()
    router = c.add_router("round_robin", router_config={"max_migrations": 0})
    stub = stub_for(router)
    stream = stub.Generate(token_prompt(prompt_ids(11, 20), max_tokens=300), timeout=60)
    victim = next(stream).worker_id
    c.kill_worker(next(w for w in c.workers if w.worker_id == victim))
    with pytest.raises(grpc.RpcError) as exc:
        list(stream)
    assert exc.value.code() == grpc.StatusCode.INTERNAL
    assert "failed mid-stream after 0 migration(s)" in exc.value.details()
    assert generate(stub, token_prompt(prompt_ids(12, 20), max_tokens=2))[2].worker_id != victim


# -------------------------------------------------------------------------------- process

def test_router_command_serves_and_stops_on_sigterm(cluster):
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "router", "--port", "0", "--http-port", "0", "--redis-url",
         cluster.redis_url, "--model", str(cluster.model), "--policy", "round_robin"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("kvweave router ready: grpc 127.0.0.1:"), proc.stderr.read() if not line else line
        grpc_address = line.split()[4]
        stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(grpc_address))
        wait_until(lambda: stub.ListModels(inference_pb2.ListModelsRequest()).models[0].num_workers == 2)
        assert generate(stub, token_prompt(prompt_ids(13, 20), max_tokens=2))[0]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        stop_process(proc)


def test_router_command_rejects_unknown_policy(capsys):
    from cli.main import build_parser

    args = build_parser("router").parse_args(["router", "--policy", "fastest"])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "prefix_aware" in err and "round_robin" in err


@pytest.mark.parametrize("fixture", ["tiny_hf_model", "tiny_gguf_model"])
def test_router_tokenizer_matches_the_engine_without_loading_weights(request, fixture):
    from kvweave.model_files import load_tokenizer
    from worker.loader import load_checkpoint

    path = str(request.getfixturevalue(fixture))
    light, full = load_tokenizer(path), load_checkpoint(path)
    assert (light.name, light.max_seq_len) == (full.args.name, full.args.max_seq_len)
    text = "<|im_start|>user\nHello 123 world<|im_end|>"
    assert light.tokenizer.encode(text, True) == full.tokenizer.encode(text, True)


def test_an_unreachable_worker_is_reported_without_its_address(make_cluster):
    """gRPC's own text for a worker it cannot reach names the address (and, for UNKNOWN, an
    exception): the client is told what happened, the router's log gets the details."""
    import asyncio

    import redis.asyncio as aioredis

    from controlplane.procs import free_port
    from kvweave.registry import Registry, WorkerInfo

    c = make_cluster(num_workers=0)
    stub = stub_for(c.add_router())
    port = free_port()  # nothing listens there

    async def register() -> None:
        client = aioredis.Redis.from_url(c.redis_url)
        await Registry(client, 60.0).heartbeat(WorkerInfo("ghost", f"127.0.0.1:{port}", c.routers[0].router.model.name))
        await client.aclose()

    asyncio.run(register())
    wait_until(lambda: c.routers[0].router.pool.eligible())
    with pytest.raises(grpc.RpcError) as exc:
        generate(stub, token_prompt(prompt_ids(11, 20)))
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "the worker cannot be reached" in exc.value.details()
    assert str(port) not in exc.value.details() and "127.0.0.1" not in exc.value.details()
