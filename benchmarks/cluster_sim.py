"""The simulated cluster the router replays score placements with: each worker's tiered KV cache
and its load. No model runs; the same model scores kvweave's policies and another router's
recorded choices (benchmarks/mooncake_sim.py, benchmarks/rag_replay.py, benchmarks/sglang_peer.py).

- Requests (`SimRequest`): arrival time, prompt and output lengths, the prompt's prefix chain of
  block hashes, and optionally its reusable chunks (token spans and each chunk's entry keys, as
  `kvstore.keys.chunk_block_keys` names them).
- Caches: per worker, LRU tiers as the real workers have them (`SimConfig.tiers`): the device
  (`capacity_blocks`), then DRAM and SSD when given capacities (`dram_x`, `ssd_x` times the
  device's, as `kvweave worker`'s --dram-cache-gb and --ssd-cache-gb size them against its KV
  cache). A stored block enters the device; the device's least recently used block drops to DRAM,
  DRAM's to SSD, SSD's is gone (the real workers' demotion on eviction); a block found in a lower
  tier is promoted back to the device when the request uses it. Chunk-caches live in the first
  host tier (`kvstore.index.CHUNK_MEDIUMS`, where the workers keep them), in the device when no
  host tier is configured.
- Hits: a request hits the unbroken run of its leading blocks its worker holds, in any tier (a
  prefix cache can use nothing after the first miss), and every chunk beyond that run whose
  entries the worker all holds (a chunk-cache is reused at any position). Its blocks are then
  inserted, last block first, so a prefix loses its tail before its head, then its chunks.
- Load at its tier cost: a token found in tier t counts `TIER_WEIGHTS[t]` = 1 - load time /
  recompute time of a token (`kvstore.index.DEFAULT_COSTS_MS`, kvstore's measured figures), so a
  DRAM hit is worth slightly less than a device hit. `hit_rate` counts blocks in any tier,
  `weighted_hit_rate` at their cost.
- KV index: exact and instant: a policy sees each worker's own leading run with one tier code per
  block (`WorkerState.hit_tiers`, the codes of `KVIndex.leading_tiers`) and each chunk's code
  (`WorkerState.chunk_tiers`, as `KVIndex.route_tiers`), with no publishing lag. The workers do
  not fetch from peers here, so no peer codes are given and none are credited.
- Load: arrivals at the requests' timestamps; a request occupies its worker for (uncached prompt
  tokens + output tokens) x `ms_per_token`, prefill first; a reused chunk token still costs
  `chunk_recompute_ratio` of a token. A policy sees `num_running` = requests active on the worker
  and `num_queued_prefill_tokens` = uncached tokens of those still prefilling. No batch limit.
"""
from __future__ import annotations

import heapq
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from controlplane.policies import Policy, RouteRequest, WorkerState
from kvstore.index import CHUNK_MEDIUMS, DEFAULT_COSTS_MS, MEDIUMS
from kvstore.keys import BlockHash
from kvweave.defaults import CHUNK_RECOMPUTE_RATIO
from loadgen.traces import MOONCAKE_BLOCK_TOKENS

TIER_WEIGHTS = {m: 1.0 - DEFAULT_COSTS_MS[m] / DEFAULT_COSTS_MS["recompute"] for m in MEDIUMS}
"""What a token found in each tier is worth against one found on the device (1 - load / recompute)."""
_CODES = [bytes([ord(str(i + 1))]) for i in range(len(MEDIUMS))]
"""Tier i's code in the index's replies (`kvstore.index.TIER_CODES`)."""
NO_CHUNK = b"-"


