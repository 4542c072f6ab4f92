"""Routing policies: pick one worker from a snapshot of workers, their load and their cache hits.

Plain objects with no I/O, so a simulator can replay a trace through the very objects the router
uses. The router fills `WorkerState.num_hit_blocks` (and `hit_tiers`, `chunk_tiers`) from one
KV-index lookup when the policy's `needs_index` is set, and skips the lookup otherwise.

`prefix_aware` is Dynamo's KV-router cost with SGLang's cache-aware fallback, plus a churn term:
    cost(w) = prefill_weight * prefill_work(w)
            + num_queued_prefill_tokens(w)
            + decode_weight * num_running(w)
            + churn_weight * churn(w)
            + traffic_weight * prefill_weight * mean_prompt_tokens * traffic(w)
churn(w) is the prefill work this policy sent to w recently (each decision fades it by
0.5 ** (1 / churn_half_life)): a worker that took many new prefixes evicts sooner, so a new prefix
lasts longer elsewhere. traffic(w) is the number of requests this policy sent to w recently, faded
alike, and mean_prompt_tokens the recent requests' mean prompt length (faded alike): one recent
request costs the prefill of traffic_weight (1.2%) of a typical prompt, whatever the workload's
prompt lengths. A worker whose cached sessions keep coming back takes few new tokens (little churn)
but many requests, and without this term new sessions piled onto it (request imbalance up to 1.83
on the agent trace's tuning window); a prefix only this worker holds outweighs it unless the
traffic gap is large, so it steers mostly what nobody holds, and what a peer holds (a peer's copy is
nearly as cheap as one's own, so a hot prefix spreads to the other workers by peer fetches). SGLang's router gets the same effect by sending a prompt it has no match
for to the worker with the smallest tree; without it, new prefixes placed by load alone crowded
some caches and kvweave's exact index fell behind sglang-router's approximate tree.
The defaults (prefill 64, decode 256, churn 2 with a half life of 138 decisions) were chosen on
requests 0-1999 of the Mooncake conversation trace against sglang-router 0.3.2 replaying the same
window (`kvweave bench router --metrics hit_rate_vs_sglang --trace-offset 0 --sim-capacity 500,1000`,
8 simulated workers): 0.99x/1.03x sglang's hit rate at 500/1000 blocks per worker, imbalance
1.14/1.10, where the earlier 8/512 without churn reached 0.95x/0.96x. Held-out windows:
docs/benchmarks/router-vs-sglang-2026-12-06.json. The traffic weight (0.012) was chosen on the same
window of both traces (Mooncake and synthetic:agent, requests 0-1999, 500 and 1000 blocks, with and
without DRAM and SSD tiers of 2x and 4x): the smallest weight tried (0.006 / 0.008 / 0.012 / 0.016 /
0.024) that kept every row's request imbalance within 1.2 (it was up to 1.83 without the term); it
cost the tiered rows at most 0.1% of hit rate. The queued-token term keeps weight 1: with a
prefill weight of 8 (the queue eight times heavier) the same window lost up to 5%.
prefill_work(w), in tokens of recompute, is tier-aware when the index gave the worker's per-block
tier codes (`WorkerState.hit_tiers`, from `KVIndex.leading_tiers`): a prompt token found in tier
t costs kv_costs_ms[t] / kv_costs_ms["recompute"] tokens (a device hit ~0, DRAM and SSD their load
time, a block only a peer holds its transfer time), a token nobody holds costs 1. The per-token
costs are the worker's own measurements (registered with its heartbeat), else `DEFAULT_KV_COSTS_MS`.
lowest cost wins; ties go to the emptiest KV cache (so unrelated prompts spread their prefixes),
then to the lowest hash of (the prompt's first block, worker id) (`tie_rank`): every router replica
breaks a tie alike for the same prompt and the same workers, whatever each one placed before. When
the busiest worker has more than `balance_abs_threshold` requests beyond the idlest AND more than
`balance_rel_threshold` times as many, cache affinity is ignored and the least-loaded worker wins
(SGLang's cache-aware router does the same with the same two knobs), ties broken by `tie_rank` too.

`chunk_aware` (the default) is prefix_aware whose prefill work also counts the request's reusable
chunks (`RouteRequest.chunk_spans`; where each worker gets each chunk's cache is
`WorkerState.chunk_tiers`, from `KVIndex.route_tiers`): a chunk token beyond the prefix run that
the worker holds in tier t costs kv_costs_ms[t] / kv_costs_ms["recompute"] + recompute_ratio
(the share of a reused chunk's tokens recomputed in the new context, default 0.08 as the workers'
--chunk-recompute-ratio: both are kvweave.defaults.CHUNK_RECOMPUTE_RATIO), one only a peer holds costs the peer's cost + recompute_ratio, one
nobody holds costs 1, as does every other token:
    chunk_work(w) = prefill_work(w) - sum over chunks c that w can get, of
                    tokens(c beyond the prefix run) * (1 - cost(source) / cost(recompute) - recompute_ratio)
With no chunks it decides exactly as prefix_aware.
"""
from __future__ import annotations

