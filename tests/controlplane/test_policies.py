"""Routing policies on hand-built worker states: exact picks."""
from __future__ import annotations

import pytest

from controlplane.policies import (
    POLICIES, Decision, PolicyError, PrefixAwarePolicy, RouteRequest, SessionPolicy, WorkerState, make_policy,
)


def workers(*specs: dict) -> list[WorkerState]:
    return [WorkerState(worker_id=f"w{i}", **spec) for i, spec in enumerate(specs)]


def picks(policy, request: RouteRequest, states: list[WorkerState], n: int) -> list[str]:
    return [policy.pick(request, states).worker_id for _ in range(n)]


REQ = RouteRequest(num_prompt_tokens=256)


def test_round_robin_cycles():
    assert picks(make_policy("round_robin"), REQ, workers({}, {}, {}), 7) == ["w0", "w1", "w2", "w0", "w1", "w2", "w0"]


def test_round_robin_ignores_load():
    states = workers({"num_running": 50}, {})
    assert picks(make_policy("round_robin"), REQ, states, 2) == ["w0", "w1"]


def test_least_loaded_fewest_requests_then_queued_prefill():
    policy = make_policy("least_loaded")
    states = workers({"num_running": 3}, {"num_running": 1, "num_waiting": 1}, {"num_waiting": 4})
    assert policy.pick(REQ, states).worker_id == "w1"
    states = workers({"num_running": 2, "num_queued_prefill_tokens": 900}, {"num_running": 2, "num_queued_prefill_tokens": 100})
    assert policy.pick(REQ, states).worker_id == "w1"


def test_least_loaded_spreads_ties():
    assert sorted(picks(make_policy("least_loaded"), REQ, workers({}, {}, {}), 3)) == ["w0", "w1", "w2"]


def test_prefix_aware_picks_the_holder():
    policy = make_policy("prefix_aware")
    states = workers({}, {"num_hit_blocks": 12}, {"num_hit_blocks": 3})
    decision = policy.pick(RouteRequest(num_prompt_tokens=16 * 14), states)
    assert decision.worker_id == "w1"
    assert decision.reason == "cost"
    # 64 to compute and 2 to store (churn) each uncached token
    assert decision.costs == {"w0": 66.0 * 224, "w1": 66.0 * 32, "w2": 66.0 * 176}


def test_prefix_aware_holder_wins_despite_a_little_load():
    states = workers({"num_running": 2, "num_hit_blocks": 12}, {})
    assert make_policy("prefix_aware").pick(RouteRequest(num_prompt_tokens=224), states).worker_id == "w0"


def test_prefix_aware_queued_prefill_outweighs_a_small_hit():
    states = workers({"num_hit_blocks": 1, "num_queued_prefill_tokens": 4000}, {})
    assert make_policy("prefix_aware").pick(RouteRequest(num_prompt_tokens=224), states).worker_id == "w1"


def test_prefix_aware_spreads_unrelated_requests():
    policy = make_policy("prefix_aware")
    assert sorted(picks(policy, REQ, workers({}, {}, {}, {}), 4)) == ["w0", "w1", "w2", "w3"]


def test_prefix_aware_tie_prefers_emptier_cache():
    states = workers({"num_kv_blocks_used": 90, "num_kv_blocks_total": 100},
                     {"num_kv_blocks_used": 10, "num_kv_blocks_total": 100})
    assert picks(make_policy("prefix_aware", churn_weight=0, traffic_weight=0), REQ, states, 2) == ["w1", "w1"]
    # With the churn term the first pick's new tokens count against w1 next time, and so does the
    # request itself with the traffic term (both are on by default).
    assert picks(make_policy("prefix_aware", traffic_weight=0), REQ, states, 2) == ["w1", "w0"]
    assert picks(make_policy("prefix_aware", churn_weight=0), REQ, states, 2) == ["w1", "w0"]


def test_prefix_aware_churn_fades_with_its_half_life():
    policy = make_policy("prefix_aware", churn_weight=1.0, churn_half_life=2)
    states = workers({"num_hit_blocks": 4}, {})  # 64 of REQ's 256 tokens held on w0
    assert policy.pick(REQ, states).worker_id == "w0"
    assert policy.get_churn("w0") == 192.0 and policy.get_churn("w1") == 0.0
    assert policy.pick(REQ, workers({}, {})).worker_id == "w1"  # w0's 192 recent tokens break the tie
    assert policy.get_churn("w0") == pytest.approx(192 * 0.5 ** 0.5) and policy.get_churn("w1") == 256.0
    policy.pick(REQ, workers({"num_hit_blocks": 16}, {"num_hit_blocks": 16}))  # nothing new: both only fade
    assert policy.get_churn("w0") == pytest.approx(96.0) and policy.get_churn("w1") == pytest.approx(256 * 0.5 ** 0.5)
    # A worker that left is forgotten.
    policy.pick(REQ, [WorkerState("w1")])
    assert policy.get_churn("w0") == 0.0


