"""The worker's Prometheus metrics over real HTTP: after real calls (plain, repeated, with reusable
chunks, invalid, aborted, cancelled) every figure of GET /metrics matches what was sent and
received, and `promtool check metrics` accepts the output. (The peer-transfer figures are checked
where a real peer fetch happens: tests/worker/test_kv_peer_fetch.py.)"""
from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvweave.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from worker.metrics import REQUEST_STATUSES
from worker.server import WorkerOptions, WorkerServer, WorkerStartError

BS = 16
PLAIN = list(range(3, 53))  # 50 tokens: 3 full blocks are prefix-cached once computed
A, B = [(i * 7) % 240 + 5 for i in range(48)], [(i * 11) % 240 + 3 for i in range(40)]
"""Reusable chunks (documents)."""
LEAD1, LEAD2, Q1, Q2 = list(range(60, 80)), list(range(90, 103)), list(range(110, 119)), list(range(120, 131))


def sampling(max_tokens: int) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def scrape(url: str) -> tuple[str, dict[tuple[str, tuple], float]]:
    """(the exposition text, {(sample name, sorted label pairs): value})."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    return text, samples


def promtool_check(text: str) -> None:
    """`promtool check metrics` must accept the exposition (exit 0, no lint problem)."""
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (Debian package prometheus; make setup installs it where apt is available)")
    check = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
    assert check.returncode == 0, (check.stdout + check.stderr).decode()


def chunked(*parts) -> worker_pb2.WorkerGenerateRequest:
    """A request from text (lists) and reusable chunks (1-tuples holding the chunk's tokens)."""
    prompt, spans = [], []
    for part in parts:
        if isinstance(part, tuple):
            spans.append(common_pb2.ChunkSpan(start=len(prompt), length=len(part[0])))
            part = part[0]
        prompt += part
    return worker_pb2.WorkerGenerateRequest(prompt_token_ids=prompt, chunks=spans, sampling=sampling(4))


async def until_idle(server: WorkerServer) -> None:
    """The engine holds nothing (the engine's own chunk-cache requests and KV saves included)."""
    for _ in range(500):
        if server.engine.idle:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the engine did not become idle")


@pytest.fixture
def engine(tiny_model_variant, tiny_engine_factory):
    """The lively tiny model with a DRAM tier of 64 entries (chunk-caches live there)."""
    model = tiny_model_variant("gqa")
    entry_bytes = tiny_engine_factory(model, num_blocks=4).connector.layout.nbytes
    return tiny_engine_factory(model, num_blocks=64, dram_cache_gb=64 * entry_bytes / 2**30,
                               chunk_recompute_ratio=0.1)


@pytest.mark.asyncio
async def test_metrics_match_the_calls(engine):
    server = WorkerServer(engine.config, WorkerOptions(worker_id="w-m"), engine=engine)
    await server.start()
    url = server.metrics_url
    get = lambda: asyncio.to_thread(scrape, url)  # noqa: E731
    try:
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
        health = await asyncio.to_thread(urllib.request.urlopen, url.replace("/metrics", "/health"), timeout=10)
        assert health.status == 200 and b'"serving"' in health.read()
        _, before = await get()
        assert before[("kvweave_worker_info", (("model", engine.model_name), ("role", "colocated"),
                                                ("worker", "w-m")))] == 1
        assert all(before[("kvweave_worker_requests_total", (("status", s),))] == 0 for s in REQUEST_STATUSES)
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)

            async def call(request) -> list[worker_pb2.WorkerGenerateResponse]:
                return [m async for m in stub.Generate(request, timeout=60)]

            plain = worker_pb2.WorkerGenerateRequest(prompt_token_ids=PLAIN, sampling=sampling(4))
            finished = [await call(plain)]
            await until_idle(server)
            _, first = await get()
            finished.append(await call(plain))  # the same prompt: its 3 full blocks are prefix hits
            await until_idle(server)
            _, second = await get()
            finished.append(await call(chunked(LEAD1, (A,), (B,), Q1)))
            await until_idle(server)  # the engine computes the new chunks' caches after it
            finished.append(await call(chunked(LEAD2, (B,), (A,), Q2)))  # reuses both chunk-caches

            with pytest.raises(grpc.aio.AioRpcError) as invalid:
                await call(worker_pb2.WorkerGenerateRequest(prompt_token_ids=[3, 100_000], sampling=sampling(4)))
            assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT

            aborted = stub.Generate(worker_pb2.WorkerGenerateRequest(
                request_id="to-abort", prompt_token_ids=PLAIN[:20], sampling=sampling(300)), timeout=60)
            aborted_msgs = [await aborted.read()]
            assert (await stub.Abort(common_pb2.AbortRequest(request_id="to-abort"))).found
            while (msg := await aborted.read()) is not grpc.aio.EOF:
                aborted_msgs.append(msg)
            assert aborted_msgs[-1].finish_reason == common_pb2.FINISH_REASON_ABORT
            finished.append(aborted_msgs)

            cancelled = stub.Generate(worker_pb2.WorkerGenerateRequest(
                prompt_token_ids=PLAIN[:30], sampling=sampling(300)), timeout=60)
            num_read = len((await cancelled.read()).token_ids)
            cancelled.cancel()
            await until_idle(server)
        text, after = await asyncio.to_thread(scrape, url)
        promtool_check(text)
    finally:
        await server.stop()

    def value(name: str, **labels) -> float:
        return after[(name, tuple(sorted(labels.items())))]

    usages = [msgs[-1].usage for msgs in finished]
    streamed = sum(len(m.token_ids) for msgs in finished for m in msgs)
    assert {s: value("kvweave_worker_requests_total", status=s) for s in REQUEST_STATUSES} == \
        {"stop": 0, "length": 4, "abort": 2, "handoff": 0, "invalid": 1, "error": 0, "overloaded": 0}
    assert value("kvweave_worker_prompt_tokens_total") == sum(u.prompt_tokens for u in usages) + 30
    generated = value("kvweave_worker_generation_tokens_total") - streamed  # the cancelled call's
    assert streamed == sum(u.completion_tokens for u in usages) and num_read <= generated < 300

    # Chunks: both calls carried A and B; the second reused both caches and recomputed a sample.
    reused = usages[3]
    assert reused.chunk_reused_tokens == len(A) + len(B) and 0 < reused.recomputed_tokens < len(A) + len(B)
    assert value("kvweave_worker_chunk_cache_query_tokens_total") == 2 * (len(A) + len(B))
    assert value("kvweave_worker_chunk_cache_hit_tokens_total") == reused.chunk_reused_tokens
    assert value("kvweave_worker_recomputed_tokens_total") == reused.recomputed_tokens

    # Prefix cache: the repeated prompt looked up 50 tokens and found 48 on the device.
    query = "kvweave_worker_prefix_cache_query_tokens_total"
    hits = ("kvweave_worker_prefix_cache_hit_tokens_total", (("source", "device"),))
    assert second[(query, ())] - first[(query, ())] == len(PLAIN)
    assert second[hits] - first[hits] == 3 * BS == usages[1].cached_tokens
    assert {source for (name, labels) in after if name == hits[0] for _, source in labels} == \
        {"device", "dram", "ssd", "peer", "handoff"}

    # Load, back to idle; KV blocks per configured tier add up to the tier's size.
    for gauge in ("num_requests_running", "num_requests_waiting", "queued_prefill_tokens"):
        assert value(f"kvweave_worker_{gauge}") == 0
    assert value("kvweave_worker_kv_blocks", tier="device", state="used") + \
        value("kvweave_worker_kv_blocks", tier="device", state="free") == 64
    dram_used = value("kvweave_worker_kv_blocks", tier="dram", state="used")
    assert dram_used > 0 and dram_used + value("kvweave_worker_kv_blocks", tier="dram", state="free") == 64
    assert not any(name == "kvweave_worker_kv_blocks" and ("tier", "ssd") in labels for name, labels in after)

    # Histograms: one TTFT and one e2e per call that got tokens and ended; ITL between tokens.
    assert value("kvweave_worker_time_to_first_token_seconds_count") == 6
    assert value("kvweave_worker_e2e_request_latency_seconds_count") == 6
    assert value("kvweave_worker_inter_token_latency_seconds_count") == \
        value("kvweave_worker_generation_tokens_total") - 6
    assert value("kvweave_worker_kv_transfer_bytes_total", direction="in") == 0
    assert value("kvweave_worker_kv_transfer_seconds_count", direction="out") == 0

    # Steps: every call prefilled at least once (mixed) and decoded its later tokens one step each;
    # each kind that ran has time in the phases every step goes through.
    steps = {k: value("kvweave_worker_steps_total", kind=k) for k in ("decode", "mixed")}
    assert steps["mixed"] >= 5 and 3 <= steps["decode"] <= value("kvweave_worker_generation_tokens_total")
    for kind in steps:
        for phase in ("schedule", "prepare", "forward", "sample", "update"):
            assert value("kvweave_worker_step_seconds_total", kind=kind, phase=phase) > 0, (kind, phase)


@pytest.mark.asyncio
async def test_metrics_port_minus_one_serves_none_and_a_taken_port_fails(tiny_engine_factory):
    engine = tiny_engine_factory()
    server = WorkerServer(engine.config, WorkerOptions(metrics_port=-1), engine=engine)
    await server.start()
    try:
        assert server.metrics_port == 0 and server.metrics_url is None
        assert server._info().metrics_port == 0 and server._info().metrics_target is None
    finally:
        await server.stop()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        engine = tiny_engine_factory()
        server = WorkerServer(engine.config, WorkerOptions(metrics_port=taken.getsockname()[1]), engine=engine)
        with pytest.raises(WorkerStartError, match="cannot serve metrics on 127.0.0.1:"):
            await server.start()
    with pytest.raises(ValueError, match="metrics_port"):
        WorkerOptions(metrics_port=-2)
