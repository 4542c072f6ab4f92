"""The SLA planner's view of the cluster: each pool's load over the last interval, per role.

Two sources, the ones the router and Prometheus already use:
- the registry in Redis (kvweave/registry.py): the workers of the planner's model, their role, and
  the load each publishes with its heartbeat (`WorkerLoad`: running requests, queued prefill
  tokens, KV blocks used);
- each worker's Prometheus metrics (`WorkerInfo.metrics_target`, docs/metrics.md), scraped once
  per interval: the TTFT and inter-token latency histograms and the request and prompt-token
  counters. Rates and latency quantiles come from the difference between this scrape and the
  worker's previous one (a counter that went down means the worker restarted: its new value is
  the difference, as Prometheus's `rate` treats resets); a worker seen for the first time gives
  a baseline only. The pool's quantile is `histogram_quantile` over the sum of its workers'
  bucket differences, interpolated linearly inside a bucket as Prometheus does.

A worker whose metrics cannot be read (no metrics port, a scrape error) still counts with its
registry load; its latencies and rates are missing from the interval's figures (logged).
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from controlplane.planner import POOL_ROLES, PoolObservation
from kvweave.registry import Registry, WorkerInfo

logger = logging.getLogger(__name__)

FINISHED_STATUSES = ("stop", "length", "abort", "handoff")
"""`status` values of kvweave_worker_requests_total of the requests a worker accepted and ended
(worker/metrics.py's FINISHED_STATUSES; a test keeps the two equal)."""
TTFT = "kvweave_worker_time_to_first_token_seconds"
ITL = "kvweave_worker_inter_token_latency_seconds"
REQUESTS = "kvweave_worker_requests"
PROMPT_TOKENS = "kvweave_worker_prompt_tokens"

Fetch = Callable[[str], Awaitable[str]]
"""URL -> the text of a GET of it (raises on failure)."""


@dataclass(slots=True)
class MetricsSample:
    """The figures of one scrape of one worker: counters and cumulative histogram buckets."""

    at: float
    """time.monotonic() of the scrape."""
    num_requests: float = 0.0
    num_prompt_tokens: float = 0.0
    ttft_buckets: dict[float, float] = field(default_factory=dict)
    """Upper bound (seconds, inf for +Inf) -> cumulative count."""
    itl_buckets: dict[float, float] = field(default_factory=dict)


def parse_metrics(text: str, at: float) -> MetricsSample:
    """The planner's figures from a worker's /metrics text."""
    sample = MetricsSample(at)
    buckets = {TTFT: sample.ttft_buckets, ITL: sample.itl_buckets}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if family.name == REQUESTS and s.name.endswith("_total") and s.labels.get("status") in FINISHED_STATUSES:
                sample.num_requests += s.value
            elif family.name == PROMPT_TOKENS and s.name.endswith("_total"):
                sample.num_prompt_tokens += s.value
            elif family.name in buckets and s.name.endswith("_bucket"):
                buckets[family.name][float(s.labels["le"])] = s.value
    return sample


def counter_delta(new: float, old: float) -> float:
    """How much a counter grew; after a reset (it went down) its whole new value."""
    return new - old if new >= old else new


def bucket_deltas(new: dict[float, float], old: dict[float, float]) -> dict[float, float]:
    if any(new.get(le, 0.0) < count for le, count in old.items()):  # a reset
        return dict(new)
    return {le: count - old.get(le, 0.0) for le, count in new.items()}


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus's histogram_quantile over cumulative `buckets` (le -> count), in the buckets' unit;
    None without observations. Past the last finite bound it answers that bound."""
    assert 0 < q < 1
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return lower
            return lower + (le - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = le, count
    return lower


@dataclass(slots=True)
class MetricsDelta:
    """One worker's figures between two scrapes."""

    seconds: float
    num_requests: float
    num_prompt_tokens: float
    ttft: dict[float, float]
    itl: dict[float, float]


def sample_delta(new: MetricsSample, old: MetricsSample) -> MetricsDelta | None:
    """What happened between two scrapes of one worker (None when no time passed)."""
    seconds = new.at - old.at
    if seconds <= 0:
        return None
    return MetricsDelta(seconds, counter_delta(new.num_requests, old.num_requests),
                        counter_delta(new.num_prompt_tokens, old.num_prompt_tokens),
                        bucket_deltas(new.ttft_buckets, old.ttft_buckets),
                        bucket_deltas(new.itl_buckets, old.itl_buckets))


async def aiohttp_fetch(url: str, timeout_s: float = 5.0) -> str:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        async with session.get(url) as resp:
            resp.raise_for_status()
            return await resp.text()


class LoadObserver:
    """Reads each pool's load once per interval (`observe`). `model`: only the workers serving it
    (None: all); `quantile`: of the TTFT and ITL figures (0.9 by default)."""

    def __init__(self, registry: Registry, model: str | None = None, quantile: float = 0.9,
                 fetch: Fetch = aiohttp_fetch) -> None:
        if not 0 < quantile < 1:
            raise ValueError(f"quantile must be in (0, 1), got {quantile}")
        self.registry, self.model, self.quantile, self.fetch = registry, model, quantile, fetch
        self._last: dict[str, MetricsSample] = {}
        """worker id -> its previous scrape."""

    async def observe(self) -> list[PoolObservation]:
        """One observation per pool role (prefill, decode), with 0 replicas for an empty pool."""
        workers = [w for w in await self.registry.list_workers()
                   if w.role in POOL_ROLES and (self.model is None or w.model == self.model)]
        samples = await asyncio.gather(*(self._scrape(w) for w in workers))
        deltas = [sample_delta(s, self._last[w.worker_id]) if s is not None and w.worker_id in self._last else None
                  for w, s in zip(workers, samples)]
        live = {w.worker_id for w in workers}
        self._last = {worker_id: s for worker_id, s in self._last.items() if worker_id in live}
        self._last.update({w.worker_id: s for w, s in zip(workers, samples) if s is not None})
        return [self._pool(role, [(w, d) for w, d in zip(workers, deltas) if w.role == role]) for role in POOL_ROLES]

    async def _scrape(self, w: WorkerInfo) -> MetricsSample | None:
        if w.metrics_target is None:
            return None
        try:
            text = await self.fetch(f"http://{w.metrics_target}/metrics")
            return parse_metrics(text, time.monotonic())
        except Exception as e:  # a worker that just left, or a network error: its registry load still counts
            logger.info("cannot read the metrics of worker %s at %s: %s", w.worker_id, w.metrics_target, e)
            return None

    def _pool(self, role: str, workers: list[tuple[WorkerInfo, MetricsDelta | None]]) -> PoolObservation:
        loads = [w.load for w, _ in workers]
        deltas = [d for _, d in workers if d is not None]
        ttft, itl = defaultdict(float), defaultdict(float)
        for d in deltas:
            for le, n in d.ttft.items():
                ttft[le] += n
            for le, n in d.itl.items():
                itl[le] += n
        ttft_s, itl_s = histogram_quantile(self.quantile, ttft), histogram_quantile(self.quantile, itl)
        return PoolObservation(
            role, len(workers),
            request_rate=sum(d.num_requests / d.seconds for d in deltas),
            prompt_token_rate=sum(d.num_prompt_tokens / d.seconds for d in deltas),
            num_queued_prefill_tokens=sum(x.num_queued_prefill_tokens for x in loads),
            num_running=sum(x.num_running for x in loads),
            kv_usage=sum(x.kv_usage for x in loads) / len(loads) if loads else 0.0,
            ttft_ms=None if ttft_s is None else ttft_s * 1000,
            itl_ms=None if itl_s is None else itl_s * 1000)