def test_prefix_aware_traffic_spreads_returning_sessions():
    # Each worker holds one session's prefix; the sessions on w0 come back far more often. A
    # returning request stores nothing new (no churn), so only the traffic term keeps new sessions
    # (no hit anywhere) off the worker that already takes most requests.
    policy = make_policy("prefix_aware", churn_weight=0)
    held = workers({"num_hit_blocks": 16}, {})
    for _ in range(6):
        assert policy.pick(REQ, held).worker_id == "w0"  # its cached prefix outweighs the traffic
    assert policy.get_traffic("w0") == pytest.approx(sum(policy._churn_decay ** i for i in range(6)))
    assert policy.get_traffic("w1") == 0.0
    assert policy.pick(REQ, workers({}, {})).worker_id == "w1"
    # The two terms fade alike, with churn_half_life.
    policy = make_policy("prefix_aware", churn_half_life=1)
    policy.pick(REQ, workers({"num_hit_blocks": 16}, {}))
    policy.pick(REQ, workers({}, {}))
    assert policy.get_traffic("w0") == pytest.approx(0.5) and policy.get_traffic("w1") == 1.0
    # Off, new sessions break the tie by the prompt's first block alone.
    off = make_policy("prefix_aware", churn_weight=0, traffic_weight=0)
    for _ in range(6):
        off.pick(REQ, held)
    assert off.pick(REQ, workers({}, {})).worker_id == make_policy("prefix_aware", churn_weight=0,
                                                                    traffic_weight=0).pick(REQ, workers({}, {})).worker_id
    with pytest.raises(PolicyError, match="traffic_weight"):
        make_policy("prefix_aware", traffic_weight=-1)


def test_prefix_aware_churn_spreads_new_prefixes_by_their_size():
    policy = make_policy("prefix_aware")
    big, small = RouteRequest(num_prompt_tokens=4096), RouteRequest(num_prompt_tokens=256)
    states = workers({}, {}, {})
    first = policy.pick(big, states).worker_id
    # Two small prefixes go elsewhere before the worker that took the big one gets another.
    assert first not in picks(policy, small, states, 2)
    with pytest.raises(PolicyError, match="churn_half_life"):
        make_policy("prefix_aware", churn_half_life=0)
    with pytest.raises(PolicyError, match="churn_weight"):
        make_policy("prefix_aware", churn_weight=-1)


def test_prefix_aware_falls_back_on_imbalance():
    policy = PrefixAwarePolicy(balance_abs_threshold=8, balance_rel_threshold=1.5)
    request = RouteRequest(num_prompt_tokens=16 * 64)
    held = {"num_hit_blocks": 64}
    # 20 vs 2 requests: both thresholds exceeded -> least loaded, whatever the cache says.
    decision = policy.pick(request, workers({"num_running": 20, **held}, {"num_running": 2}))
    assert (decision.worker_id, decision.reason) == ("w1", "imbalance")
    # 10 vs 3: absolute gap 7 <= 8 -> the holder.
    assert policy.pick(request, workers({"num_running": 10, **held}, {"num_running": 3})).worker_id == "w0"
    # 60 vs 50: gap 10 > 8 but 60 <= 1.5 * 50 -> the holder.
    assert policy.pick(request, workers({"num_running": 60, **held}, {"num_running": 50})).worker_id == "w0"


def test_session_is_sticky():
    policy = make_policy("session")
    first = policy.pick(RouteRequest(256, session_id="s1"), workers({}, {}))
    # Later the other worker holds the prefix and is idle: the session still stays.
    states = workers({"num_running": 5}, {"num_hit_blocks": 16})
    for w in states:
        w.num_running = 5 if w.worker_id == first.worker_id else 0
    decision = policy.pick(RouteRequest(256, session_id="s1"), states)
    assert (decision.worker_id, decision.reason) == (first.worker_id, "sticky")


def test_session_falls_back_when_its_worker_is_gone():
    policy = make_policy("session", fallback="least_loaded")
    assert policy.pick(RouteRequest(256, session_id="s1"), workers({}, {"num_running": 1})).worker_id == "w0"
    remaining = [WorkerState("w1", num_running=1), WorkerState("w2", num_running=3)]
    decision = policy.pick(RouteRequest(256, session_id="s1"), remaining)
    assert (decision.worker_id, decision.reason) == ("w1", "new:least_loaded")
    # ... and the session now sticks to its new worker.
    assert policy.pick(RouteRequest(256, session_id="s1"), remaining + [WorkerState("w0")]).worker_id == "w1"


