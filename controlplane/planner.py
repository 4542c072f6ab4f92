"""The SLA planner's decision core: how many prefill and decode workers the next interval needs.

Pure: plain dataclasses in (one `PoolObservation` per pool and interval), plain `Decision`s out,
no I/O and no clock (the caller counts intervals). The observer (controlplane/planner_observer.py)
fills the observations from the registry and the workers' metrics; a connector
(controlplane/planner_connectors.py) applies the decisions.

The algorithm follows NVIDIA Dynamo's SLA planner, per pool:
- **Load.** Prefill: prompt tokens per second arriving, plus the queued prefill tokens that the
  next interval must also clear (`queued / interval_s`). Decode: requests decoding at once
  (running), since the inter-token latency grows with the decode batch.
- **Prediction.** The next interval's load is the mean of the last `window` observations plus
  their trend (the least-squares line's value at the next interval; from 3 observations on),
  never below 0: a ramp is followed ahead of time, noise is averaged away. Scaling up also covers
  the latest observed load, so a step up is followed at once.
- **Capacity and correction factor.** Each pool has a nominal load per replica at which its
  latency meets the target (`capacity`: prompt tokens/s per prefill worker, running requests per
  decode worker). The latency is modelled as proportional to the load per replica, reaching the
  target at the capacity: predicted = target x load_per_replica / capacity. Dynamo's correction
  factor is observed / predicted latency (exponentially smoothed, clamped to [1/8, 8]); the
  effective capacity is capacity / factor, so a pool slower than its nominal figure gets more
  replicas for the same load. The factor learns only from intervals with traffic and with either a
  latency above target or a load of at least `min_utilization` of the effective capacity: at low
  load the latency is its floor, which says nothing about capacity.
- **Replicas.** Up: ceil(predicted load / effective capacity) when that is more than now. Down:
  only when both the predicted load and the window's mean fit fewer replicas each loaded at most
  `1 - hysteresis` of their capacity, so a load near a boundary never flaps and a drop must last
  before replicas go (a rise is followed at once: missing the target costs more than a spare worker). Always within [min_replicas, max_replicas].
  After a change, the pool is left alone for `grace_intervals` intervals (new workers load their
  model, the latency figures settle).
- **Futile scale-ups.** Adding replicas helps only where the latency falls with the load per
  replica; where one step's cost does not depend on its batch (a small model on a CPU reads all
  its weights whatever the batch), the latency is flat in the replicas, and the factor, learning
  observed / predicted, would grow after each useless scale-up and ask for more. So a scale-up made
  with the latency over its target is judged on the first interval after its grace period, when
  the load is still within `load_tolerance` of the load it was made at: if the latency is still
  over target and fell by less than `min_gain` of the fall the model predicted (latency x old / new
  replicas), the pool's latency is flat there. The factor goes back to its value before the
  scale-up (what it learned since came from the flat relation) and stops learning, and the pool
  adds no replicas (reason `futile` where the load asks for more) until the load leaves that band
  or the replicas change (scale-downs go on as usual): then the planner learns and scales as before.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

POOL_ROLES = ("prefill", "decode")
"""The pools the planner scales; prefill is held to the TTFT target, decode to the ITL target."""
REASONS = ("scale_up", "scale_down", "steady", "grace", "bounds", "futile")
"""scale_up / scale_down: toward the predicted load; steady: within the hysteresis band; grace: a
change was made less than grace_intervals ago; bounds: brought into [min_replicas, max_replicas];
futile: held where an earlier scale-up did not lower the latency at this load."""
MIN_FACTOR, MAX_FACTOR = 0.125, 8.0
"""Bounds of the correction factor: one odd interval cannot make the capacity estimate absurd."""


@dataclass(slots=True)
class PoolObservation:
    """One pool's load over the last interval (sums and means over its workers)."""

    role: str
    num_replicas: int
    """Workers of the pool now (as the connector reports them)."""
    request_rate: float = 0.0
    """Requests finished per second over the interval."""
    prompt_token_rate: float = 0.0
    """Prompt tokens per second of the requests finished over the interval."""
    num_queued_prefill_tokens: int = 0
    """Prefill tokens queued on the pool's workers now."""
    num_running: int = 0
    """Requests in the running batches of the pool's workers now."""
    kv_usage: float = 0.0
    """Mean device KV usage of the pool's workers (0..1)."""
    ttft_ms: float | None = None
    """The pool's TTFT quantile over the interval (None: no request got a first token)."""
    itl_ms: float | None = None
    """The pool's inter-token latency quantile over the interval (None: no token pairs)."""


