"""The SLA planner's decision core (controlplane/planner.py) on recorded load traces.

A trace is a list of per-interval loads; `replay` feeds it to the planner through a small model of
a pool whose true capacity per replica differs from the planner's nominal figure (latency
proportional to the load per replica, plus seeded noise), applies each decision at once, and
returns the replica count after every interval: the timeline the tests compare exactly.
`replay_flat` does the same for a pool whose latency does not fall with its replicas (a CPU decode
step that reads all the weights whatever the batch), where scale-ups must stop.
"""
from __future__ import annotations

import random

import pytest

from controlplane.planner import (MAX_FACTOR, Planner, PlannerParams, PoolObservation, PoolPolicy, REASONS,
                                  predict_next)

ITL_TARGET_MS = 50.0
TTFT_TARGET_MS = 500.0


def decode_obs(num_running: float, replicas: int, true_capacity: float, noise: float = 0.0,
               rng: random.Random | None = None) -> PoolObservation:
    """A decode pool's interval: ITL = target x running per replica / true capacity (x noise)."""
    jitter = 1 + (rng.uniform(-noise, noise) if rng else 0.0)
    itl = ITL_TARGET_MS * num_running / replicas / true_capacity * jitter if num_running else None
    return PoolObservation("decode", replicas, num_running=round(num_running * jitter), itl_ms=itl)


def replay(planner: Planner, trace: list[float], true_capacity: float, start: int = 1, noise: float = 0.0,
           seed: int = 0) -> tuple[list[int], list[str]]:
    rng = random.Random(seed)
    replicas, timeline, reasons = start, [], []
    for load in trace:
        [d] = planner.decide([decode_obs(load, replicas, true_capacity, noise, rng)])
        assert d.reason in REASONS and d.detail
        replicas = d.target_replicas
        timeline.append(replicas)
        reasons.append(d.reason)
    return timeline, reasons


def decode_planner(**params) -> Planner:
    policy = PoolPolicy(target_ms=ITL_TARGET_MS, capacity=8, min_replicas=1, max_replicas=6)
    return Planner({"decode": policy}, PlannerParams(**({"grace_intervals": 2} | params)))


def test_prediction_is_the_mean_plus_the_trend():
    assert predict_next([]) == 0.0
    assert predict_next([5.0]) == 5.0
    assert predict_next([4.0, 4.0, 4.0]) == pytest.approx(4.0)
    assert predict_next([1.0, 2.0, 3.0, 4.0]) == pytest.approx(5.0)  # a ramp is extrapolated one step
    assert predict_next([4.0, 3.0, 2.0, 1.0, 0.0]) == 0.0  # never below zero


def test_step_up_then_down_gives_the_expected_timeline():
    """Nominal capacity 8 running/replica, true 8: load 4 -> 30 -> 4. Up to ceil(30/8) = 4 at once,
    then a grace period; down when the window's mean fits fewer replicas at <= 80% of their capacity
    (4 -> 3 two intervals after the drop, then 3 -> 1 after the grace period)."""
    trace = [4] * 4 + [30] * 8 + [4] * 10
    timeline, reasons = replay(decode_planner(), trace, true_capacity=8)
    assert timeline == [1] * 4 + [4] * 10 + [3, 3, 3, 1, 1, 1, 1, 1]
    assert reasons[4:7] == ["scale_up", "grace", "grace"]
    assert reasons[14:18] == ["scale_down", "grace", "grace", "scale_down"]


def test_the_correction_factor_adds_replicas_to_a_pool_slower_than_its_nominal_capacity():
    """True capacity 4 against a nominal 8: the observed ITL is twice the predicted one, the factor
    goes to 2 and the pool ends with ceil(24 / 4) = 6 replicas, where ITL meets its target."""
    planner = decode_planner()
    timeline, _ = replay(planner, [24] * 14, true_capacity=4)
    assert timeline[0] >= 3 and timeline[-1] == 6
    assert planner.states["decode"].correction_factor == pytest.approx(2.0, rel=0.05)
    assert ITL_TARGET_MS * 24 / timeline[-1] / 4 <= ITL_TARGET_MS


@pytest.mark.parametrize("seed", range(5))
def test_steady_noisy_load_never_flaps(seed):
    """Load 18 +-15% (uniform) for 60 intervals on 3 replicas of capacity 8 (75% loaded): the
    predicted load crosses neither 24 (up) nor 16 x 0.8 (down), so the pool never changes."""
    timeline, reasons = replay(decode_planner(), [18] * 60, true_capacity=8, start=3, noise=0.15, seed=seed)
    assert timeline == [3] * 60
    assert set(reasons) == {"steady"}


