"""Replay a Mooncake trace through the real routing policies, with simulated worker caches.

The trace (FAST'25 Mooncake, `conversation` workload) gives per request an arrival `timestamp`
(ms), `input_length`, `output_length` and `hash_ids`: one id per 512-token block of the prompt,
equal ids meaning equal blocks with equal prefixes. No model runs; the cluster is
benchmarks/cluster_sim.py's model (per-worker LRU block caches of `capacity_blocks` blocks, DRAM
and SSD tiers below them when configured, an exact and instant KV index, load from the trace's
arrivals). The trace's ids are chained with kvstore.keys' hash
(`hash_block(parent, [id])`), so a block's hash names its whole prefix as the workers' chain does;
the ids are already prefix-unique, so the chain keeps their sharing exactly.
- Baseline: ONE shared LRU cache of the combined capacity serving every request; an unbounded
  cache (every block seen before is kept) bounds every policy's hit rate from above.
- Windows: a replay covers `num_requests` requests from request number `offset` on, each window
  starting cold (empty caches, idle workers). prefix_aware's default weights were chosen on
  `TUNING_WINDOW` of the conversation trace (the traffic weight on that window of the synthetic
  agent trace too), so the benchmark reports on later windows.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.agent_trace import PREFIX, is_synthetic, parse_name
from benchmarks.cluster_sim import LRUBlockCache, SimConfig, SimRequest, SimResult, replay
from benchmarks.report import Result
from controlplane.policies import Policy, make_policy
from kvstore.keys import BlockHash, hash_block
from loadgen.traces import MooncakeRecord, read_mooncake
from loadgen.types import WorkloadError

TUNING_TRACE = "mooncake_conversation.jsonl"
TUNING_TRACES = (TUNING_TRACE, "synthetic:agent")
TUNING_WINDOW = (0, 2000)
"""Requests [first, end) of `TUNING_TRACES` on which prefix_aware's default weights were chosen
(controlplane/policies.py: the traffic weight on both traces, the others on the conversation
trace); a figure from a window that overlaps it is in-sample."""


@functools.lru_cache(maxsize=2)
def _parsed_trace(path: str, mtime_ns: int, size: int) -> tuple[MooncakeRecord, ...]:
    """The trace's records, parsed once per version of the file (a run loads several windows of it)."""
    return tuple(read_mooncake(path))


def load_trace(path: str | Path, limit: int | None = None, offset: int = 0) -> list[MooncakeRecord]:
    """`limit` requests of a Mooncake JSONL trace (all the rest when None, fewer where the trace
    ends), from request number `offset` on (parsed and checked by `loadgen.traces.read_mooncake`).
    Raises WorkloadError when `offset` is negative or past the trace's last request."""
    try:
        stat = Path(path).stat()
    except OSError:
        records = read_mooncake(path)  # its WorkloadError says why
    else:
        records = _parsed_trace(str(path), stat.st_mtime_ns, stat.st_size)
    if not 0 <= offset < len(records):
        raise WorkloadError(f"Mooncake trace {path} holds {len(records)} requests (numbered 0 to "
                            f"{len(records) - 1}): offset {offset} is outside it")
    return list(records[offset:None if limit is None else offset + limit])


def in_sample(trace: str | Path, offset: int, num_requests: int) -> bool:
    """Whether requests [offset, offset + num_requests) of `trace` overlap `TUNING_WINDOW` of one of
    `TUNING_TRACES` (a synthetic trace with another seed is another trace)."""
    first, end = TUNING_WINDOW
    name = str(trace) if is_synthetic(trace) else Path(trace).name
    if is_synthetic(name):
        kind, seed = parse_name(name)
        name = f"{PREFIX}{kind}" if seed == 0 else name
    return name in TUNING_TRACES and offset < end and offset + num_requests > first


def chain_hashes(hash_ids: Sequence[int]) -> list[BlockHash]:
    """The trace's block ids as a prefix chain of block hashes (the one hash chain of kvweave)."""
    hashes, parent = [], None
    for h in hash_ids:
        parent = hash_block(parent, [h])
        hashes.append(parent)
    return hashes


def sim_requests(requests: Sequence[MooncakeRecord],
                 hashes: Sequence[Sequence[BlockHash]] | None = None) -> list[SimRequest]:
    """The trace's records as the cluster model's requests (`hashes`: their chains, if already made)."""
    hashes = hashes if hashes is not None else [chain_hashes(r.hash_ids) for r in requests]
    return [SimRequest(r.timestamp_s, r.input_length, r.output_length, chain) for r, chain in zip(requests, hashes)]