import logging
import zlib
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from kvstore.index import DEFAULT_COSTS_MS, TIER_CODES
from kvstore.keys import BlockHash
from kvweave.defaults import BLOCK_SIZE, CHUNK_RECOMPUTE_RATIO

logger = logging.getLogger(__name__)

DEFAULT_KV_COSTS_MS = DEFAULT_COSTS_MS
DEFAULT_PREFILL_WEIGHT = 64.0
"""prefix_aware's and chunk_aware's cost of one uncached prompt token (see the module docstring)."""
DEFAULT_DECODE_WEIGHT = 256.0
"""prefix_aware's and chunk_aware's cost of one running request, in prefill-token units."""
DEFAULT_CHURN_WEIGHT = 2.0
"""prefix_aware's and chunk_aware's cost of one uncached prompt token recently sent to a worker."""
DEFAULT_CHURN_HALF_LIFE = 138.0
"""Decisions after which a worker's recent uncached tokens and requests count half (0.995 a decision)."""
DEFAULT_TRAFFIC_WEIGHT = 0.012
"""prefix_aware's and chunk_aware's cost of one request recently sent to a worker, as a share of the
prefill of the recent requests' mean prompt."""


class PolicyError(ValueError):
    """An unknown policy name or an invalid policy option; the message lists what is valid."""


@dataclass(slots=True)
class RouteRequest:
    """What a policy knows about the request being placed."""

    num_prompt_tokens: int
    block_hashes: Sequence[BlockHash] = ()
    """Hashes of the prompt's full blocks (empty when the policy does not need the index)."""
    session_id: str = ""
    req_id: str = ""
    chunk_spans: Sequence[tuple[int, int]] = ()
    """The prompt's reusable chunks as (start, length) token spans, sorted and disjoint."""


@dataclass(slots=True)
class WorkerState:
    """One eligible worker as a policy sees it."""

    worker_id: str
    num_running: int = 0
    num_waiting: int = 0
    num_queued_prefill_tokens: int = 0
    num_kv_blocks_used: int = 0
    num_kv_blocks_total: int = 0
    num_hit_blocks: int = 0
    """Leading prompt blocks this worker holds (from the KV index)."""
    hit_tiers: bytes = b""
    """Per block of the run some worker holds, where this worker gets it (KVIndex.leading_tiers codes)."""
    kv_costs_ms: dict[str, float] | None = None
    """This worker's measured ms per token by source and for recompute (None: defaults)."""
    block_size: int = BLOCK_SIZE
    chunk_tiers: bytes = b""
    """Per chunk of the request, where this worker gets its cache (KVIndex.route_tiers codes: a
    TIER_CODES code, or b"-" when nobody holds it); empty when the request has no chunks."""

    @property
    def num_requests(self) -> int:
        return self.num_running + self.num_waiting

    @property
    def kv_usage(self) -> float:
        return self.num_kv_blocks_used / self.num_kv_blocks_total if self.num_kv_blocks_total else 0.0


@dataclass(slots=True)
class Decision:
    worker_id: str
    policy: str
    reason: str = ""
    """Why this worker: "cost", "imbalance", "sticky", "rotation", "least_loaded"."""
    costs: dict[str, float] = field(default_factory=dict)
    """Per worker score (lower is better), where the policy scores; logged at debug level."""


class Policy(ABC):
    name: ClassVar[str]
    needs_index: ClassVar[bool] = False

    @abstractmethod
    def pick(self, request: RouteRequest, workers: Sequence[WorkerState]) -> Decision:
        """Choose one of `workers` (never empty)."""


class _Rotation:
    """Spreads ties: each pick starts its scan one position further on."""

    def __init__(self) -> None:
        self._next = 0

    def argmin(self, workers: Sequence[WorkerState], key) -> WorkerState:
        n = len(workers)
        start = self._next % n
        self._next += 1
        best, best_key = None, None
        for i in range(n):
            w = workers[(start + i) % n]
            k = key(w)
            if best is None or k < best_key:
                best, best_key = w, k
        return best


