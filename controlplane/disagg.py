"""Prefill/decode disaggregation: the per-request decision, remote prefill or colocated.

A request is prefilled on a prefill worker and handed to its decode worker only when all of these
hold (as Dynamo's conditional disaggregation and llm-d's prefix-based decider, with the handoff
priced by what the workers measured):
- `short`: its uncached part on the decode worker (after the prefix and chunk hits the index
  predicts) is longer than `threshold_tokens` (default: the decode worker's step token budget; a
  shorter prompt fits one chunked-prefill step there, where it never stalls the running decodes
  for long);
- `no_prefill_worker` / `prefill_queue_full`: a prefill worker exists and its queue of prefill
  tokens is under `max_prefill_queue_tokens`;
- `slow_handoff`: moving the KV the decode worker lacks (at its measured ms per token fetched from
  a peer) takes less than `handoff_margin` x prefilling the uncached part there (at its measured
  ms per token of recompute): a handoff slower than recomputing is never chosen.
Otherwise the request stays colocated on the decode worker. Plain data in, plain data out, so the
router, its metrics and a simulator share it; the reason is kept per request.
"""
from __future__ import annotations

from dataclasses import dataclass

from controlplane.policies import DEFAULT_KV_COSTS_MS, PolicyError, WorkerState

REASONS = ("remote", "short", "no_prefill_worker", "prefill_queue_full", "slow_handoff")
"""Every reason a decision gives (`remote` is the only one that disaggregates)."""


@dataclass
class DisaggConfig:
    threshold_tokens: int | None = None
    """Uncached prompt tokens from which a request may be prefilled remotely (None: the decode
    worker's step token budget)."""
    max_prefill_queue_tokens: int = 16384
    """A prefill worker with at least this many queued prefill tokens takes no more handoffs."""
    handoff_margin: float = 1.0
    """The predicted handoff must take under this share of the predicted local prefill."""

    def __post_init__(self) -> None:
        if self.threshold_tokens is not None and self.threshold_tokens < 0:
            raise PolicyError(f"threshold_tokens must be >= 0, got {self.threshold_tokens}")
        if self.max_prefill_queue_tokens <= 0:
            raise PolicyError(f"max_prefill_queue_tokens must be positive, got {self.max_prefill_queue_tokens}")
        if not self.handoff_margin > 0:
            raise PolicyError(f"handoff_margin must be positive, got {self.handoff_margin}")


@dataclass(frozen=True, slots=True)
class DisaggDecision:
    remote: bool
    reason: str
    uncached_tokens: int
    handoff_ms: float
    """Predicted time to move the KV the decode worker lacks (0 when not computed)."""
    local_prefill_ms: float
    """Predicted time to prefill the uncached part on the decode worker."""


def _ms_per_token(w: WorkerState, source: str) -> float:
    costs = w.kv_costs_ms or DEFAULT_KV_COSTS_MS
    return costs.get(source, DEFAULT_KV_COSTS_MS[source])


def decide(config: DisaggConfig, decode: WorkerState, prefill: WorkerState | None, uncached_tokens: int,
           tokens_to_move: int, step_budget_tokens: int) -> DisaggDecision:
    """Remote prefill or colocated for one request. `uncached_tokens`: prompt tokens the decode
    worker would compute; `tokens_to_move`: tokens whose KV it would fetch from the prefill worker
    (those it does not hold); `step_budget_tokens`: its engine's token budget per step."""
    local_ms = uncached_tokens * _ms_per_token(decode, "recompute")
    threshold = config.threshold_tokens if config.threshold_tokens is not None else step_budget_tokens
    if uncached_tokens <= threshold:
        return DisaggDecision(False, "short", uncached_tokens, 0.0, local_ms)
    if prefill is None:
        return DisaggDecision(False, "no_prefill_worker", uncached_tokens, 0.0, local_ms)
    if prefill.num_queued_prefill_tokens >= config.max_prefill_queue_tokens:
        return DisaggDecision(False, "prefill_queue_full", uncached_tokens, 0.0, local_ms)
    handoff_ms = tokens_to_move * _ms_per_token(decode, "peer")
    if handoff_ms >= config.handoff_margin * local_ms:
        return DisaggDecision(False, "slow_handoff", uncached_tokens, handoff_ms, local_ms)
    return DisaggDecision(True, "remote", uncached_tokens, handoff_ms, local_ms)