def test_bounds_are_respected():
    planner = decode_planner()
    timeline, reasons = replay(planner, [200] * 5 + [0] * 10, true_capacity=8)
    assert max(timeline) == 6 and min(timeline) == 1
    assert timeline[0] == 6 and timeline[-1] == 1
    # a pool found outside the bounds (someone scaled it by hand) is brought back first
    [d] = decode_planner().decide([PoolObservation("decode", 9)])
    assert (d.target_replicas, d.reason) == (6, "bounds")
    [d] = decode_planner().decide([PoolObservation("decode", 0)])
    assert (d.target_replicas, d.reason) == (1, "bounds")


def test_grace_period_holds_the_pool_after_each_change():
    planner = decode_planner(grace_intervals=3)
    timeline, reasons = replay(planner, [4, 30, 30, 30, 30, 60, 60, 5, 5, 5], true_capacity=8)
    assert timeline == [1, 4, 4, 4, 4, 6, 6, 6, 6, 3]  # each change is followed by 3 intervals of grace
    assert reasons == ["steady", "scale_up", "grace", "grace", "grace", "scale_up", "grace", "grace", "grace",
                       "scale_down"]


def test_low_load_latency_does_not_teach_the_factor():
    """An idle pool's ITL is its floor, far above `target x load / capacity`: no correction."""
    planner = decode_planner()
    for _ in range(5):
        planner.decide([PoolObservation("decode", 2, num_running=1, itl_ms=30.0)])
    assert planner.states["decode"].correction_factor == 1.0
    planner.decide([PoolObservation("decode", 1, num_running=1, itl_ms=5000.0)])  # over target: learns
    assert planner.states["decode"].correction_factor == pytest.approx((1 + MAX_FACTOR) / 2)


def test_prefill_load_is_prompt_tokens_per_second_plus_the_queue_to_clear():
    policy = PoolPolicy(target_ms=TTFT_TARGET_MS, capacity=1000, max_replicas=4)
    planner = Planner({"prefill": policy}, PlannerParams(interval_s=10))
    [d] = planner.decide([PoolObservation("prefill", 1, prompt_token_rate=1500, num_queued_prefill_tokens=5000,
                                          ttft_ms=400)])
    assert planner.load_of(PoolObservation("prefill", 1, prompt_token_rate=1500, num_queued_prefill_tokens=5000)) \
        == 2000
    assert (d.role, d.target_replicas, d.reason) == ("prefill", 2, "scale_up")


def test_pools_are_decided_independently_and_unknown_pools_are_refused():
    planner = Planner({"prefill": PoolPolicy(TTFT_TARGET_MS, 1000), "decode": PoolPolicy(ITL_TARGET_MS, 8)})
    decisions = planner.decide([PoolObservation("prefill", 1, prompt_token_rate=100),
                                PoolObservation("decode", 1, num_running=40, itl_ms=250)])
    assert [(d.role, d.target_replicas) for d in decisions] == [("prefill", 1), ("decode", 5)]
    with pytest.raises(ValueError, match="unknown pool"):
        Planner({"colocated": PoolPolicy(1, 1)})
    with pytest.raises(ValueError, match="min_replicas"):
        PoolPolicy(50, 8, min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="hysteresis"):
        PlannerParams(hysteresis=1.0)


def test_without_correction_the_nominal_capacity_decides():
    planner = decode_planner(correction=False)
    timeline, _ = replay(planner, [24] * 6, true_capacity=4)
    assert timeline == [3] * 6 and planner.states["decode"].correction_factor == 1.0


def flat_obs(num_running: float, replicas: int, true_capacity: float) -> PoolObservation:
    """A decode pool whose step costs the same whatever its batch (a small model on a CPU): its ITL
    is that of the whole load on one replica, however many share it."""
    return decode_obs(num_running, 1, true_capacity) if num_running else PoolObservation("decode", replicas)


def replay_flat(planner: Planner, trace: list[float], true_capacity: float, start: int = 1
                ) -> tuple[list[int], list[str], list[float]]:
    replicas, timeline, reasons, factors = start, [], [], []
    for load in trace:
        obs = flat_obs(load, replicas, true_capacity)
        obs.num_replicas = replicas
        [d] = planner.decide([obs])
        assert d.reason in REASONS and d.detail
        replicas = d.target_replicas
        timeline.append(replicas)
        reasons.append(d.reason)
        factors.append(d.correction_factor)
    return timeline, reasons, factors