@dataclass(slots=True)
class Decision:
    role: str
    current_replicas: int
    target_replicas: int
    reason: str
    """Why, for logs and the `reason` label: one of REASONS."""
    detail: str
    """The figures behind it, for the log."""
    predicted_load: float = 0.0
    correction_factor: float = 1.0

    @property
    def changed(self) -> bool:
        return self.target_replicas != self.current_replicas


@dataclass
class PoolPolicy:
    """How one pool is scaled."""

    target_ms: float
    """Latency target: TTFT for prefill, ITL for decode."""
    capacity: float
    """Nominal load one replica carries at the target (prompt tokens/s, or running requests)."""
    min_replicas: int = 1
    max_replicas: int = 8

    def __post_init__(self) -> None:
        if not (self.target_ms > 0 and self.capacity > 0):
            raise ValueError(f"target_ms and capacity must be > 0, got {self.target_ms}, {self.capacity}")
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got "
                             f"{self.min_replicas}, {self.max_replicas}")


@dataclass
class PlannerParams:
    interval_s: float = 10.0
    window: int = 6
    """Intervals of load the prediction averages (and fits its trend to); they restart after a change."""
    grace_intervals: int = 3
    """Intervals after a scale change during which the pool is not changed again."""
    hysteresis: float = 0.2
    """Scale down only to replicas loaded at most 1 - hysteresis of their capacity."""
    smoothing: float = 0.5
    """Weight of the newest interval in the correction factor's moving average."""
    min_utilization: float = 0.5
    """Load per replica (share of the effective capacity) below which the factor does not learn."""
    correction: bool = True
    """Learn the correction factor (False: the nominal capacities alone decide, as Dynamo's
    planner without correction)."""
    min_gain: float = 0.25
    """Share of its predicted latency fall a scale-up must bring; less marks it futile (0: none is).
    SmolLM2-135M on 2 CPU cores, 16 streams, 1 -> 2 decode workers (predicted: -50%): ITL p99 fell
    0-8% with short prompts (futile), 20% with a 1,720-token shared context (a real gain)."""
    load_tolerance: float = 0.25
    """Relative load change within which a scale-up is judged, and a futile hold kept."""

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or self.window < 1 or self.grace_intervals < 0:
            raise ValueError(f"need interval_s > 0, window >= 1 and grace_intervals >= 0, got {self.interval_s}, "
                             f"{self.window} and {self.grace_intervals}")
        if not 0 <= self.hysteresis < 1:
            raise ValueError(f"hysteresis must be in [0, 1), got {self.hysteresis}")
        if not (0 < self.smoothing <= 1 and 0 <= self.min_utilization <= 1):
            raise ValueError("smoothing must be in (0, 1], min_utilization in [0, 1]")
        if not 0 <= self.min_gain <= 1:
            raise ValueError(f"min_gain must be in [0, 1], got {self.min_gain}")
        if not self.load_tolerance >= 0:
            raise ValueError(f"load_tolerance must be >= 0, got {self.load_tolerance}")


def predict_next(history: list[float]) -> float:
    """Mean of `history` plus its least-squares trend extrapolated one step past its end (>= 0)."""
    n = len(history)
    if n == 0:
        return 0.0
    mean = sum(history) / n
    if n < 3:  # two points make a trend of their noise
        return mean
    mid = (n - 1) / 2
    slope = sum((i - mid) * (y - mean) for i, y in enumerate(history)) / sum((i - mid) ** 2 for i in range(n))
    return max(0.0, mean + slope * (n - mid))


@dataclass(frozen=True)
class ScaleUp:
    """A scale-up made with the latency over target, to judge once its grace period is over."""

    from_replicas: int
    to_replicas: int
    load: float
    latency_ms: float
    correction_factor: float
    """The factor that chose the scale-up."""


@dataclass(frozen=True)
class FlatSpot:
    """Replicas and load at which a scale-up did not lower the latency."""

    replicas: int
    load: float


@dataclass
class PoolState:
    """What the planner remembers of one pool between intervals."""

    loads: deque = field(default_factory=deque)
    correction_factor: float = 1.0
    grace_left: int = 0
    last_up: ScaleUp | None = None
    flat: FlatSpot | None = None
    """Set while the pool holds after a futile scale-up."""


