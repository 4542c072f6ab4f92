"""`hit_rate_vs_sglang`: kvweave's prefix_aware against sglang-router's cache_aware, same windows, same model.

For each trace window (`--trace-offset` list x `--trace-requests`) and each per-worker capacity
(`--sim-capacity` list): kvweave's real policy object is replayed by `mooncake_sim.simulate`;
sglang-router 0.3.2 is replayed for real by `sglang_peer.replay` (fake workers, time compressed by
`--peer-speedup`; `--peer-replays` times, since its choices depend on the replay's timing: the
row's baseline is the mean of its hit rates, the other sglang columns the median replay's), and its
recorded choices are scored by `mooncake_sim.score_choices`. Both are
scored by the one cache model (benchmarks/cluster_sim.py: per-worker LRU block caches of the
capacity, 8 workers, and DRAM and SSD tiers below them with `--sim-tiers`). A row: value = kvweave's
hit rate, baseline = sglang's (with tiers, each hit block counted at its tier's weight,
`cluster_sim.TIER_WEIGHTS`; `any_tier_hit_rate` counts them whole), ratio = hit_rate_vs_sglang; each side's request
imbalance (max / mean requests per worker) and skipped share (prompt blocks some worker held that
the chosen one did not) are in the row, and so is the ceiling: `unbounded_hit_rate`, the hit rate
of one cache that never evicts (every block seen before in the window is a device hit: no
placement of any router can do better), and `ceiling_ratio` = that / sglang's hit rate, the most
any router could reach over sglang on the window (the summary's `ceiling_mean_ratio` is its mean:
where it is below the mean target, the target cannot be met by any placement on those windows). The summary row averages the ratio over the held-out rows
(those not overlapping `mooncake_sim.TUNING_WINDOW`, where prefix_aware's defaults were chosen).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from benchmarks.agent_trace import is_synthetic, synthetic_trace
from benchmarks.cluster_sim import TIER_WEIGHTS
from benchmarks.mooncake_sim import (
    SimConfig, chain_hashes, in_sample, load_trace, score_choices, simulate, simulate_shared,
)
from benchmarks.report import Result
from benchmarks.sglang_peer import PeerConfig, PeerUnavailable, PromptTexts, replay
from controlplane.policies import make_policy
from loadgen.traces import MooncakeRecord

TARGET_MIN_RATIO = 1.0
TARGET_MEAN_RATIO = 1.1
TARGET_MAX_IMBALANCE = 1.25


def window(trace: str | Path, num_requests: int, offset: int) -> list[MooncakeRecord]:
    """Requests [offset, offset + num_requests) of a Mooncake file or of a synthetic trace."""
    if is_synthetic(trace):
        return synthetic_trace(str(trace), offset + num_requests)[offset:]
    return load_trace(trace, num_requests, offset)


def compare_window(trace: str | Path, requests: Sequence[MooncakeRecord], offset: int, cfg: SimConfig,
                   peer: PeerConfig, policy_config: dict | None = None, log=lambda msg: None) -> Result:
    """One row: prefix_aware and sglang-router on `requests` at `cfg`."""
    hashes = [chain_hashes(r.hash_ids) for r in requests]
    ours = simulate(requests, make_policy("prefix_aware", **(policy_config or {})), cfg, hashes)
    replays = []
    for _ in range(peer.replays):
        run = replay(requests, cfg, peer, texts=PromptTexts(cfg.block_size))
        replays.append((score_choices(requests, run.choices, cfg, hashes, "sglang"), run))
    replays.sort(key=lambda x: x[0].weighted_hit_rate)
    theirs, run = replays[len(replays) // 2]  # the median replay's details; the baseline is the mean
    their_rates = [r.weighted_hit_rate for r, _ in replays]
    their_rate = sum(their_rates) / len(their_rates)
    shared = simulate_shared(requests, cfg.combined_blocks, hashes)
    unbounded = simulate_shared(requests, None, hashes, "unbounded").hit_rate
    ratio = ours.weighted_hit_rate / their_rate if their_rate else float("inf")
    spread = f" (replays {min(their_rates):.4f}-{max(their_rates):.4f})" if len(replays) > 1 else ""
    log(f"vs sglang: {Path(str(trace)).name} requests {offset}-{offset + len(requests) - 1}, capacity "
        f"{cfg.capacity_blocks}{tiers_label(cfg)}: kvweave {ours.weighted_hit_rate:.4f} (imbalance "
        f"{ours.imbalance:.3f}), sglang {their_rate:.4f}{spread} (imbalance {theirs.imbalance:.3f}): "
        f"{ratio:.3f}x")
    held_out = not in_sample(trace, offset, len(requests))
    extra = {
        "trace": Path(str(trace)).name, "first_request": offset, "num_requests": len(requests),
        "capacity_blocks": cfg.capacity_blocks, "num_workers": cfg.num_workers, "held_out": held_out,
        "policy": "prefix_aware", "policy_config": policy_config or "defaults",
        "imbalance": round(ours.imbalance, 3), "sglang_imbalance": round(theirs.imbalance, 3),
        "skipped_share": round(ours.skipped_share, 4), "sglang_skipped_share": round(theirs.skipped_share, 4),
        "requests_per_worker": ours.requests_per_worker, "sglang_requests_per_worker": theirs.requests_per_worker,
        "shared_lru_hit_rate": round(shared.hit_rate, 4), "unbounded_hit_rate": round(unbounded, 4),
        "ceiling_ratio": round(unbounded / their_rate, 3) if their_rate else None,
        "sglang_replays": len(replays), "sglang_replay_hit_rates": [round(x, 4) for x in their_rates],
        "sglang_replay_imbalances": [round(r.imbalance, 3) for r, _ in replays],
        "sglang_version": run.version,
        "sglang_policy": peer.policy, "sglang_router_args": list(peer.router_args) or "defaults",
        "speedup": peer.speedup, "sglang_wall_s": run.wall_s, "send_lateness_trace_ms": run.lateness_ms,
        "arrivals_out_of_send_order": run.reordered,
    }
    if len(cfg.tiers) > 1:
        extra |= {"tiers": dict(cfg.tiers), "tier_weights": {m: round(TIER_WEIGHTS[m], 4) for m, _ in cfg.tiers},
                  "any_tier_hit_rate": round(ours.hit_rate, 4), "sglang_any_tier_hit_rate": round(theirs.hit_rate, 4),
                  "hit_blocks_by_tier": ours.hit_blocks_by_tier, "sglang_hit_blocks_by_tier": theirs.hit_blocks_by_tier}
    return Result("hit_rate_vs_sglang", ours.weighted_hit_rate, "ratio", f"sglang-router {run.version} {peer.policy}",
                  their_rate, True, extra)


def tiers_label(cfg: SimConfig) -> str:
    """", DRAM 2000 + SSD 4000 blocks" when the replay has host tiers, else ""."""
    names = {"dram": "DRAM", "ssd": "SSD"}
    host = [f"{names[m]} {n}" for m, n in cfg.tiers[1:]]
    return f", {' + '.join(host)} blocks" if host else ""


def held_out(rows: Sequence[Result]) -> tuple[list[Result], float, dict] | None:
    """(the held-out rows, their mean ratio, what a summary row reports of them), None when none is held out."""
    held = [r for r in rows if r.extra["held_out"]]
    if not held:
        return None
    ratios = [r.ratio for r in held]
    ceilings = [r.extra["ceiling_ratio"] or float("inf") for r in held if "ceiling_ratio" in r.extra]
    return held, sum(ratios) / len(ratios), {
        "num_rows": len(held), "min_ratio": round(min(ratios), 3),
        **({"ceiling_mean_ratio": round(sum(ceilings) / len(ceilings), 3)} if ceilings else {}),
        "max_imbalance": max(r.extra["imbalance"] for r in held),
        "max_sglang_imbalance": max(r.extra["sglang_imbalance"] for r in held)}


def summary(rows: Sequence[Result]) -> Result | None:
    """The held-out rows' mean ratio, against parity (1.0), with the targets checked."""
    found = held_out(rows)
    if found is None:
        return None
    held, mean, extra = found
    extra |= {"windows": sorted({(r.extra["trace"], r.extra["first_request"]) for r in held}),
              "capacities": sorted({r.extra["capacity_blocks"] for r in held}),
              "targets": {"min_ratio": TARGET_MIN_RATIO, "mean_ratio": TARGET_MEAN_RATIO,
                          "max_imbalance": TARGET_MAX_IMBALANCE},
              "meets_targets": extra["min_ratio"] >= TARGET_MIN_RATIO and mean >= TARGET_MEAN_RATIO
              and extra["max_imbalance"] <= TARGET_MAX_IMBALANCE}
    return Result("hit_rate_vs_sglang_heldout_mean", mean, "x", "parity with sglang-router", 1.0, True, extra)


def bench_vs_sglang(traces: Sequence[str | Path], num_requests: int, offsets: Sequence[int],
                    capacities: Sequence[int], cfg: SimConfig, peer: PeerConfig, policy_config: dict | None = None,
                    log=lambda msg: None) -> tuple[list[Result], str | None]:
    """Every (trace, offset, capacity) row and the held-out summary; (rows, None), or ([], why)
    when sglang-router cannot run here."""
    rows = []
    for trace in traces:
        for offset in offsets:
            requests = window(trace, num_requests, offset)
            for capacity in capacities:
                c = dataclasses.replace(cfg, capacity_blocks=capacity)
                try:
                    rows.append(compare_window(trace, requests, offset, c, peer, policy_config, log))
                except PeerUnavailable as exc:
                    log(f"vs sglang: not measured: {exc}")
                    return [], str(exc)
    total = summary(rows)
    return rows + ([total] if total else []), None