def test_session_without_id_uses_fallback():
    policy = make_policy("session")
    decision = policy.pick(RouteRequest(224), workers({}, {"num_hit_blocks": 12}))
    assert decision.worker_id == "w1"
    assert decision.reason == "new:cost"


def test_session_map_is_bounded():
    policy = SessionPolicy(max_sessions=2, fallback="round_robin")
    states = workers({}, {})
    for sid in ("a", "b", "c"):
        policy.pick(RouteRequest(16, session_id=sid), states)
    assert list(policy._sessions) == ["b", "c"]


def test_unknown_policy_lists_valid_names():
    with pytest.raises(PolicyError) as exc:
        make_policy("fastest")
    for name in POLICIES:
        assert name in str(exc.value)


def test_bad_policy_options_are_typed_errors():
    with pytest.raises(PolicyError, match="prefix_aware"):
        make_policy("prefix_aware", prefill_wieght=2.0)
    with pytest.raises(PolicyError):
        make_policy("prefix_aware", balance_rel_threshold=0.5)
    with pytest.raises(PolicyError):
        make_policy("session", fallback="session")


def test_needs_index():
    assert {name for name, cls in POLICIES.items() if cls.needs_index} == {"chunk_aware", "prefix_aware", "session"}


def test_decision_is_plain_data():
    d = make_policy("round_robin").pick(REQ, workers({}))
    assert d == Decision("w0", "round_robin", "rotation", {})


def test_prefix_aware_cost_uses_the_tier_of_each_block():
    from controlplane.policies import DEFAULT_KV_COSTS_MS, prefill_work

    policy = make_policy("prefix_aware")
    # 8 leading blocks of a 160-token prompt: on the device, in DRAM, on SSD, only on a peer.
    device, dram, ssd, peer = (WorkerState(f"w{c}", hit_tiers=c * 8) for c in (b"1", b"2", b"3", b"0"))
    assert prefill_work(160, device) == 32
    assert prefill_work(160, dram) == pytest.approx(32 + 128 * DEFAULT_KV_COSTS_MS["dram"])
    assert prefill_work(160, peer) == pytest.approx(32 + 128 * DEFAULT_KV_COSTS_MS["peer"])
    costs = [policy.cost(RouteRequest(160), w) for w in (device, dram, ssd, peer)]
    assert costs == sorted(costs) and len(set(costs)) == 4
    # A worker's own measurements replace the defaults: a slow disk loses to recomputing elsewhere.
    slow_disk = WorkerState("slow", hit_tiers=b"33333333", kv_costs_ms={"ssd": 2.0, "recompute": 1.0})
    nothing = WorkerState("none", hit_tiers=b"00000000", kv_costs_ms={"peer": 0.5, "recompute": 1.0})
    assert policy.pick(RouteRequest(160), [slow_disk, nothing]).worker_id == "none"
    # Mixed codes count each block by its own tier.
    mixed = WorkerState("m", hit_tiers=b"1120", kv_costs_ms={"dram": 0.1, "peer": 0.5, "recompute": 1.0})
    assert prefill_work(64, mixed) == pytest.approx(16 * 0.1 + 16 * 0.5)


def test_stored_tokens_end_at_the_first_block_only_a_peer_holds():
    from controlplane.policies import DEFAULT_KV_COSTS_MS, stored_tokens

    assert stored_tokens(100, WorkerState("a", hit_tiers=b"1120", block_size=16)) == 100 - 48  # device, device, DRAM
    assert stored_tokens(100, WorkerState("a", hit_tiers=b"0111", block_size=16)) == 100  # fetched blocks are new here
    assert stored_tokens(100, WorkerState("a", num_hit_blocks=2, block_size=16)) == 68  # no tier codes: the hit run
    # A peer's blocks cost little to fetch but are stored anew: the holder wins what the churn term adds.
    policy = make_policy("prefix_aware")
    holder, fetcher = WorkerState("h", hit_tiers=b"1" * 10), WorkerState("f", hit_tiers=b"0" * 10)
    request = RouteRequest(num_prompt_tokens=180)
    assert policy.cost(request, fetcher) - policy.cost(request, holder) == pytest.approx(
        policy.prefill_weight * 160 * DEFAULT_KV_COSTS_MS["peer"] + policy.churn_weight * 160)