def simulate(requests: Sequence[MooncakeRecord], policy: Policy, cfg: SimConfig = SimConfig(),
             hashes: Sequence[Sequence[BlockHash]] | None = None, name: str = "") -> SimResult:
    """Route every request with `policy` over `cfg.num_workers` simulated workers."""
    return replay(sim_requests(requests, hashes), cfg, name or policy.name, policy=policy)


def score_choices(requests: Sequence[MooncakeRecord], choices: Sequence[int], cfg: SimConfig = SimConfig(),
                  hashes: Sequence[Sequence[BlockHash]] | None = None, name: str = "recorded") -> SimResult:
    """The same cache model as `simulate`, the worker of request i being `choices[i]` (another
    router's recorded placement), in trace order."""
    assert len(choices) == len(requests)
    return replay(sim_requests(requests, hashes), cfg, name, choices=choices)


def simulate_shared(requests: Sequence[MooncakeRecord], capacity_blocks: int | None,
                    hashes: Sequence[Sequence[BlockHash]] | None = None, name: str = "shared_lru") -> SimResult:
    """One cache serving every request; `capacity_blocks=None`: unbounded (nothing is ever evicted)."""
    hashes = hashes if hashes is not None else [chain_hashes(r.hash_ids) for r in requests]
    cache = LRUBlockCache(capacity_blocks or sum(len(c) for c in hashes) or 1)
    result = SimResult(name, 0, 0, [len(requests)])
    for chain in hashes:
        result.hit_blocks += cache.leading_hits(chain)
        result.prompt_blocks += len(chain)
        cache.insert(chain)
    return result


def num_unique_blocks(hashes: Sequence[Sequence[BlockHash]]) -> int:
    return len({h for chain in hashes for h in chain})


# ------------------------------------------------------------------ tuning prefix_aware's knobs

BALANCE_GRID = ((32, 1.5), (8, 1.5), (8, 1.25), (4, 1.5))
"""(balance_abs_threshold, balance_rel_threshold) pairs tried; (32, 1.5) is the default."""


@dataclass(frozen=True)
class Target:
    min_hit_ratio: float = 0.9
    """prefix_aware's hit rate / the shared cache's."""
    max_imbalance: float = 1.25

    def met(self, ratio: float, imbalance: float) -> bool:
        return ratio >= self.min_hit_ratio and imbalance <= self.max_imbalance


def replay_knobs(requests: Sequence[MooncakeRecord], hashes: Sequence[Sequence[BlockHash]], knobs: dict,
                 cfgs: Sequence[SimConfig], shared: Sequence[float], target: Target = Target()) -> list[dict]:
    """prefix_aware with `knobs` under each config of `cfgs`; `shared`: the shared cache's hit rate under each."""
    runs = []
    for c, s in zip(cfgs, shared):
        r = simulate(requests, make_policy("prefix_aware", **knobs), c, hashes)
        ratio = r.hit_rate / s if s else 0.0
        runs.append({"capacity_blocks": c.capacity_blocks, "ms_per_token": c.ms_per_token,
                     "hit_rate": round(r.hit_rate, 4), "hit_ratio": round(ratio, 3),
                     "imbalance": round(r.imbalance, 3), "meets": target.met(ratio, r.imbalance)})
    return runs


def search_knobs(requests: Sequence[MooncakeRecord], hashes: Sequence[Sequence[BlockHash]], cfgs: Sequence[SimConfig],
                 prefill_weights: Sequence[float] = (1, 2, 4, 8, 16),
                 decode_weights: Sequence[float] = (16, 64, 128, 256, 512),
                 balance: Sequence[tuple[int, float]] = BALANCE_GRID, target: Target = Target()) -> list[dict]:
    """prefix_aware over a grid of its documented knobs, each setting replayed under every config of
    `cfgs` (the first is the reported one, the others check robustness). Best first: meets the
    target under cfgs[0], then under most configs, then the highest worst-case hit ratio."""
    shared = [simulate_shared(requests, c.combined_blocks, hashes).hit_rate for c in cfgs]
    rows = []
    for pw in prefill_weights:
        for dw in decode_weights:
            for abs_t, rel_t in balance:
                knobs = {"prefill_weight": pw, "decode_weight": dw, "balance_abs_threshold": abs_t,
                         "balance_rel_threshold": rel_t}
                runs = replay_knobs(requests, hashes, knobs, cfgs, shared, target)
                rows.append({"knobs": knobs, "meets_target": runs[0]["meets"],
                             "configs_meeting": sum(x["meets"] for x in runs), "runs": runs})
    rows.sort(key=lambda r: (not r["meets_target"], -r["configs_meeting"],
                             -min(x["hit_ratio"] for x in r["runs"]), max(x["imbalance"] for x in r["runs"])))
    return rows