@dataclass(frozen=True)
class SimConfig:
    num_workers: int = 8
    capacity_blocks: int = 1000
    """Blocks each worker's device tier holds (1000 x 512 tokens in the Mooncake replay)."""
    ms_per_token: float = 1.0
    """How long each uncached prompt token and each output token occupies a worker."""
    block_size: int = MOONCAKE_BLOCK_TOKENS
    dram_x: float = 0.0
    """Each worker's DRAM tier, in multiples of its device tier (0: no DRAM tier)."""
    ssd_x: float = 0.0
    """Each worker's SSD tier, in multiples of its device tier (0: no SSD tier)."""
    chunk_recompute_ratio: float = CHUNK_RECOMPUTE_RATIO

    def __post_init__(self) -> None:
        if self.num_workers <= 0 or self.capacity_blocks <= 0 or self.block_size <= 0:
            raise ValueError("num_workers, capacity_blocks and block_size must be positive")
        if self.ms_per_token < 0 or self.dram_x < 0 or self.ssd_x < 0:
            raise ValueError("ms_per_token and the DRAM and SSD capacities must be >= 0")

    @property
    def dram_blocks(self) -> int:
        return round(self.capacity_blocks * self.dram_x)

    @property
    def ssd_blocks(self) -> int:
        return round(self.capacity_blocks * self.ssd_x)

    @property
    def combined_blocks(self) -> int:
        """Blocks the whole cluster holds, every tier counted (one shared cache's size, for a baseline)."""
        return self.num_workers * sum(n for _, n in self.tiers)

    @property
    def tiers(self) -> tuple[tuple[str, int], ...]:
        """(medium, capacity in blocks) of each configured tier, fastest first."""
        given = zip(MEDIUMS, (self.capacity_blocks, self.dram_blocks, self.ssd_blocks))
        return tuple((m, n) for m, n in given if n)


@dataclass(slots=True)
class SimRequest:
    timestamp_s: float
    input_length: int
    output_length: int
    chain: Sequence[BlockHash]
    """The prompt's full blocks' hashes (the one hash chain of kvweave)."""
    chunk_spans: Sequence[tuple[int, int]] = ()
    """Reusable chunks as (start, length) token spans, sorted and disjoint."""
    chunk_entries: Sequence[Sequence[bytes]] = ()
    """Per chunk, the keys of the entries that hold its cache."""


@dataclass
class SimResult:
    name: str
    hit_blocks: int
    prompt_blocks: int
    requests_per_worker: list[int] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)
    """Decisions by the policy's reason ("cost", "imbalance", "rotation", ...)."""
    mean_running: float = 0.0
    """Requests active on the chosen worker when a request arrived (mean)."""
    best_hit_blocks: int = 0
    """Sum over requests of the most leading blocks any worker held (what a perfect placement would hit
    against these caches)."""
    weighted_hit_blocks: float = 0.0
    """Hit blocks, each counted at its tier's weight (`TIER_WEIGHTS`)."""
    hit_blocks_by_tier: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    prefix_hit_tokens: int = 0
    chunk_tokens: int = 0
    """Chunk tokens beyond the prefix run whose cache the worker held (reused at their position)."""
    weighted_chunk_tokens: float = 0.0
    chunk_tokens_by_tier: dict[str, int] = field(default_factory=dict)
    num_requests: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_blocks / self.prompt_blocks if self.prompt_blocks else 0.0

    @property
    def weighted_hit_rate(self) -> float:
        return self.weighted_hit_blocks / self.prompt_blocks if self.prompt_blocks else 0.0

    @property
    def reuse_rate(self) -> float:
        """Prompt tokens served from a cache (prefix run and chunks) / prompt tokens."""
        return (self.prefix_hit_tokens + self.chunk_tokens) / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def chunk_tokens_per_request(self) -> float:
        return self.chunk_tokens / self.num_requests if self.num_requests else 0.0

    @property
    def skipped_share(self) -> float:
        """Share of prompt blocks some worker held but the chosen one did not (given up for load)."""
        return (self.best_hit_blocks - self.hit_blocks) / self.prompt_blocks if self.prompt_blocks else 0.0

    @property
    def imbalance(self) -> float:
        """max / mean requests per worker (1.0 = perfectly even)."""
        n = self.requests_per_worker
        return max(n) / (sum(n) / len(n)) if n and sum(n) else 1.0