class RoundRobinPolicy(Policy):
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def pick(self, request: RouteRequest, workers: Sequence[WorkerState]) -> Decision:
        w = workers[self._next % len(workers)]
        self._next += 1
        return Decision(w.worker_id, self.name, "rotation")


class LeastLoadedPolicy(Policy):
    """Fewest running + waiting requests, then fewest queued prefill tokens; ties rotate."""

    name = "least_loaded"

    def __init__(self) -> None:
        self._rotation = _Rotation()

    def pick(self, request: RouteRequest, workers: Sequence[WorkerState]) -> Decision:
        w = self._rotation.argmin(workers, _load_key)
        return Decision(w.worker_id, self.name, "least_loaded")


def _load_key(w: WorkerState) -> tuple[int, int]:
    return (w.num_requests, w.num_queued_prefill_tokens)


def tie_rank(request: RouteRequest, worker_id: str) -> int:
    """Where `worker_id` ranks among workers tied for `request`: a hash of the prompt's first block
    (of its request id when the prompt has no full block) and the worker id, so that router
    replicas agree on ties (no arrival order or dict order in it) and prompts spread over workers."""
    seed = request.block_hashes[0] if request.block_hashes else request.req_id.encode()
    return zlib.crc32(worker_id.encode(), zlib.crc32(seed))


class PrefixAwarePolicy(Policy):
    name = "prefix_aware"
    needs_index = True

    def __init__(self, prefill_weight: float = DEFAULT_PREFILL_WEIGHT, decode_weight: float = DEFAULT_DECODE_WEIGHT,
                 balance_abs_threshold: int = 32, balance_rel_threshold: float = 1.5,
                 churn_weight: float = DEFAULT_CHURN_WEIGHT, churn_half_life: float = DEFAULT_CHURN_HALF_LIFE,
                 traffic_weight: float = DEFAULT_TRAFFIC_WEIGHT) -> None:
        """prefill_weight: cost per uncached prompt token; decode_weight: cost of one running
        request in prefill-token units; the thresholds trigger the least-loaded fallback;
        churn_weight: cost per uncached token this policy sent to the worker, traffic_weight: cost
        per request it sent there (as a share of a recent mean prompt's prefill), both fading with
        a half life of churn_half_life decisions (0 turns a term off)."""
        if prefill_weight < 0 or decode_weight < 0 or churn_weight < 0 or traffic_weight < 0:
            raise PolicyError("prefill_weight, decode_weight, churn_weight and traffic_weight must be >= 0")
        if balance_abs_threshold < 0 or balance_rel_threshold < 1.0:
            raise PolicyError("balance_abs_threshold must be >= 0 and balance_rel_threshold >= 1")
        if churn_half_life <= 0:
            raise PolicyError(f"churn_half_life must be > 0, got {churn_half_life}")
        self.prefill_weight = prefill_weight
        self.decode_weight = decode_weight
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.churn_weight = churn_weight
        self.churn_half_life = churn_half_life
        self.traffic_weight = traffic_weight
        self._churn_decay = 0.5 ** (1.0 / churn_half_life)
        self._churn: dict[str, float] = {}
        self._traffic: dict[str, float] = {}
        self._mean_prompt_tokens = 0.0

    def pick(self, request: RouteRequest, workers: Sequence[WorkerState]) -> Decision:
        if self.traffic_weight:
            n, mean = request.num_prompt_tokens, self._mean_prompt_tokens
            self._mean_prompt_tokens = n if not mean else mean * self._churn_decay + n * (1.0 - self._churn_decay)
        if self._imbalanced(workers):
            w = min(workers, key=lambda w: (*_load_key(w), tie_rank(request, w.worker_id)))
            decision = Decision(w.worker_id, self.name, "imbalance")
        else:
            costs = {w.worker_id: self.cost(request, w) for w in workers}
            w = min(workers, key=lambda w: (costs[w.worker_id], w.kv_usage, tie_rank(request, w.worker_id)))
            decision = Decision(w.worker_id, self.name, "cost", costs)
        self._record_churn(request, workers, w)
        return decision

    def cost(self, request: RouteRequest, w: WorkerState) -> float:
        return (self.prefill_weight * self.prefill_work(request, w) + w.num_queued_prefill_tokens
                + self.decode_weight * w.num_running
                + self.churn_weight * (self._churn.get(w.worker_id, 0.0) + self.stored_tokens(request, w))
                + self.traffic_cost(w.worker_id))

    def traffic_cost(self, worker_id: str) -> float:
        """The traffic term of `worker_id`'s cost (see the module docstring)."""
        return self.traffic_weight * self.prefill_weight * self._mean_prompt_tokens * self._traffic.get(worker_id, 0.0)

    def stored_tokens(self, request: RouteRequest, w: WorkerState) -> int:
        """Prompt tokens `w` would add to its cache (all but its own leading run)."""
        return stored_tokens(request.num_prompt_tokens, w)

    def get_churn(self, worker_id: str) -> float:
        """Prompt tokens this policy recently made `worker_id` store, faded (see `churn_half_life`)."""
        return self._churn.get(worker_id, 0.0)

    def get_traffic(self, worker_id: str) -> float:
        """Requests this policy recently sent to `worker_id`, faded (see `churn_half_life`)."""
        return self._traffic.get(worker_id, 0.0)

    def _record_churn(self, request: RouteRequest, workers: Sequence[WorkerState], chosen: WorkerState) -> None:
        """Fade every worker's churn and traffic by one decision and add the tokens the chosen one
        stores and its request: new blocks evict old ones, so a worker taking many new prefixes keeps
        each of them for less time; one taking many requests is the busier, cached or not."""
        decay = self._churn_decay
        if self.churn_weight:
            churn = self._churn
            self._churn = {w.worker_id: churn.get(w.worker_id, 0.0) * decay for w in workers}  # drops departed workers
            self._churn[chosen.worker_id] += self.stored_tokens(request, chosen)
        if self.traffic_weight:
            traffic = self._traffic
            self._traffic = {w.worker_id: traffic.get(w.worker_id, 0.0) * decay for w in workers}
            self._traffic[chosen.worker_id] += 1.0

    def prefill_work(self, request: RouteRequest, w: WorkerState) -> float:
        return prefill_work(request.num_prompt_tokens, w)

    def _imbalanced(self, workers: Sequence[WorkerState]) -> bool:
        loads = [w.num_requests for w in workers]
        lo, hi = min(loads), max(loads)
        return hi - lo > self.balance_abs_threshold and hi > lo * self.balance_rel_threshold