def weight_grid(requests: Sequence[MooncakeRecord], hashes: Sequence[Sequence[BlockHash]], cfg: SimConfig,
                prefill_weights: Sequence[float], decode_weights: Sequence[float]) -> list[dict]:
    """prefix_aware at every (prefill_weight, decode_weight) of the grid, other knobs at their
    defaults, in grid order: hit rate, its ratio to the shared cache, imbalance."""
    shared = [simulate_shared(requests, cfg.combined_blocks, hashes).hit_rate]
    rows = []
    for pw in prefill_weights:
        for dw in decode_weights:
            run = replay_knobs(requests, hashes, {"prefill_weight": pw, "decode_weight": dw}, [cfg], shared)[0]
            rows.append({"prefill_weight": pw, "decode_weight": dw, "hit_rate": run["hit_rate"],
                         "hit_ratio": run["hit_ratio"], "imbalance": run["imbalance"], "meets_target": run["meets"]})
    return rows


# ------------------------------------------------------------------ the benchmark's rows

def bench_mooncake(trace: str | Path, num_requests: int, cfg: SimConfig, offset: int = 0,
                   weights: dict[str, float] | None = None,
                   grid: tuple[Sequence[float], Sequence[float]] | None = None, log=lambda msg: None) -> list[Result]:
    """The prefix_hit_rate_mooncake rows on requests [offset, offset + num_requests): prefix_aware
    (its defaults, or `weights`), round_robin; the (prefill weights, decode weights) `grid`'s
    settings when given; knobs tuned on the window before this one when prefix_aware misses the target."""
    requests = load_trace(trace, num_requests, offset)
    hashes = [chain_hashes(r.hash_ids) for r in requests]
    combined = cfg.combined_blocks
    shared = simulate_shared(requests, combined, hashes)
    unbounded = simulate_shared(requests, None, hashes, "unbounded")
    num_unique = num_unique_blocks(hashes)
    common = {"first_request": offset, "num_requests": len(requests),
              "in_sample": in_sample(trace, offset, len(requests)),
              "defaults_tuned_on": f"requests {TUNING_WINDOW[0]}-{TUNING_WINDOW[1] - 1} of {TUNING_TRACE}",
              "num_workers": cfg.num_workers, "capacity_blocks": cfg.capacity_blocks,
              "block_tokens": cfg.block_size, "combined_capacity_blocks": combined, "unique_blocks": num_unique,
              "combined_fraction_of_unique": round(combined / num_unique, 3), "ms_per_token": cfg.ms_per_token,
              "unbounded_cache_hit_rate": round(unbounded.hit_rate, 4)}
    log(f"mooncake: requests {offset}-{offset + len(requests) - 1}, {num_unique:,} unique blocks; shared LRU of "
        f"{combined:,} blocks hits {shared.hit_rate:.4f}, unbounded {unbounded.hit_rate:.4f}")
    target = Target()
    results = []
    for name, config in (("prefix_aware", weights or {}), ("round_robin", {})):
        policy = make_policy(name, **config)
        r = simulate(requests, policy, cfg, hashes)
        ratio = r.hit_rate / shared.hit_rate if shared.hit_rate else 0.0
        extra = {"policy": name, "policy_config": config or "defaults", "imbalance": round(r.imbalance, 3),
                 "requests_per_worker": r.requests_per_worker, "reasons": r.reasons,
                 "mean_running_at_arrival": round(r.mean_running, 2), **common}
        if name == "prefix_aware":
            extra["weights"] = {"prefill_weight": policy.prefill_weight, "decode_weight": policy.decode_weight}
            extra["meets_target"] = target.met(ratio, r.imbalance)
            extra["target"] = dataclasses.asdict(target)
        log(f"mooncake {name}: hit rate {r.hit_rate:.4f} ({ratio:.3f} of shared), imbalance {r.imbalance:.3f}")
        suffix = "" if name == "prefix_aware" else "_" + name
        results.append(Result("prefix_hit_rate_mooncake" + suffix, r.hit_rate, "ratio",
                              f"one shared LRU of {combined} blocks", shared.hit_rate, True, extra))
    if grid is not None:
        rows = weight_grid(requests, hashes, cfg, *grid)
        for row in rows:
            log(f"mooncake grid prefill_weight {row['prefill_weight']:g} decode_weight {row['decode_weight']:g}: "
                f"hit rate {row['hit_rate']:.4f} ({row['hit_ratio']:.3f} of shared), imbalance {row['imbalance']:.3f}")
        results[0].extra["weight_grid"] = rows
    if not results[0].extra["meets_target"]:
        results.append(_tuned(trace, num_requests, offset, requests, hashes, cfg, shared.hit_rate, common, log))
        tuned = results[-1].extra
        tuned["other_windows"] = other_windows(trace, offset + num_requests, num_requests, cfg, tuned["policy_config"])
    return results