def test_scale_ups_that_do_not_lower_the_latency_stop_at_the_first_useless_replica():
    """Flat pool (true capacity 8 on one replica, as nominal): load 16 gives ITL 100 ms on any number
    of replicas. Interval 1: factor 1, the pool goes to 2. In grace the ITL stays at 100 (predicted
    50 at 2 replicas: the factor climbs to 1.75). The first interval after grace (load 18, within
    25% of 16) judges the scale-up futile (the ITL rose where a fall of 50 ms was predicted): the
    factor goes back to 1 and stays there, and the pool holds at 2 while the load stays near 16,
    where the load asks for a 3rd (`futile`). Without the rule (min_gain 0) the factor climbs to 6
    and the pool to its maximum."""
    trace = [16] * 3 + [18, 19, 16, 17, 16, 18] * 3
    timeline, reasons, factors = replay_flat(decode_planner(), trace, true_capacity=8)
    assert timeline == [2] * len(trace)
    assert reasons[:4] == ["scale_up", "grace", "grace", "futile"]
    assert set(reasons[3:]) == {"steady", "futile"}
    assert factors[:3] == [1.0, 1.5, 1.75] and factors[3:] == [1.0] * (len(trace) - 3)

    without, _, factors = replay_flat(decode_planner(min_gain=0.0), trace, true_capacity=8)
    assert without[-1] == 6 and factors[-1] > 5


def test_a_flat_pool_still_scales_for_a_real_load_step_and_a_drop():
    """After the hold at 2 replicas (load 16), a step to 40 leaves the band: the planner learns again
    (factor 1.5 from the ITL of 250 ms at 2 replicas) and scales up to its maximum of 6, judges that
    futile too (factor back to 1.5), and scales down to 1 when the load goes."""
    trace = [16] * 6 + [40] * 8 + [2] * 10
    timeline, reasons, factors = replay_flat(decode_planner(), trace, true_capacity=8)
    assert timeline == [2] * 6 + [6] * 10 + [5, 5, 5] + [1] * 5
    assert reasons[6] == "scale_up" and reasons[16] == "scale_down"
    assert max(factors) < MAX_FACTOR and factors[9:] == [1.5] * (len(trace) - 9)


def test_a_scale_up_that_helps_is_not_futile():
    """The proportional pool of the other timelines: ITL falls by the replicas' ratio, so the
    planner never holds (reason `futile` never appears) and the factor still learns its 2."""
    planner = decode_planner()
    _, reasons = replay(planner, [24] * 14, true_capacity=4)
    assert "futile" not in reasons and planner.states["decode"].flat is None
    assert planner.states["decode"].correction_factor == pytest.approx(2.0, rel=0.05)
    with pytest.raises(ValueError, match="min_gain"):
        PlannerParams(min_gain=1.5)


@pytest.mark.parametrize("itl_after, futile", [(90.0, True), (80.0, False)])
def test_a_scale_up_is_futile_below_min_gain_of_its_predicted_fall(itl_after, futile):
    """1 -> 2 replicas at ITL 100 ms predicts 50 ms: a fall to 90 is 0.2 of the predicted fall (under
    min_gain 0.25: the pool holds, the factor is back at its value before the scale-up), to 80 is
    0.4 (a gain: the factor learns from it and the pool scales further)."""
    planner = Planner({"decode": PoolPolicy(ITL_TARGET_MS, 16, max_replicas=4)}, PlannerParams(grace_intervals=1))
    [d] = planner.decide([PoolObservation("decode", 1, num_running=16, itl_ms=100.0)])
    assert (d.target_replicas, d.reason) == (2, "scale_up")
    [d] = planner.decide([PoolObservation("decode", 2, num_running=16, itl_ms=itl_after)])
    assert d.reason == "grace"
    [d] = planner.decide([PoolObservation("decode", 2, num_running=16, itl_ms=itl_after)])
    state = planner.states["decode"]
    if futile:
        assert (d.target_replicas, d.reason, state.correction_factor) == (2, "steady", 1.5)
        assert state.flat is not None
    else:
        assert d.reason == "scale_up" and d.target_replicas > 2 and state.flat is None
