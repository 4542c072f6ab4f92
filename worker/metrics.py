"""Prometheus metrics of one worker, and the small HTTP server (aiohttp, in the worker's event loop)
that serves them: GET /metrics, and GET /health (200 while serving, 503 otherwise).

Each `WorkerMetrics` has its own CollectorRegistry (tests run several workers in one process).
No metric carries a worker id: Prometheus adds the target's labels (the router's
/metrics/targets gives worker, role and model), and `kvweave_worker_info` names them too.
Where each figure is measured:
- requests, tokens, latencies and chunk-cache figures: per call in `WorkerService.Generate`
  (worker/service.py), through `RequestMetrics`; latencies count from the call's arrival;
- load, KV blocks per tier and prefix-cache figures: read from the engine's latest `WorkerLoad`
  at scrape time (`_EngineCollector`); so are the engine's step counts and time by phase
  (worker/step_profile.py);
- KV transfers: `kv_transferred` once per fetch from a peer (worker/kv_prefetch.py) and per
  fetch served to a peer (kvstore/transfer.py, kvstore/tcp_transfer.py);
- image embeddings: `image_embedded` once per image a request or an Encode call needed
  (worker/embedding_stage.py);
- prefill/decode handoffs: `handoff_pulled` once per handoff a decode worker pulls
  (worker/kv_prefetch.py); what a prefill worker holds, made, released and let expire is read
  from its engine at scrape time.
Every metric is described in docs/metrics.md.
"""
from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kvweave.metrics import CONTENT_TYPE, E2E_BUCKETS, ITL_BUCKETS, TTFT_BUCKETS, serve_http
from worker.async_engine import AsyncEngine
from worker.kv_connector import SOURCES
from worker.output import RequestOutput