def other_windows(trace: str | Path, first: int, num_requests: int, cfg: SimConfig, knobs: dict,
                  num_windows: int = 4) -> list[dict]:
    """prefix_aware with its defaults and with `knobs` on up to `num_windows` full windows of
    `num_requests` requests from request `first` on: does a tuned setting carry over?"""
    out = []
    for k in range(num_windows):
        offset = first + k * num_requests
        try:
            requests = load_trace(trace, num_requests, offset)
        except WorkloadError:  # past the trace's end
            break
        if len(requests) < num_requests:
            break
        hashes = [chain_hashes(r.hash_ids) for r in requests]
        shared = simulate_shared(requests, cfg.combined_blocks, hashes).hit_rate
        row = {"first_request": offset, "shared_hit_rate": round(shared, 4)}
        for name, config in (("defaults", {}), ("tuned", knobs)):
            r = simulate(requests, make_policy("prefix_aware", **config), cfg, hashes)
            ratio = r.hit_rate / shared if shared else 0.0
            row[name] = {"hit_ratio": round(ratio, 3), "imbalance": round(r.imbalance, 3),
                         "meets": Target().met(ratio, r.imbalance)}
        out.append(row)
    return out


def _tuned(trace, num_requests: int, offset: int, requests, hashes, cfg: SimConfig, shared_rate: float,
           common: dict, log) -> Result:
    """The best prefix_aware knobs of a grid searched on the `num_requests` requests before the
    window (on the window itself, flagged in-sample, when it starts at request 0), each setting
    also replayed at half/double the load and capacity; reported on the window."""
    r = dataclasses.replace
    cfgs = [cfg, r(cfg, ms_per_token=cfg.ms_per_token / 2), r(cfg, ms_per_token=cfg.ms_per_token * 2),
            r(cfg, capacity_blocks=cfg.capacity_blocks // 2), r(cfg, capacity_blocks=cfg.capacity_blocks * 2)]
    tune_first = max(0, offset - num_requests)
    tuning = load_trace(trace, offset - tune_first, tune_first) if offset else requests
    tuning_hashes = [chain_hashes(x.hash_ids) for x in tuning] if offset else hashes
    log(f"mooncake: prefix_aware misses the target; searching its knobs on requests {tune_first}-"
        f"{tune_first + len(tuning) - 1} over {len(cfgs)} configs")
    rows = search_knobs(tuning, tuning_hashes, cfgs)
    best = rows[0]
    run = replay_knobs(requests, hashes, best["knobs"], [cfg], [shared_rate])[0]
    log(f"mooncake best knobs {best['knobs']} on the tuning window: {best['runs'][0]}; on the window: {run}")
    extra = {"policy": "prefix_aware", "policy_config": best["knobs"], "imbalance": run["imbalance"],
             "meets_target": run["meets"], "tuned_on": {"first_request": tune_first, "num_requests": len(tuning)},
             "tuned_in_sample": offset == 0, "tuning_configs_meeting": best["configs_meeting"],
             "tuning_runs": best["runs"], "num_settings_tried": len(rows),
             "num_settings_meeting_on_tuning_window": sum(x["meets_target"] for x in rows),
             "top_settings_on_tuning_window": [
                 {"knobs": x["knobs"], "configs_meeting": x["configs_meeting"],
                  "hit_ratio": [y["hit_ratio"] for y in x["runs"]],
                  "imbalance": [y["imbalance"] for y in x["runs"]]} for x in rows[:8]], **common}
    return Result("prefix_hit_rate_mooncake_tuned", run["hit_rate"], "ratio",
                  f"one shared LRU of {cfg.combined_blocks} blocks", shared_rate, True, extra)
