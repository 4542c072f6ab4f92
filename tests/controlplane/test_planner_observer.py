"""The planner's load observer (controlplane/planner_observer.py) against a real Redis registry and
real worker metrics endpoints: each fake worker registers through `Registry.heartbeat`, as a
worker does, and serves a real `WorkerMetrics` with worker/metrics.py's own HTTP server, into
which the test records requests, tokens and latencies as a worker's calls would."""
from __future__ import annotations

import math

import pytest
import redis.asyncio as aioredis

from controlplane.planner_observer import (FINISHED_STATUSES, LoadObserver, bucket_deltas, counter_delta,
                                           histogram_quantile)
from kvweave.registry import Registry, WorkerInfo, WorkerLoad
from worker import metrics as worker_metrics


def test_finished_statuses_are_the_workers():
    assert set(FINISHED_STATUSES) == worker_metrics.FINISHED_STATUSES


def test_histogram_quantile_interpolates_like_prometheus():
    buckets = {0.1: 10.0, 0.2: 30.0, 0.4: 40.0, math.inf: 40.0}
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.1)  # rank 10: the top of the first bucket
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.15)  # rank 20: half into (0.1, 0.2]
    assert histogram_quantile(0.9, buckets) == pytest.approx(0.4 - 0.2 * 4 / 10)
    assert histogram_quantile(0.99, {0.1: 1.0, math.inf: 10.0}) == 0.1  # in +Inf: the last finite bound
    assert histogram_quantile(0.9, {0.1: 0.0, math.inf: 0.0}) is None
    assert counter_delta(15, 10) == 5 and counter_delta(3, 10) == 3  # a reset
    assert bucket_deltas({1.0: 5, math.inf: 7}, {1.0: 2, math.inf: 3}) == {1.0: 3, math.inf: 4}
    assert bucket_deltas({1.0: 1, math.inf: 1}, {1.0: 2, math.inf: 3}) == {1.0: 1, math.inf: 1}


class FakeWorker:
    """A registry entry written as a worker writes it, with a real metrics endpoint."""

    def __init__(self, registry: Registry, worker_id: str, role: str, model: str = "m") -> None:
        self.registry, self.metrics = registry, worker_metrics.WorkerMetrics()
        self.info = WorkerInfo(worker_id, "127.0.0.1:1", model, role=role)
        self.runner = None

    async def start(self, serve_metrics: bool = True) -> "FakeWorker":
        if serve_metrics:
            self.runner, self.info.metrics_port = await worker_metrics.start_metrics_server(
                self.metrics, "127.0.0.1", 0, lambda: True)
        await self.registry.heartbeat(self.info)
        return self

    async def publish(self, **load) -> None:
        self.info.load = WorkerLoad(**load)
        await self.registry.heartbeat(self.info)

    def serve(self, num_requests: int, prompt_tokens: int, ttft_s: float, itl_s: float, num_itl: int = 4) -> None:
        m = self.metrics
        for _ in range(num_requests):
            m.requests.labels("stop").inc()
            m.prompt_tokens.inc(prompt_tokens)
            m.ttft.observe(ttft_s)
            for _ in range(num_itl):
                m.itl.observe(itl_s)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.mark.asyncio
async def test_observer_aggregates_each_pool_from_the_registry_and_the_workers_metrics(redis_url):
    client = aioredis.Redis.from_url(redis_url)
    registry = Registry(client, key=b"k" * 32)
    workers = [await FakeWorker(registry, "prefill-0", "prefill").start(),
               await FakeWorker(registry, "decode-0", "decode").start(),
               await FakeWorker(registry, "decode-1", "decode").start(),
               await FakeWorker(registry, "worker-0", "colocated").start(),  # not a pool the planner scales
               await FakeWorker(registry, "decode-other", "decode", model="other").start()]
    prefill, decode0, decode1, _, other = workers
    observer = LoadObserver(registry, model="m", quantile=0.5)
    try:
        first = await observer.observe()  # a baseline: no rates or latencies yet
        assert [(o.role, o.num_replicas, o.request_rate, o.ttft_ms, o.itl_ms) for o in first] == [
            ("prefill", 1, 0.0, None, None), ("decode", 2, 0.0, None, None)]

        prefill.serve(10, prompt_tokens=100, ttft_s=0.3, itl_s=0.0)
        decode0.serve(5, prompt_tokens=0, ttft_s=0.01, itl_s=0.03)
        decode1.serve(5, prompt_tokens=0, ttft_s=0.01, itl_s=0.03)
        other.serve(50, prompt_tokens=0, ttft_s=0.01, itl_s=2.0)  # another model's: ignored
        await prefill.publish(num_running=2, num_queued_prefill_tokens=700, num_kv_blocks_used=10,
                              num_kv_blocks_total=100)
        await decode0.publish(num_running=6, num_kv_blocks_used=50, num_kv_blocks_total=100)
        await decode1.publish(num_running=4, num_kv_blocks_used=30, num_kv_blocks_total=100)
        pre, dec = await observer.observe()
        assert (pre.role, pre.num_running, pre.num_queued_prefill_tokens, pre.kv_usage) == ("prefill", 2, 700, 0.1)
        assert (dec.role, dec.num_replicas, dec.num_running, dec.kv_usage) == ("decode", 2, 10, pytest.approx(0.4))
        # every TTFT was 0.3 s, inside the (0.25, 0.5] bucket; every ITL 0.03 s, inside (0.025, 0.05]
        assert 250 < pre.ttft_ms <= 500 and 25 < dec.itl_ms <= 50
        assert pre.request_rate > 0 and pre.prompt_token_rate == pytest.approx(100 * pre.request_rate)
        assert dec.request_rate > 0 and dec.prompt_token_rate == 0

        third = await observer.observe()  # nothing happened since: no latencies, no rates
        assert [(o.request_rate, o.ttft_ms, o.itl_ms) for o in third] == [(0.0, None, None), (0.0, None, None)]

        await registry.deregister("decode-1")  # a worker that leaves drops out of its pool
        await decode1.stop()
        _, dec = await observer.observe()
        assert (dec.num_replicas, dec.num_running) == (1, 6)
    finally:
        for w in workers:
            await w.stop()
        await client.aclose()


@pytest.mark.asyncio
async def test_a_worker_without_metrics_still_counts_with_its_registry_load(redis_url):
    client = aioredis.Redis.from_url(redis_url)
    registry = Registry(client, key=b"k" * 32)
    w = await FakeWorker(registry, "decode-0", "decode").start(serve_metrics=False)
    try:
        await w.publish(num_running=3)
        _, dec = await LoadObserver(registry).observe()
        assert (dec.num_replicas, dec.num_running, dec.itl_ms) == (1, 3, None)
    finally:
        await client.aclose()