class TieredBlockCache:
    """LRU tiers of block keys, fastest first; what the first tier evicts drops to the next."""

    def __init__(self, capacities: Sequence[int]) -> None:
        assert capacities and all(c > 0 for c in capacities)
        self.capacities = tuple(capacities)
        self._tiers: list[OrderedDict[bytes, None]] = [OrderedDict() for _ in capacities]

    def __len__(self) -> int:
        return sum(len(t) for t in self._tiers)

    def __contains__(self, h: bytes) -> bool:
        return any(h in t for t in self._tiers)

    def tier_of(self, h: bytes) -> int:
        """The tier holding `h`, -1 when none does."""
        for i, t in enumerate(self._tiers):
            if h in t:
                return i
        return -1

    def leading_hits(self, hashes: Sequence[bytes]) -> int:
        n = 0
        if len(self._tiers) == 1:
            blocks = self._tiers[0]
            for h in hashes:
                if h not in blocks:
                    break
                n += 1
            return n
        for h in hashes:
            if h not in self:
                break
            n += 1
        return n

    def leading_codes(self, hashes: Sequence[bytes]) -> bytes:
        """One tier code per block of the leading run this cache holds (the index's codes)."""
        if len(self._tiers) == 1:
            return _CODES[0] * self.leading_hits(hashes)
        codes = []
        for h in hashes:
            i = self.tier_of(h)
            if i < 0:
                break
            codes.append(_CODES[i])
        return b"".join(codes)

    def insert(self, hashes: Sequence[bytes], tier: int = 0) -> None:
        """Insert or refresh `hashes` in `tier` (taking them out of slower ones), the first ending up
        most recent; overflow drops each tier's least recently used blocks to the next tier."""
        into = self._tiers[tier]
        slower = self._tiers[tier + 1:]
        for h in reversed(hashes):
            for t in slower:
                t.pop(h, None)
            into[h] = None
            into.move_to_end(h)
        for i, t in enumerate(self._tiers):
            cap, below = self.capacities[i], self._tiers[i + 1] if i + 1 < len(self._tiers) else None
            while len(t) > cap:
                h, _ = t.popitem(last=False)
                if below is not None:
                    below[h] = None
                    below.move_to_end(h)


class LRUBlockCache(TieredBlockCache):
    """One LRU tier."""

    def __init__(self, capacity: int) -> None:
        super().__init__((capacity,))


class WorkerLoad:
    """Requests active on each worker, and uncached prefill tokens of those still prefilling."""

    def __init__(self, num_workers: int) -> None:
        self.num_running = [0] * num_workers
        self.num_prefill_tokens = [0] * num_workers
        self._ends: list[tuple[float, int, int]] = []  # (time, worker, -1 = request end | tokens = prefill end)

    def advance(self, now: float) -> None:
        while self._ends and self._ends[0][0] <= now:
            _, w, tokens = heapq.heappop(self._ends)
            if tokens < 0:
                self.num_running[w] -= 1
            else:
                self.num_prefill_tokens[w] -= tokens

    def add(self, now: float, w: int, uncached: int, num_output: int, ms_per_token: float) -> None:
        self.num_running[w] += 1
        self.num_prefill_tokens[w] += uncached
        prefill_end = now + uncached * ms_per_token
        heapq.heappush(self._ends, (prefill_end, w, uncached))
        heapq.heappush(self._ends, (prefill_end + num_output * ms_per_token, w, -1))


@dataclass(slots=True)
class Outcome:
    """What request placement on one worker would find there."""

    codes: bytes
    """Tier code per block of the worker's leading run."""
    chunk_codes: bytes = b""
    """Per chunk, its tier code on the worker, or NO_CHUNK."""