class ChunkAwarePolicy(PrefixAwarePolicy):
    """prefix_aware whose prefill work also counts the reusable chunks each worker can get (see the
    module docstring); with no chunks it decides exactly as prefix_aware."""

    name = "chunk_aware"

    def __init__(self, prefill_weight: float = DEFAULT_PREFILL_WEIGHT, decode_weight: float = DEFAULT_DECODE_WEIGHT,
                 balance_abs_threshold: int = 32, balance_rel_threshold: float = 1.5,
                 recompute_ratio: float = CHUNK_RECOMPUTE_RATIO, churn_weight: float = DEFAULT_CHURN_WEIGHT,
                 churn_half_life: float = DEFAULT_CHURN_HALF_LIFE, traffic_weight: float = DEFAULT_TRAFFIC_WEIGHT) -> None:
        """recompute_ratio: share of a reused chunk's tokens the worker recomputes (CacheBlend's budget)."""
        super().__init__(prefill_weight, decode_weight, balance_abs_threshold, balance_rel_threshold, churn_weight,
                         churn_half_life, traffic_weight)
        if not 0.0 <= recompute_ratio <= 1.0:
            raise PolicyError(f"recompute_ratio must be in [0, 1], got {recompute_ratio}")
        self.recompute_ratio = recompute_ratio

    def prefill_work(self, request: RouteRequest, w: WorkerState) -> float:
        return chunk_prefill_work(request, w, self.recompute_ratio)

    def stored_tokens(self, request: RouteRequest, w: WorkerState) -> int:
        return stored_tokens(request.num_prompt_tokens, w) - (held_chunk_tokens(request, w) if w.chunk_tiers else 0)


def _unit_costs(w: WorkerState) -> tuple[dict[str, float], float]:
    costs = w.kv_costs_ms or DEFAULT_KV_COSTS_MS
    return costs, costs.get("recompute") or DEFAULT_KV_COSTS_MS["recompute"]


def prefill_work(num_prompt_tokens: int, w: WorkerState) -> float:
    """Prefill work on `w` in recompute-token units (see the module docstring)."""
    codes = w.hit_tiers
    if not codes:
        return float(max(0, num_prompt_tokens - w.num_hit_blocks * w.block_size))
    costs, recompute = _unit_costs(w)
    work = max(0, num_prompt_tokens - len(codes) * w.block_size)
    for code, source in TIER_CODES.items():
        n = codes.count(code)
        if n:
            work += n * w.block_size * costs.get(source, DEFAULT_KV_COSTS_MS[source]) / recompute
    return work


