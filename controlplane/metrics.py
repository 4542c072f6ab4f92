"""Prometheus metrics of the router, in their own CollectorRegistry (so several routers, or a router
and a worker, can live in one process, as in the tests).

Names follow vLLM's and Dynamo's conventions under the `kvweave_router_` prefix; the workers'
own metrics (`kvweave_worker_*`) are in worker/metrics.py and share the latency buckets of
kvweave/metrics.py. Every metric is described in docs/metrics.md.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from controlplane.disagg import REASONS
from controlplane.explain import DIVERGENCES
from controlplane.router_types import Usage
from kvweave.metrics import E2E_BUCKETS, ITL_BUCKETS, TTFT_BUCKETS
from kvweave.registry import ROLES

STAGES = ("tokenize", "hash", "index_lookup", "scoring", "decision")
"""Router stages timed per request; `decision` = hash + index lookup + scoring."""

_STAGE_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1)

REQUEST_STATUSES = ("ok", "invalid", "overloaded", "no_worker", "worker_error", "deadline", "error", "cancelled")
"""`status` values of kvweave_router_requests_total: ok, cancelled (the client went away first), and
the labels of controlplane/errors.py's table. Each starts at 0, so that rates of a status never
seen yet are 0 rather than missing."""

HANDOFF_RESULTS = ("handed_off", "finished_on_prefill", "prefill_failed")
"""`result` of kvweave_router_handoffs_total, per remote prefill: the prefill worker handed the KV to
the decode worker; its first token ended the request; it failed before answering (the request was
served colocated on the decode worker instead)."""


IMAGE_PLACEMENTS = ("held", "encoded", "local")
"""`placement` of kvweave_router_image_embeddings_total (controlplane/encode.py)."""

REFUSED_REASONS = ("unauthenticated", "permission_denied", "rate_limited")
"""`reason` of kvweave_router_refused_total: no or an unknown API key, a request naming another
tenant than its key's, a key past its rate limits."""
DEGRADED_REASONS = ("registry", "index_lookup")
"""`reason` of kvweave_router_degraded_total: a registry refresh failed (the router routes over the
workers it knew), a request was routed without the KV index (least-loaded) because Redis failed."""


class RouterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("kvweave_router_requests", f"Requests by final status ({', '.join(REQUEST_STATUSES)})",
                                ["status"], registry=r)
        for status in REQUEST_STATUSES:
            self.requests.labels(status)
        self.in_flight = Gauge("kvweave_router_requests_in_flight", "Requests admitted and not finished", registry=r)
        self.ttft = Histogram("kvweave_router_time_to_first_token_seconds", "Time to first token seen by the router",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("kvweave_router_inter_token_latency_seconds", "Time between streamed deltas",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("kvweave_router_e2e_request_latency_seconds", "Request latency end to end",
                             buckets=E2E_BUCKETS, registry=r)
        self.stage = Histogram("kvweave_router_stage_seconds", "Router overhead per stage", ["stage"],
                               buckets=_STAGE_BUCKETS, registry=r)
        self.workers = Gauge("kvweave_router_healthy_workers", "Workers with a live lease, by role", ["role"],
                             registry=r)
        self.decisions = Counter("kvweave_router_routing_decisions", "Routing decisions by policy and worker",
                                 ["policy", "worker"], registry=r)
        self.retries = Counter("kvweave_router_retries", "Requests retried on another worker before their "
                               "first token", registry=r)
        self.prompt_tokens = Counter("kvweave_router_prompt_tokens", "Prompt tokens of the requests that "
                                     "finished (from their usage)", registry=r)
        self.generation_tokens = Counter("kvweave_router_generation_tokens", "Generated tokens of the requests "
                                         "that finished (from their usage)", registry=r)
        self.predicted_hit_tokens = Counter("kvweave_router_predicted_prefix_hit_tokens",
                                            "Prompt tokens the chosen worker held per the KV index", registry=r)
        self.predicted_chunk_hit_tokens = Counter("kvweave_router_predicted_chunk_hit_tokens",
                                                  "Tokens of reusable chunks (beyond its prefix hit) whose cache the "
                                                  "chosen worker held per the KV index", registry=r)
        self.cached_tokens = Counter("kvweave_router_cached_tokens", "Prompt tokens the workers served from "
                                     "their prefix cache (from usage)", registry=r)
        self.chunk_reused_tokens = Counter("kvweave_router_chunk_reused_tokens", "Prompt tokens the workers "
                                           "served from chunk-caches, recomputed ones included (from usage)",
                                           registry=r)
        self.recomputed_tokens = Counter("kvweave_router_recomputed_tokens", "Chunk-reused prompt tokens the "
                                         "workers recomputed in their new context (from usage)", registry=r)
        self.disagg_decisions = Counter("kvweave_router_disagg_decisions", "Prefill/decode decisions (with "
                                        "prefill workers in the cluster), by reason", ["reason"], registry=r)
        self.handoffs = Counter("kvweave_router_handoffs", "Remote prefills by result", ["result"], registry=r)
        self.remote_prefill = Histogram("kvweave_router_remote_prefill_seconds", "From sending a request to its "
                                        "prefill worker to the handoff (or its end)", buckets=TTFT_BUCKETS,
                                        registry=r)
        self.degraded = Counter("kvweave_router_degraded", "Redis failures the router worked around, by reason "
                                f"({', '.join(DEGRADED_REASONS)})", ["reason"], registry=r)
        for reason in DEGRADED_REASONS:
            self.degraded.labels(reason)
        for reason in REASONS:
            self.disagg_decisions.labels(reason)
        for result in HANDOFF_RESULTS:
            self.handoffs.labels(result)
        self.image_embeddings = Counter("kvweave_router_image_embeddings", "Images of requests, by where the "
                                        "router found their embeddings (held: a worker holds them; encoded: an "
                                        "encode worker made them; local: no encode worker up or it failed, the "
                                        "request's worker encodes them)", ["placement"], registry=r)
        for placement in IMAGE_PLACEMENTS:
            self.image_embeddings.labels(placement)
        self.migrations = Counter("kvweave_router_migrations", "Requests moved to another worker mid-stream "
                                  "(their worker died or stalled after streaming tokens)", registry=r)
        self.breaker = Counter("kvweave_router_breaker_transitions", "Worker circuit breaker transitions: "
                               "open (a call failed or stalled), closed (the worker answered again)", ["state"],
                               registry=r)
        self.breaker_open = Gauge("kvweave_router_unhealthy_workers", "Workers whose circuit breaker is open "
                                  "(skipped by routing)", registry=r)
        for state in ("open", "closed"):
            self.breaker.labels(state)
        self.refused = Counter("kvweave_router_refused", "Calls the API-key gate refused, by reason "
                               f"({', '.join(REFUSED_REASONS)})", ["reason"], registry=r)
        for reason in REFUSED_REASONS:
            self.refused.labels(reason)
        self.route_checked = Counter("kvweave_router_route_checked_requests", "Requests whose reused tokens were "
                                     "compared with the router's prediction, by worker", ["worker"], registry=r)
        self.route_predicted = Counter("kvweave_router_route_predicted_tokens", "Of the compared requests, the "
                                       "prompt tokens the router predicted the worker held (prefix and chunks), "
                                       "by worker", ["worker"], registry=r)
        self.route_delivered = Counter("kvweave_router_route_delivered_tokens", "Of the compared requests, the "
                                       "prompt tokens the worker reported reused (prefix-cached and chunk-reused), "
                                       "by worker", ["worker"], registry=r)
        self.route_diverged = Counter("kvweave_router_route_diverged_requests", "Compared requests whose reused "
                                      "tokens diverged from the prediction, by worker and direction (under: a "
                                      "stale index; over: the worker's KV events are missing)",
                                      ["worker", "direction"], registry=r)
        self._route_workers: set[str] = set()
        # One child per stage, resolved once: labels() costs more than observe() on the hot path.
        self.stages = {name: self.stage.labels(name) for name in STAGES}

    def count_invalid(self) -> None:
        """A request a frontend rejected before handing it to the router (malformed input): the
        router's `generate` counts every other request."""
        self.requests.labels("invalid").inc()

    def count_usage(self, usage: Usage) -> None:
        """Count a finished request's usage: what its client saw."""
        self.prompt_tokens.inc(usage.prompt_tokens)
        self.generation_tokens.inc(usage.completion_tokens)
        self.cached_tokens.inc(usage.cached_tokens)
        self.chunk_reused_tokens.inc(usage.chunk_reused_tokens)
        self.recomputed_tokens.inc(usage.recomputed_tokens)

    def count_route_check(self, worker_id: str, predicted: int, delivered: int, divergence: str) -> None:
        """One request's prediction compared with its delivery (`divergence`: "", "under" or "over")."""
        self.track_route_worker(worker_id)
        self.route_checked.labels(worker_id).inc()
        self.route_predicted.labels(worker_id).inc(predicted)
        self.route_delivered.labels(worker_id).inc(delivered)
        if divergence:
            self.route_diverged.labels(worker_id, divergence).inc()

    def track_route_worker(self, worker_id: str) -> None:
        """Start a worker's route-check series at 0 (so a dashboard's ratio exists before any check)."""
        if worker_id in self._route_workers:
            return
        self._route_workers.add(worker_id)
        for metric in (self.route_checked, self.route_predicted, self.route_delivered):
            metric.labels(worker_id)
        for direction in DIVERGENCES:
            self.route_diverged.labels(worker_id, direction)

    def count_degraded(self, reason: str) -> None:
        """One Redis failure worked around (`DEGRADED_REASONS`)."""
        self.degraded.labels(reason).inc()

    def count_refused(self, reason: str) -> None:
        """A call the API-key gate refused (`REFUSED_REASONS`)."""
        self.refused.labels(reason).inc()

    def set_workers(self, counts: dict[str, int]) -> None:
        """Live workers per role (every role is reported, 0 when none)."""
        for role in ROLES:
            self.workers.labels(role).set(counts.get(role, 0))

    def count_breaker(self, opened: bool, num_open: int) -> None:
        """A worker's circuit breaker opened or closed; `num_open`: how many are open now."""
        self.breaker.labels("open" if opened else "closed").inc()
        self.breaker_open.set(num_open)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
