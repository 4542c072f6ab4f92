"""The per-request disaggregation decision (controlplane/disagg.py): one test per reason, with the
workers' measured costs."""
from __future__ import annotations

import pytest

from controlplane.disagg import REASONS, DisaggConfig, decide
from controlplane.policies import PolicyError, WorkerState

COSTS = {"device": 0.0, "dram": 0.002, "ssd": 0.02, "peer": 0.03, "recompute": 1.0}


def decode(**costs) -> WorkerState:
    return WorkerState("d", kv_costs_ms=COSTS | costs)


def prefill(queued: int = 0) -> WorkerState:
    return WorkerState("p", num_queued_prefill_tokens=queued, kv_costs_ms=COSTS)


def test_a_long_uncached_prompt_goes_remote_with_its_predicted_times():
    d = decide(DisaggConfig(), decode(), prefill(), uncached_tokens=4000, tokens_to_move=4000, step_budget_tokens=512)
    assert (d.remote, d.reason) == (True, "remote")
    assert d.local_prefill_ms == 4000.0 and d.handoff_ms == pytest.approx(120.0)


def test_a_prompt_that_fits_one_step_stays_colocated():
    d = decide(DisaggConfig(), decode(), prefill(), uncached_tokens=512, tokens_to_move=512, step_budget_tokens=512)
    assert (d.remote, d.reason) == (False, "short")
    d = decide(DisaggConfig(threshold_tokens=100), decode(), prefill(), 200, 200, step_budget_tokens=512)
    assert d.remote  # an explicit threshold replaces the step budget


def test_without_a_prefill_worker_or_with_its_queue_full_it_stays_colocated():
    assert decide(DisaggConfig(), decode(), None, 4000, 4000, 512).reason == "no_prefill_worker"
    cfg = DisaggConfig(max_prefill_queue_tokens=8000)
    assert decide(cfg, decode(), prefill(queued=8000), 4000, 4000, 512).reason == "prefill_queue_full"
    assert decide(cfg, decode(), prefill(queued=7999), 4000, 4000, 512).remote


def test_a_handoff_slower_than_recomputing_is_never_chosen():
    slow = decode(peer=1.2)  # fetching a token's KV costs more than computing it
    d = decide(DisaggConfig(), slow, prefill(), 4000, 4000, 512)
    assert (d.remote, d.reason) == (False, "slow_handoff") and d.handoff_ms > d.local_prefill_ms
    # Fewer tokens to move (the decode worker holds some of their KV) can make the handoff worth it.
    assert decide(DisaggConfig(), slow, prefill(), 4000, 3000, 512).remote
    assert decide(DisaggConfig(handoff_margin=0.5), decode(peer=0.6), prefill(), 4000, 4000, 512).reason == \
        "slow_handoff"


def test_every_reason_is_listed_and_bad_config_is_refused():
    assert set(REASONS) == {"remote", "short", "no_prefill_worker", "prefill_queue_full", "slow_handoff"}
    for bad in ({"threshold_tokens": -1}, {"max_prefill_queue_tokens": 0}, {"handoff_margin": 0.0}):
        with pytest.raises(PolicyError, match=next(iter(bad))):
            DisaggConfig(**bad)