class ClusterModel:
    """The simulated workers: tiered block caches, and the load of the requests they run."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        tiers = cfg.tiers
        self.mediums = [m for m, _ in tiers]
        self.caches = [TieredBlockCache([n for _, n in tiers]) for _ in range(cfg.num_workers)]
        self.chunk_tier = next((i for i, m in enumerate(self.mediums) if m in CHUNK_MEDIUMS), 0)
        self.load = WorkerLoad(cfg.num_workers)
        self.ids = [f"w{i}" for i in range(cfg.num_workers)]
        self._weights = {_CODES[i][0]: TIER_WEIGHTS[m] for i, m in enumerate(self.mediums)}

    def hits(self, now_ms: float, chain: Sequence[BlockHash]) -> list[int]:
        """Each worker's leading hits for `chain` at `now_ms` (finished requests leave the load first)."""
        self.load.advance(now_ms)
        return [c.leading_hits(chain) for c in self.caches]

    def outcomes(self, now_ms: float, req: SimRequest) -> list[Outcome]:
        """Each worker's leading run and chunks for `req` at `now_ms` (finished requests leave the load first)."""
        self.load.advance(now_ms)
        return [self.outcome(w, req) for w in range(self.cfg.num_workers)]

    def outcome(self, w: int, req: SimRequest) -> Outcome:
        cache = self.caches[w]
        codes = cache.leading_codes(req.chain)
        chunk_codes = b"".join(self._chunk_code(cache, keys) for keys in req.chunk_entries)
        return Outcome(codes, chunk_codes)

    @staticmethod
    def _chunk_code(cache: TieredBlockCache, keys: Sequence[bytes]) -> bytes:
        slowest = -1
        for k in keys:
            i = cache.tier_of(k)
            if i < 0:
                return NO_CHUNK
            slowest = max(slowest, i)
        return _CODES[slowest] if slowest >= 0 else NO_CHUNK

    def states(self, found: Sequence[int] | Sequence[Outcome]) -> list[WorkerState]:
        """The policy's view: per worker its load and, from `hits` (leading hits) or `outcomes`, the index's codes."""
        load, cfg = self.load, self.cfg
        states = []
        for w in range(cfg.num_workers):
            x = found[w]
            s = WorkerState(self.ids[w], num_running=load.num_running[w],
                            num_queued_prefill_tokens=load.num_prefill_tokens[w],
                            num_kv_blocks_used=len(self.caches[w]), num_kv_blocks_total=cfg.capacity_blocks,
                            block_size=cfg.block_size)
            if isinstance(x, Outcome):
                s.num_hit_blocks = len(x.codes)
                if len(self.mediums) > 1:  # one tier: the codes say nothing the count does not
                    s.hit_tiers = x.codes
                s.chunk_tiers = x.chunk_codes
            else:
                s.num_hit_blocks = x
            states.append(s)
        return states

    def credit(self, req: SimRequest, x: Outcome, result: SimResult) -> int:
        """Add `x`'s hits to `result`; the prompt tokens it leaves to compute."""
        bs = self.cfg.block_size
        run_end = len(x.codes) * bs
        prefix_tokens = min(run_end, req.input_length)
        result.hit_blocks += len(x.codes)
        result.prefix_hit_tokens += prefix_tokens
        weights = self._weights
        if len(self.mediums) == 1:
            result.weighted_hit_blocks += len(x.codes) * TIER_WEIGHTS[self.mediums[0]]
        else:
            result.weighted_hit_blocks += sum(weights[code] for code in x.codes)
            for i, m in enumerate(self.mediums):
                result.hit_blocks_by_tier[m] = result.hit_blocks_by_tier.get(m, 0) + x.codes.count(_CODES[i])
        chunk_tokens = 0
        for (start, n), code in zip(req.chunk_spans, x.chunk_codes):
            outside = min(start + n, req.input_length) - max(start, run_end)
            if code != NO_CHUNK[0] and outside > 0:
                chunk_tokens += outside
                result.weighted_chunk_tokens += outside * weights[code]
                m = self.mediums[code - ord("1")]
                result.chunk_tokens_by_tier[m] = result.chunk_tokens_by_tier.get(m, 0) + outside
        result.chunk_tokens += chunk_tokens
        return max(0, round(req.input_length - prefix_tokens - chunk_tokens * (1.0 - self.cfg.chunk_recompute_ratio)))

    def place(self, now_ms: float, w: int, req: SimRequest, uncached: int) -> None:
        """Worker `w` runs `req`: its blocks and chunks enter the cache, its uncached tokens and output its load."""
        cache = self.caches[w]
        cache.insert(req.chain)
        for keys in req.chunk_entries:
            cache.insert(keys, self.chunk_tier)
        self.load.add(now_ms, w, uncached, req.output_length, self.cfg.ms_per_token)


def replay(requests: Sequence[SimRequest], cfg: SimConfig, name: str, policy: Policy | None = None,
           choices: Sequence[int] | None = None) -> SimResult:
    """Route every request with `policy`, or place request i on worker `choices[i]`, in trace order."""
    model = ClusterModel(cfg)
    index_of = {wid: i for i, wid in enumerate(model.ids)}
    result = SimResult(name, 0, 0, [0] * cfg.num_workers)
    reasons: Counter[str] = Counter()
    running_seen = 0
    for i, req in enumerate(requests):
        now_ms = req.timestamp_s * 1000.0
        found = model.outcomes(now_ms, req)
        if policy is not None:
            route = RouteRequest(req.input_length, req.chain, req_id=str(i), chunk_spans=req.chunk_spans)
            decision = policy.pick(route, model.states(found))
            w = index_of[decision.worker_id]
            reasons[decision.reason] += 1
        else:
            w = choices[i]
        running_seen += model.load.num_running[w]
        uncached = model.credit(req, found[w], result)
        result.best_hit_blocks += max(len(x.codes) for x in found)
        result.prompt_blocks += len(req.chain)
        result.prompt_tokens += req.input_length
        result.requests_per_worker[w] += 1
        model.place(now_ms, w, req, uncached)
    result.reasons = dict(reasons)
    result.num_requests = len(requests)
    result.mean_running = running_seen / len(requests) if requests else 0.0
    return result