REQUEST_STATUSES = ("stop", "length", "abort", "handoff", "invalid", "error", "overloaded")
"""`status` of kvweave_worker_requests_total: the finish reason (handoff: a prefill-only request whose
KV is held for a decode worker), invalid (rejected input), error (an internal failure) or overloaded
(refused: too many requests waiting, RESOURCE_EXHAUSTED)."""
FINISHED_STATUSES = frozenset({"stop", "length", "abort", "handoff"})
"""Statuses of requests the engine accepted and ended; only those count tokens and e2e latency."""
HANDOFF_PULL_RESULTS = ("complete", "partial", "failed")
"""`result` of kvweave_worker_handoff_pulls_total: every block pulled, some (the rest computed), none."""
DIRECTIONS = ("in", "out")
"""KV transfer directions: in = fetched from peers, out = served to peers."""
REFUSAL_PLANES = ("grpc", "kv_data")
"""`plane` of kvweave_worker_unauthenticated_calls_total: the worker's gRPC services, the TCP KV data plane."""
IMAGE_SOURCES = ("cached", "fetched", "encoded")
"""`source` of kvweave_worker_image_embeddings_total: this worker's caches, a peer's (through the KV
transfer path), or encoded here."""
TRANSFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class WorkerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.info = Gauge("kvweave_worker_info", "This worker: its id, role and model (always 1)",
                          ["worker", "role", "model"], registry=r)
        self.requests = Counter("kvweave_worker_requests", "Requests by final status (stop, length, abort: "
                                "finish reason; invalid: rejected input; error: internal failure)", ["status"],
                                registry=r)
        self.prompt_tokens = Counter("kvweave_worker_prompt_tokens", "Prompt tokens of the finished requests",
                                     registry=r)
        self.generation_tokens = Counter("kvweave_worker_generation_tokens", "Tokens generated (counted as "
                                         "they stream)", registry=r)
        self.ttft = Histogram("kvweave_worker_time_to_first_token_seconds", "From a request's arrival to its "
                              "first token", buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("kvweave_worker_inter_token_latency_seconds", "Time between a request's "
                             "consecutive streamed outputs", buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("kvweave_worker_e2e_request_latency_seconds", "From a request's arrival to its "
                             "end (stop, length or abort)", buckets=E2E_BUCKETS, registry=r)
        self.chunk_query_tokens = Counter("kvweave_worker_chunk_cache_query_tokens", "Prompt tokens inside "
                                          "reusable chunks of the finished requests", registry=r)
        self.chunk_hit_tokens = Counter("kvweave_worker_chunk_cache_hit_tokens", "Of those, the tokens served "
                                        "from chunk-caches (recomputed ones included)", registry=r)
        self.recomputed_tokens = Counter("kvweave_worker_recomputed_tokens", "Of the chunk-cache hit tokens, "
                                         "those recomputed in their new context", registry=r)
        self.transfer_bytes = Counter("kvweave_worker_kv_transfer_bytes", "KV bytes moved between workers "
                                      "(in: fetched from peers, out: served to peers)", ["direction"], registry=r)
        self.transfer_seconds = Histogram("kvweave_worker_kv_transfer_seconds", "Duration of one KV fetch from "
                                          "a peer (in) or served to a peer (out)", ["direction"],
                                          buckets=TRANSFER_BUCKETS, registry=r)
        self.transfer_failures = Counter("kvweave_worker_kv_transfer_failures", "KV fetches from peers that "
                                         "failed (their KV is computed instead)", registry=r)
        self.handoff_pulls = Counter("kvweave_worker_handoff_pulls", "Prefill handoffs this (decode) worker "
                                     "pulled, by result (complete; partial or failed: the rest computed here)",
                                     ["result"], registry=r)
        self.handoff_bytes = Counter("kvweave_worker_handoff_bytes", "KV bytes of prefill handoffs pulled",
                                     registry=r)
        self.handoff_seconds = Histogram("kvweave_worker_handoff_seconds", "How long a handed-off request waited "
                                         "for its KV (blocks pulled during the prefill not counted)",
                                         buckets=TRANSFER_BUCKETS, registry=r)
        self.image_embeddings = Counter("kvweave_worker_image_embeddings", "Images whose embeddings this worker "
                                        "needed, by where they came from (cached here, fetched from a peer, "
                                        "encoded here)", ["source"], registry=r)
        self.encode_seconds = Histogram("kvweave_worker_image_encode_seconds", "Time to encode one image's "
                                        "embeddings here (preprocessing and the vision tower)",
                                        buckets=TRANSFER_BUCKETS, registry=r)
        for source in IMAGE_SOURCES:
            self.image_embeddings.labels(source)
        for result in HANDOFF_PULL_RESULTS:
            self.handoff_pulls.labels(result)
        for status in REQUEST_STATUSES:  # every series exists from the start (rates of 0, not missing)
            self.requests.labels(status)
        for direction in DIRECTIONS:
            self.transfer_bytes.labels(direction)
            self.transfer_seconds.labels(direction)

    def watch(self, engine: AsyncEngine, worker_id: str, role: str) -> None:
        """Report this engine (its load at scrape time) as worker `worker_id` of `role`."""
        self.info.labels(worker_id, role, engine.engine.model_name).set(1)
        self.registry.register(_EngineCollector(engine))

    def watch_refusals(self, read: Callable[[], dict[str, int]]) -> None:
        """Report the calls refused for lacking the cluster credential, per plane (`REFUSAL_PLANES`),
        as `read()` counts them at scrape time."""
        self.registry.register(_RefusalCollector(read))

    def request(self, num_prompt_tokens: int, num_chunk_tokens: int) -> "RequestMetrics":
        """Start measuring one call (now is its arrival)."""
        return RequestMetrics(self, num_prompt_tokens, num_chunk_tokens)

    def kv_transferred(self, direction: str, nbytes: int, seconds: float) -> None:
        """One KV fetch from a peer ("in") or served to one ("out") completed."""
        self.transfer_bytes.labels(direction).inc(nbytes)
        self.transfer_seconds.labels(direction).observe(seconds)

    def kv_transfer_failed(self) -> None:
        self.transfer_failures.inc()

    def image_embedded(self, source: str, encode_seconds: float = 0.0) -> None:
        """One image's embeddings were found (`IMAGE_SOURCES`); encoded ones with their time."""
        self.image_embeddings.labels(source).inc()
        if source == "encoded":
            self.encode_seconds.observe(encode_seconds)

    def handoff_pulled(self, result: str, nbytes: int, seconds: float) -> None:
        """A decode worker pulled (or failed to pull) one prefill handoff's KV."""
        self.handoff_pulls.labels(result).inc()
        if result != "failed":
            self.handoff_bytes.inc(nbytes)
            self.handoff_seconds.observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetrics:
    """One call's figures: `output` for each streamed output, `finish` once at the end."""

    __slots__ = ("metrics", "num_prompt_tokens", "num_chunk_tokens", "arrival", "last_token_at", "last")

    def __init__(self, metrics: WorkerMetrics, num_prompt_tokens: int, num_chunk_tokens: int) -> None:
        self.metrics = metrics
        self.num_prompt_tokens, self.num_chunk_tokens = num_prompt_tokens, num_chunk_tokens
        self.arrival = time.perf_counter()
        self.last_token_at: float | None = None
        self.last: RequestOutput | None = None

    def output(self, out: RequestOutput) -> None:
        self.last = out
        if not out.new_token_ids:
            return
        now = time.perf_counter()
        m = self.metrics
        if self.last_token_at is None:
            m.ttft.observe(now - self.arrival)
        else:
            m.itl.observe(now - self.last_token_at)
        self.last_token_at = now
        m.generation_tokens.inc(len(out.new_token_ids))

    def finish(self, status: str) -> None:
        m = self.metrics
        m.requests.labels(status).inc()
        if status not in FINISHED_STATUSES:
            return
        m.e2e.observe(time.perf_counter() - self.arrival)
        m.prompt_tokens.inc(self.num_prompt_tokens)
        m.chunk_query_tokens.inc(self.num_chunk_tokens)
        if self.last is not None:
            m.chunk_hit_tokens.inc(self.last.num_chunk_reused_tokens)
            m.recomputed_tokens.inc(self.last.num_recomputed_tokens)


class _EngineCollector:
    """The engine's load, KV blocks per tier and prefix-cache figures, read at scrape time."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        store = engine.engine.store
        self.capacities = {t.name: t.capacity for t in store.tiers} if store is not None else {}
        """Entries (one block each) every host tier can hold."""

    def describe(self):
        return []

    def collect(self):
        load = self.engine.get_load()
        yield _gauge("kvweave_worker_num_requests_running", "Requests in the engine's running batch",
                     load.num_running)
        yield _gauge("kvweave_worker_num_requests_waiting", "Requests waiting to be scheduled", load.num_waiting)
        yield _gauge("kvweave_worker_queued_prefill_tokens", "Prompt tokens of waiting and running requests "
                     "not computed yet", load.num_queued_prefill_tokens)
        blocks = GaugeMetricFamily("kvweave_worker_kv_blocks", "KV blocks per tier (device, dram, ssd), used "
                                   "and free", labels=["tier", "state"])
        blocks.add_metric(["device", "used"], load.num_kv_blocks_used)
        blocks.add_metric(["device", "free"], load.num_kv_blocks_total - load.num_kv_blocks_used)
        for tier, capacity in self.capacities.items():
            used = load.kv_entries.get(tier, 0)
            blocks.add_metric([tier, "used"], used)
            blocks.add_metric([tier, "free"], capacity - used)
        yield blocks
        query = CounterMetricFamily("kvweave_worker_prefix_cache_query_tokens", "Prompt tokens looked up in "
                                    "the prefix cache at admission")
        query.add_metric([], load.prefix_query_tokens)
        yield query
        hits = CounterMetricFamily("kvweave_worker_prefix_cache_hit_tokens", "Of those, the tokens served "
                                   "instead of computed, by source (device, dram, ssd, peer)", labels=["source"])
        for source in SOURCES:
            hits.add_metric([source], load.prefix_hit_tokens.get(source, 0))
        yield hits
        profile = self.engine.engine.profile
        steps = CounterMetricFamily("kvweave_worker_steps", "Engine steps that ran the model, by kind (decode: "
                                    "every request decoded one token; mixed: some prefilled)", labels=["kind"])
        phases = CounterMetricFamily("kvweave_worker_step_seconds", "Time of the engine's steps by kind and "
                                     "phase (schedule, prepare, forward, sample, update)", labels=["kind", "phase"])
        for kind, n in list(profile.steps.items()):
            steps.add_metric([kind], n)
            for phase, seconds in list(profile.seconds[kind].items()):
                phases.add_metric([kind, phase], seconds)
        yield steps
        yield phases
        handoffs = self.engine.engine.handoffs
        yield _gauge("kvweave_worker_handoff_held_blocks", "KV blocks this (prefill) worker holds for decode "
                     "workers", handoffs.num_blocks)
        made = CounterMetricFamily("kvweave_worker_handoffs", "Prefill handoffs this worker made, by what "
                                   "ended them (created; released by the decode worker; expired unreleased)",
                                   labels=["event"])
        stats = handoffs.stats
        for event, value in (("created", stats.created), ("released", stats.released), ("expired", stats.expired)):
            made.add_metric([event], value)
        yield made


class _RefusalCollector:
    def __init__(self, read: Callable[[], dict[str, int]]) -> None:
        self.read = read

    def describe(self):
        return []

    def collect(self):
        counts = self.read()
        refused = CounterMetricFamily("kvweave_worker_unauthenticated_calls", "Calls refused for lacking the "
                                      "cluster credential, by plane (grpc, kv_data)", labels=["plane"])
        for plane in REFUSAL_PLANES:
            refused.add_metric([plane], counts.get(plane, 0))
        yield refused


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


async def start_metrics_server(metrics: WorkerMetrics, host: str, port: int, serving: Callable[[], bool]
                               ) -> tuple[web.AppRunner, int]:
    """Serve GET /metrics and GET /health (200 while `serving()`, else 503) on host:port (0: a free
    port); returns the runner (`await runner.cleanup()` stops it) and the bound port. Raises OSError
    when the port cannot be bound."""
    async def get_metrics(request: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    async def health(request: web.Request) -> web.Response:
        ok = serving()
        return web.json_response({"status": "serving" if ok else "not_serving"}, status=200 if ok else 503)

    return await serve_http({"/metrics": get_metrics, "/health": health}, host, port)