class Planner:
    """Decides each pool's replicas once per interval (`decide`), remembering load history,
    correction factors and grace periods."""

    def __init__(self, policies: dict[str, PoolPolicy], params: PlannerParams | None = None) -> None:
        if unknown := set(policies) - set(POOL_ROLES):
            raise ValueError(f"unknown pool(s) {sorted(unknown)}; valid: {', '.join(POOL_ROLES)}")
        self.policies = policies
        self.params = params or PlannerParams()
        self.states = {role: PoolState(deque(maxlen=self.params.window)) for role in policies}

    def load_of(self, obs: PoolObservation) -> float:
        if obs.role == "prefill":
            return obs.prompt_token_rate + obs.num_queued_prefill_tokens / self.params.interval_s
        return float(obs.num_running)

    @staticmethod
    def latency_of(obs: PoolObservation) -> float | None:
        return obs.ttft_ms if obs.role == "prefill" else obs.itl_ms

    def decide(self, observations: list[PoolObservation]) -> list[Decision]:
        """One decision per observed pool that has a policy."""
        return [self._decide_pool(obs) for obs in observations if obs.role in self.policies]

    def _decide_pool(self, obs: PoolObservation) -> Decision:
        policy, state = self.policies[obs.role], self.states[obs.role]
        load = self.load_of(obs)
        state.loads.append(load)
        if state.grace_left == 0 and state.last_up is not None:
            self._judge_scale_up(obs, load, policy, state)
        if state.flat and (obs.num_replicas != state.flat.replicas or not self._near(load, state.flat.load)):
            state.flat = None  # the load or the pool changed: scale and learn as before
        if state.flat is None:
            self._correct(obs, load, policy, state)
        predicted = predict_next(list(state.loads))
        capacity = policy.capacity / state.correction_factor
        n = obs.num_replicas
        figures = (f"load {load:.1f}, predicted {predicted:.1f}, capacity/replica {capacity:.1f} "
                   f"(factor {state.correction_factor:.2f}), latency {_ms(self.latency_of(obs))} "
                   f"target {policy.target_ms:g} ms")

        def decision(target: int, reason: str) -> Decision:
            return Decision(obs.role, n, target, reason, figures, predicted, state.correction_factor)

        bounded = min(max(n, policy.min_replicas), policy.max_replicas)
        if bounded != n:
            return self._changed(decision(bounded, "bounds"))
        if state.grace_left > 0:
            state.grace_left -= 1
            return decision(n, "grace")
        rising = max(predicted, load)  # serve at least what is here now
        up = min(policy.max_replicas, math.ceil(rising / capacity - 1e-9))
        if up > n and state.flat:
            return decision(n, "futile")
        if up > n:
            d, latency = self._changed(decision(up, "scale_up")), self.latency_of(obs)
            if self.params.min_gain > 0 and latency is not None and latency > policy.target_ms:
                state.last_up = ScaleUp(n, up, load, latency, state.correction_factor)  # judged after grace
            return d
        calm = max(predicted, sum(state.loads) / len(state.loads))  # down on the mean: a drop must last
        down = max(policy.min_replicas, math.ceil(calm / (capacity * (1 - self.params.hysteresis)) - 1e-9))
        if down < n:
            return self._changed(decision(down, "scale_down"))
        return decision(n, "steady")

    def _changed(self, d: Decision) -> Decision:
        state = self.states[d.role]
        state.grace_left = self.params.grace_intervals
        state.loads.clear()  # the trend that led to this change must not lead to a second one
        state.flat, state.last_up = None, None
        return d

    def _near(self, load: float, reference: float) -> bool:
        return abs(load - reference) <= self.params.load_tolerance * reference

    def _judge_scale_up(self, obs: PoolObservation, load: float, policy: PoolPolicy, state: PoolState) -> None:
        """Mark the pool flat when the last scale-up, at about the same load, did not lower the latency
        by `min_gain` of the predicted fall (see the module header)."""
        up, state.last_up = state.last_up, None
        observed = self.latency_of(obs)
        if (observed is None or observed <= policy.target_ms or obs.num_replicas != up.to_replicas
                or not self._near(load, up.load)):
            return
        predicted_fall = up.latency_ms * (1 - up.from_replicas / up.to_replicas)
        if up.latency_ms - observed < self.params.min_gain * predicted_fall:
            state.flat = FlatSpot(obs.num_replicas, up.load)
            state.correction_factor = up.correction_factor

    def _correct(self, obs: PoolObservation, load: float, policy: PoolPolicy, state: PoolState) -> None:
        """Update the correction factor from observed vs predicted latency (see the module header)."""
        observed = self.latency_of(obs)
        if not self.params.correction or observed is None or obs.num_replicas < 1 or load <= 0:
            return
        per_replica = load / obs.num_replicas
        effective = policy.capacity / state.correction_factor
        if observed <= policy.target_ms and per_replica < self.params.min_utilization * effective:
            return
        predicted_ms = policy.target_ms * per_replica / policy.capacity
        sample = min(MAX_FACTOR, max(MIN_FACTOR, observed / predicted_ms))
        a = self.params.smoothing
        state.correction_factor = min(MAX_FACTOR, max(MIN_FACTOR, (1 - a) * state.correction_factor + a * sample))


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} ms"