_PEER_CODE = bytes([next(code for code, source in TIER_CODES.items() if source == "peer")])


def stored_tokens(num_prompt_tokens: int, w: WorkerState) -> int:
    """Prompt tokens beyond the leading run `w` holds in its own tiers (a block only a peer holds is
    stored anew): what placing the request on `w` adds to `w`'s cache."""
    codes = w.hit_tiers
    if not codes:
        return max(0, num_prompt_tokens - w.num_hit_blocks * w.block_size)
    own = codes.find(_PEER_CODE)  # the codes of a run are tier codes: the first peer block ends w's own run
    return max(0, num_prompt_tokens - (len(codes) if own < 0 else own) * w.block_size)


def chunk_prefill_work(request: RouteRequest, w: WorkerState, recompute_ratio: float) -> float:
    """`prefill_work`, with each chunk token beyond the prefix run (the blocks `hit_tiers` prices)
    that `w` can get (its own tier or a peer) costing that source's per-token cost plus
    `recompute_ratio` instead of a full recompute."""
    work = prefill_work(request.num_prompt_tokens, w)
    if not w.chunk_tiers:
        return work
    costs, recompute = _unit_costs(w)
    run_end = (len(w.hit_tiers) if w.hit_tiers else w.num_hit_blocks) * w.block_size
    for (start, n), code in zip(request.chunk_spans, w.chunk_tiers):
        source = TIER_CODES.get(code)
        outside = min(start + n, request.num_prompt_tokens) - max(start, run_end)
        if source is not None and outside > 0:
            reuse = costs.get(source, DEFAULT_KV_COSTS_MS[source]) / recompute + recompute_ratio
            work -= outside * (1.0 - reuse)
    return work


def held_chunk_tokens(request: RouteRequest, w: WorkerState) -> int:
    """Chunk tokens beyond `w`'s own prefix hit whose cache `w` holds in one of its tiers."""
    run_end = w.num_hit_blocks * w.block_size
    held = 0
    for (start, n), code in zip(request.chunk_spans, w.chunk_tiers):
        if code in TIER_CODES and TIER_CODES[code] != "peer":
            held += max(0, min(start + n, request.num_prompt_tokens) - max(start, run_end))
    return held


class SessionPolicy(Policy):
    """Requests of one session stay on one worker; new sessions, requests without a session and
    sessions whose worker is gone go to the fallback policy. Remembers the `max_sessions` most
    recently used sessions."""

    name = "session"
    needs_index = True

    def __init__(self, max_sessions: int = 100_000, fallback: str = "chunk_aware", **fallback_config) -> None:
        if max_sessions <= 0:
            raise PolicyError(f"max_sessions must be positive, got {max_sessions}")
        if fallback == self.name:
            raise PolicyError("the session policy cannot fall back to itself")
        self.max_sessions = max_sessions
        self.fallback = make_policy(fallback, **fallback_config)
        self._sessions: OrderedDict[str, str] = OrderedDict()

    def pick(self, request: RouteRequest, workers: Sequence[WorkerState]) -> Decision:
        sid = request.session_id
        if sid:
            worker_id = self._sessions.get(sid)
            if worker_id is not None and any(w.worker_id == worker_id for w in workers):
                self._sessions.move_to_end(sid)
                return Decision(worker_id, self.name, "sticky")
        decision = self.fallback.pick(request, workers)
        if sid:
            self._remember(sid, decision.worker_id)
        return Decision(decision.worker_id, self.name, f"new:{decision.reason}", decision.costs)

    def _remember(self, session_id: str, worker_id: str) -> None:
        self._sessions[session_id] = worker_id
        self._sessions.move_to_end(session_id)
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)


POLICIES: dict[str, type[Policy]] = {
    p.name: p for p in (ChunkAwarePolicy, PrefixAwarePolicy, RoundRobinPolicy, LeastLoadedPolicy, SessionPolicy)
}
DEFAULT_POLICY = ChunkAwarePolicy.name


def make_policy(name: str, **config) -> Policy:
    """Build a policy by name; raises PolicyError naming the valid names or options."""
    cls = POLICIES.get(name)
    if cls is None:
        raise PolicyError(f"unknown routing policy {name!r}; valid: {', '.join(POLICIES)}")
    try:
        return cls(**config)
    except TypeError as exc:
        raise PolicyError(f"invalid options for policy {name!r}: {exc}") from exc

