"""Route explanations: what the router predicted for a request, and whether the worker delivered it.

The policy decides from each worker's `WorkerState` (its index hits by tier, its load) and, where it
scores, a cost per worker (`Decision.costs`). This module reads those same numbers, it computes no
score of its own:
- `predict` turns the decision into a `RoutePrediction` (the chosen worker's predicted prefix and
  chunk tokens by source, its cost and the runner-up's), which the request's usage carries to the
  client (HTTP `usage.kvweave.route`, gRPC `Usage.route`);
- `explain` lists every candidate the same way, for `POST /v1/route/explain` and `kvweave route
  explain`;
- `check_delivery` compares the prediction with what the worker reports it reused. Predicted
  tokens by source: a prefix block in the worker's own tier (device, dram, ssd) or fetched from a
  peer (peer); a reusable chunk's tokens beyond the prefix run, by the tier the worker gets its
  cache from. The worker is expected to deliver at least what it holds itself ("held") and at most
  that plus what peers hold. It diverges "under" when it delivers less than held by more than
  `max(min_tokens, ratio * held)` (a stale index: the entries outlived the KV), and "over" when it
  delivers more than held + peer by more than `max(min_tokens, ratio * delivered)` (the index never
  learned what the worker holds: it stopped publishing KV events). Either way the router's choice
  was blind, so routing silently degrades to load-only; the router counts both per worker.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from controlplane.policies import Decision, RouteRequest, WorkerState
from kvstore.index import TIER_CODES

SOURCES = ("device", "dram", "ssd", "peer")
"""Where predicted tokens come from: the worker's own tiers, or a peer."""
DIVERGENCES = ("under", "over")
"""`check_delivery`'s verdicts other than "" (agreed); see the module docstring."""


@dataclass(slots=True)
class RoutePrediction:
    """What the router predicted for the worker it chose."""

    worker_id: str
    policy: str
    reason: str
    """The policy's reason ("cost", "imbalance", "sticky", "rotation", ...)."""
    prefix_tokens: dict[str, int] = field(default_factory=dict)
    """Leading prompt tokens by source (SOURCES); absent sources hold none."""
    chunk_tokens: dict[str, int] = field(default_factory=dict)
    """Reusable-chunk tokens beyond the prefix run, by the source of their cache."""
    cost: float | None = None
    """The chosen worker's cost (None: the policy did not score, e.g. least-loaded fallback)."""
    runner_up_id: str = ""
    runner_up_cost: float | None = None

    @property
    def held_tokens(self) -> int:
        """Predicted tokens in the worker's own tiers (prefix and chunks)."""
        return sum(n for d in (self.prefix_tokens, self.chunk_tokens) for s, n in d.items() if s != "peer")

    @property
    def peer_tokens(self) -> int:
        return self.prefix_tokens.get("peer", 0) + self.chunk_tokens.get("peer", 0)


@dataclass(slots=True)
class Candidate:
    """One eligible worker as the policy saw it, for `explain`."""

    prediction: RoutePrediction
    num_running: int
    num_waiting: int
    num_queued_prefill_tokens: int
    kv_usage: float


@dataclass(slots=True)
class Explanation:
    """The decision the router would make for a prompt now, and every candidate."""

    num_prompt_tokens: int
    num_chunks: int
    chosen: RoutePrediction
    candidates: list[Candidate]


def tokens_by_source(request: RouteRequest, w: WorkerState) -> tuple[dict[str, int], dict[str, int]]:
    """(prefix tokens, chunk tokens) `w` can get, by source, from its index codes (as the policy prices
    them: chunk tokens count from the end of the prefix run)."""
    prefix: dict[str, int] = {}
    for code, source in TIER_CODES.items():
        if n := w.hit_tiers.count(code):
            prefix[source] = n * w.block_size
    if not w.hit_tiers and w.num_hit_blocks:
        prefix["device"] = w.num_hit_blocks * w.block_size
    run_end = (len(w.hit_tiers) if w.hit_tiers else w.num_hit_blocks) * w.block_size
    chunks: dict[str, int] = {}
    for (start, n), code in zip(request.chunk_spans, w.chunk_tiers):
        source = TIER_CODES.get(code)
        outside = min(start + n, request.num_prompt_tokens) - max(start, run_end)
        if source is not None and outside > 0:
            chunks[source] = chunks.get(source, 0) + outside
    return prefix, chunks


def _prediction(request: RouteRequest, w: WorkerState, decision: Decision) -> RoutePrediction:
    prefix, chunks = tokens_by_source(request, w)
    return RoutePrediction(w.worker_id, decision.policy, decision.reason, prefix, chunks,
                           decision.costs.get(w.worker_id))


def predict(request: RouteRequest, workers: Sequence[WorkerState], decision: Decision) -> RoutePrediction:
    """The chosen worker's prediction, with the runner-up (the lowest cost among the others)."""
    chosen = next(w for w in workers if w.worker_id == decision.worker_id)
    out = _prediction(request, chosen, decision)
    others = [(cost, worker_id) for worker_id, cost in decision.costs.items() if worker_id != decision.worker_id]
    if others:
        out.runner_up_cost, out.runner_up_id = min(others)
    return out


def explain(request: RouteRequest, workers: Sequence[WorkerState], decision: Decision) -> Explanation:
    candidates = [Candidate(_prediction(request, w, decision), w.num_running, w.num_waiting,
                            w.num_queued_prefill_tokens, w.kv_usage) for w in workers]
    return Explanation(request.num_prompt_tokens, len(request.chunk_spans), predict(request, workers, decision),
                       candidates)


def check_delivery(prediction: RoutePrediction, delivered: int, ratio: float, min_tokens: int) -> str:
    """"" when `delivered` tokens (prefix-cached + chunk-reused) agree with the prediction, else
    "under" or "over" (see the module docstring)."""
    held = prediction.held_tokens
    if held - delivered > max(min_tokens, ratio * held):
        return "under"
    if delivered - held - prediction.peer_tokens > max(min_tokens, ratio * delivered):
        return "over"
    return ""


def prediction_json(p: RoutePrediction) -> dict:
    out = {"worker_id": p.worker_id, "policy": p.policy, "reason": p.reason,
           "prefix_tokens": dict(p.prefix_tokens), "chunk_tokens": dict(p.chunk_tokens), "cost": p.cost}
    if p.runner_up_id:
        out["runner_up"] = {"worker_id": p.runner_up_id, "cost": p.runner_up_cost}
    return out


def explanation_json(e: Explanation) -> dict:
    """The body of `POST /v1/route/explain`."""
    return {"num_prompt_tokens": e.num_prompt_tokens, "num_chunks": e.num_chunks,
            "chosen": prediction_json(e.chosen),
            "candidates": [prediction_json(c.prediction) | {
                "num_running": c.num_running, "num_waiting": c.num_waiting,
                "num_queued_prefill_tokens": c.num_queued_prefill_tokens, "kv_usage": round(c.kv_usage, 4)}
                for c in e.candidates]}
