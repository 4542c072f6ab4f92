"""The router's Prometheus side with a real Redis, 2 real workers (with a DRAM tier, so chunk-caches
are reused) and a real router: its counters equal what the clients saw (requests by status, the
sums of the usages), /metrics/targets lists every worker's metrics endpoint (Prometheus http_sd
format) and those endpoints answer, and `promtool check metrics` accepts the router's output."""
from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from controlplane.errors import DeadlineExceededError, NoWorkerError, OverloadedError, WorkerFailedError, error_status
from controlplane.metrics import REQUEST_STATUSES
from kvweave.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from kvweave.errors import InvalidRequestError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "worker"))
from test_worker_metrics import promtool_check, scrape  # noqa: E402

DOC_A = "Retrieved documents, system prompts and tool outputs recur across requests."
DOC_B = "The quick brown fox jumps over the lazy dog."
SAMPLING = common_pb2.SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def generate(stub, **fields) -> common_pb2.Usage:
    *_, last = stub.Generate(inference_pb2.GenerateRequest(**{"sampling": SAMPLING, **fields}), timeout=60)
    assert last.finished
    return last.usage


def segments(*parts: tuple[str, bool]) -> common_pb2.Segments:
    return common_pb2.Segments(segments=[common_pb2.Segment(text=t, reusable=r) for t, r in parts])


def test_every_error_label_is_a_request_status():
    errors = [InvalidRequestError("x"), OverloadedError("x"), NoWorkerError("x"), WorkerFailedError("x"),
              DeadlineExceededError("x"), RuntimeError("x")]
    assert {error_status(e).label for e in errors} | {"ok", "cancelled"} == set(REQUEST_STATUSES)


def test_router_counts_what_clients_saw_and_lists_the_workers_metrics(make_cluster):
    entry_bytes = 2 * 2 * 2 * 16 * 16 * 4  # K and V, 2 layers, 2 KV heads, 16 tokens, head dim 16, float32
    cluster = make_cluster(dram_cache_gb=256 * entry_bytes / 2**30, chunk_recompute_ratio=0.1)
    router = cluster.add_router(policy="chunk_aware")

    # Service discovery: one target group per worker, whose endpoint answers.
    groups = get_json(f"{router.http_url}/metrics/targets")
    model = cluster.workers[0].engine.engine.model_name
    assert sorted(groups, key=lambda g: g["labels"]["worker"]) == [
        {"targets": [f"127.0.0.1:{w.metrics_port}"], "labels": {"worker": w.worker_id, "role": "colocated",
                                                                 "model": model}}
        for w in cluster.workers]
    for group in groups:
        text, samples = scrape(f"http://{group['targets'][0]}/metrics")
        labels = (("model", model), ("role", "colocated"), ("worker", group["labels"]["worker"]))
        assert samples[("kvweave_worker_info", labels)] == 1
        promtool_check(text)

    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(router.grpc_address))
    usages = [generate(stub, segments=segments(("Context:", False), (DOC_A, True), (DOC_B, True), (" Why?", False)))]

    def chunks_ready() -> bool:  # computed, stored and published by the worker that served the request
        return (sum(w.engine.engine.blender.num_stored for w in cluster.workers) >= 2
                and cluster.num_worker_requests() == 0
                and all(w.engine.get_load().num_running == 0 for w in cluster.workers))

    deadline = time.monotonic() + 10
    while not chunks_ready():
        assert time.monotonic() < deadline, "the chunk-caches were not stored"
        time.sleep(0.02)
    time.sleep(0.3)  # the KV index hears of them within ~0.1 s
    usages.append(generate(stub, segments=segments(("Other context:", False), (DOC_B, True), (DOC_A, True),
                                                   (" How?", False))))
    usages.append(generate(stub, text="Hello there"))
    with pytest.raises(grpc.RpcError) as invalid:
        generate(stub, text="Hello", sampling=common_pb2.SamplingParams(temperature=-1.0))
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    malformed = urllib.request.Request(f"{router.http_url}/v1/completions", data=b"{not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as rejected:  # rejected by the HTTP frontend itself
        urllib.request.urlopen(malformed, timeout=10)
    assert rejected.value.code == 400

    text, samples = scrape(f"{router.http_url}/metrics")
    promtool_check(text)

    def total(name: str) -> float:
        return samples[(f"kvweave_router_{name}_total", ())]

    assert {s: samples[("kvweave_router_requests_total", (("status", s),))] for s in REQUEST_STATUSES} == \
        {s: {"ok": 3, "invalid": 2}.get(s, 0) for s in REQUEST_STATUSES}
    assert total("prompt_tokens") == sum(u.prompt_tokens for u in usages)
    assert total("generation_tokens") == sum(u.completion_tokens for u in usages) == 9
    assert total("cached_tokens") == sum(u.cached_tokens for u in usages)
    assert total("chunk_reused_tokens") == sum(u.chunk_reused_tokens for u in usages) > 0
    assert total("recomputed_tokens") == sum(u.recomputed_tokens for u in usages) > 0
    assert not any(name.startswith("kvweave_worker_") for name, _ in samples)
    # The second chunked request went where its chunks were, as the router predicted, and got them.
    route = usages[1].route
    assert route.chunk_tokens.dram == usages[1].chunk_reused_tokens > 0 and route.divergence == ""
    assert sum(v for (name, _), v in samples.items() if name == "kvweave_router_route_diverged_requests_total") == 0
    assert sum(v for (name, _), v in samples.items() if name == "kvweave_router_route_checked_requests_total") == 3
