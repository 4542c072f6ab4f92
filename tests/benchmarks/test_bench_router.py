"""`kvweave bench router`: the Mooncake replay's invariants and the report's format (no timing asserts)."""
from __future__ import annotations

import json
import math

import pytest

from controlplane.policies import make_policy
from benchmarks.mooncake_sim import (
    TUNING_WINDOW, LRUBlockCache, SimConfig, chain_hashes, in_sample, load_trace, num_unique_blocks, simulate,
    simulate_shared,
)
from benchmarks.router import DEFAULT_TRACE, QUICK, BenchConfig
from cli.main import main
from loadgen.traces import MooncakeRecord
from loadgen.types import WorkloadError

SLICE = 200
needs_trace = pytest.mark.skipif(not DEFAULT_TRACE.exists(), reason=f"{DEFAULT_TRACE} not present")


@pytest.fixture(scope="module")
def trace() -> list[MooncakeRecord]:
    return load_trace(DEFAULT_TRACE, SLICE)


def unbounded_hits(requests: list[MooncakeRecord]) -> list[int]:
    """Per request: its leading blocks whose ids any earlier request had (no cache can do better)."""
    seen, out = set(), []
    for r in requests:
        n = 0
        while n < len(r.hash_ids) and r.hash_ids[n] in seen:
            n += 1
        out.append(n)
        seen.update(r.hash_ids)
    return out


def req(*ids: int, ts: float = 0.0) -> MooncakeRecord:
    return MooncakeRecord(0, ts / 1000.0, 512 * len(ids), 8, ids)


def test_chain_keeps_shared_prefixes_and_separates_different_ones():
    a, b, c = chain_hashes([1, 2, 3]), chain_hashes([1, 2, 4]), chain_hashes([9, 2])
    assert a[:2] == b[:2] and a[2] != b[2]
    assert c[1] != a[1]  # the same id after a different prefix is a different block
    assert chain_hashes([1, 2, 3]) == a and len({*a, *b}) == 4


@needs_trace
def test_sim_blocks_reproduce_the_traces_sharing(trace):
    hash_of, id_of = {}, {}
    for r in trace:
        for i, h in zip(r.hash_ids, chain_hashes(r.hash_ids)):
            assert hash_of.setdefault(i, h) == h and id_of.setdefault(h, i) == i
    assert num_unique_blocks([chain_hashes(r.hash_ids) for r in trace]) == len({i for r in trace for i in r.hash_ids})


def test_lru_keeps_a_prefix_head_longest():
    cache = LRUBlockCache(3)
    a = chain_hashes([1, 2, 3])
    cache.insert(a)
    assert cache.leading_hits(a) == 3
    d = chain_hashes([7])
    cache.insert(d)  # evicts the least recent: the tail of [1, 2, 3]
    assert a[2] not in cache and cache.leading_hits(a) == 2 and cache.leading_hits(d) == 1 and len(cache) == 3
    cache.insert(chain_hashes([1, 2, 3, 4, 5]))  # longer than the cache: its head stays
    assert cache.leading_hits(chain_hashes([1, 2, 3, 4, 5])) == 3


def test_shared_cache_is_exact_on_a_hand_made_trace():
    requests = [req(1, 2, 3), req(1, 2, 4), req(5), req(1, 2, 3, 6), req(5, 7)]
    assert unbounded_hits(requests) == [0, 2, 0, 3, 1]
    assert simulate_shared(requests, None).hit_blocks == 6
    # capacity 3: [1,2,4] evicts 3 and hits 2; [5] evicts 4; [1,2,3,6] hits 2 and keeps its head; [5,7] misses
    assert simulate_shared(requests, 3).hit_blocks == 4


@needs_trace
def test_policies_on_a_trace_slice_stay_within_the_bounds(trace):
    cfg = SimConfig(num_workers=8, capacity_blocks=200)
    bound = sum(unbounded_hits(trace))
    unbounded = simulate_shared(trace, None)
    assert unbounded.hit_blocks == bound
    assert simulate_shared(trace, 10**6).hit_blocks == bound  # a cache that never evicts is the unbounded one
    assert simulate_shared(trace, 8 * 200).hit_blocks <= bound
    for name in ("prefix_aware", "round_robin", "least_loaded"):
        r = simulate(trace, make_policy(name), cfg)
        assert r.prompt_blocks == sum(len(t.hash_ids) for t in trace)
        assert 0 <= r.hit_blocks <= bound, name
        assert sum(r.requests_per_worker) == SLICE and r.imbalance >= 1.0
        assert sum(r.reasons.values()) == SLICE
    assert simulate(trace, make_policy("round_robin"), cfg).requests_per_worker == [SLICE // 8] * 8


@needs_trace
def test_bench_router_mooncake_json(tmp_path, capsys):
    path = tmp_path / "router.json"
    n = 96  # round robin: as many on each worker; the tuning search (when the defaults miss) on the 96 before
    rc = main(["bench", "router", "--metrics", "prefix_hit_rate_mooncake", "--trace-requests", str(n),
               "--json", str(path)])
    assert rc == 0
    doc = json.loads(path.read_text())
    assert doc["benchmark"] == "router" and doc["config"]["trace_requests"] == n
    assert {"cpus", "torch", "device"} <= set(doc["environment"])
    results = {r["metric"]: r for r in doc["results"]}
    assert {"prefix_hit_rate_mooncake", "prefix_hit_rate_mooncake_round_robin"} <= set(results)
    assert set(results) <= {"prefix_hit_rate_mooncake", "prefix_hit_rate_mooncake_round_robin",
                            "prefix_hit_rate_mooncake_tuned"}
    for r in results.values():
        assert {"metric", "value", "unit", "baseline", "baseline_value", "ratio", "imbalance"} <= set(r)
        assert 0.0 <= r["value"] <= r["unbounded_cache_hit_rate"] <= 1.0
        assert 0.0 < r["baseline_value"] <= r["unbounded_cache_hit_rate"]
        assert r["imbalance"] >= 1.0 and math.isfinite(r["ratio"]) and r["num_requests"] == n
    assert results["prefix_hit_rate_mooncake_round_robin"]["imbalance"] == 1.0
    assert results["prefix_hit_rate_mooncake"]["policy_config"] == "defaults"
    assert ("prefix_hit_rate_mooncake_tuned" in results) != results["prefix_hit_rate_mooncake"]["meets_target"]
    assert capsys.readouterr().out.startswith("benchmark: router")


def test_bench_router_cluster_metrics_report(tmp_path):
    path = tmp_path / "router.json"
    rc = main(["bench", "router", "--quick", "--metrics", "router_overhead_p99,routing_decisions_per_s",
               "--index-blocks", "1000", "--repeats", "1", "--json", str(path)])
    assert rc == 0
    results = {r["metric"]: r for r in json.loads(path.read_text())["results"]}
    assert list(results) == ["router_overhead_p99", "router_overhead_p99_grpc", "router_overhead_p99_http",
                             "routing_decisions_per_s"]
    for r in results.values():
        assert r["value"] > 0 and r["baseline_value"] > 0
    overhead = results["router_overhead_p99"]
    # Most go to the worker holding the prompt's blocks. The others could fetch them from it (a peer
    # is cheap next to a recompute), so once it took more of the recent requests than they did, the
    # traffic term sends some of this one hot prompt to them.
    for picks, n in ((overhead["picks"], overhead["num_samples"]),
                     (results["router_overhead_p99_grpc"]["chosen_workers"], None)):
        assert set(picks) <= {"w0", "w1", "w2", "w3"} and (n is None or sum(picks.values()) == n)
        assert all(picks["w0"] > n for w, n in picks.items() if w != "w0"), picks
    assert overhead["index_blocks"] == 4 * 1000 + overhead["prompt_blocks"]
    assert {"tokenize", "hash", "index_lookup", "scoring"} <= set(overhead["stages"])


# ---------------------------------------------------------------------- trace windows and weights

def write_trace(path, num_records: int) -> None:
    """Record i: i + 1 blocks whose ids no other record has, so a window's unique blocks name its records."""
    with open(path, "w") as f:
        for i in range(num_records):
            ids = [1000 * i + j for j in range(i + 1)]
            f.write(json.dumps({"timestamp": 100 * i, "input_length": 512 * len(ids), "output_length": 4,
                                "hash_ids": ids}) + "\n")


def test_load_trace_window_and_offset_past_the_end(tmp_path):
    path = tmp_path / "trace.jsonl"
    write_trace(path, 5)
    assert [r.line for r in load_trace(path, 2, 1)] == [2, 3]
    assert [r.line for r in load_trace(path, 10, 3)] == [4, 5]  # the window ends with the trace
    assert [r.line for r in load_trace(path)] == [1, 2, 3, 4, 5]
    for offset in (5, 6, -1):
        with pytest.raises(WorkloadError, match=f"holds 5 requests .*offset {offset} is outside it"):
            load_trace(path, 1, offset)


def bench_json(tmp_path, *args: str) -> dict:
    path = tmp_path / "router.json"
    assert main(["bench", "router", "--metrics", "prefix_hit_rate_mooncake", "--json", str(path), *args]) == 0
    doc = json.loads(path.read_text())
    return {r["metric"]: r for r in doc["results"]} | {"config": doc["config"]}


def test_bench_router_trace_offset_replays_a_later_window(tmp_path):
    path = tmp_path / "trace.jsonl"
    write_trace(path, 6)
    first = bench_json(tmp_path, "--trace", str(path), "--trace-requests", "3", "--trace-offset", "0")
    later = bench_json(tmp_path, "--trace", str(path), "--trace-requests", "3", "--trace-offset", "3")
    assert later["config"]["trace_offset"] == 3 and first["config"]["trace_offset"] == 0
    for doc, offset, blocks in ((first, 0, 1 + 2 + 3), (later, 3, 4 + 5 + 6)):
        row = doc["prefix_hit_rate_mooncake"]
        assert row["first_request"] == offset and row["num_requests"] == 3 and row["unique_blocks"] == blocks
        assert row["in_sample"] is False  # not the trace the defaults were tuned on


def test_bench_router_trace_offset_past_the_end_is_a_clean_error(tmp_path, capsys):
    path = tmp_path / "trace.jsonl"
    write_trace(path, 4)
    rc = main(["bench", "router", "--metrics", "prefix_hit_rate_mooncake", "--trace", str(path), "--trace-offset", "4"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "error: --trace-offset:" in err and "holds 4 requests" in err and "Traceback" not in err
    assert main(["bench", "router", "--metrics", "prefix_hit_rate_mooncake", "--trace-offset", "-1"]) == 2


def test_in_sample_is_an_overlap_with_the_tuning_window():
    first, end = TUNING_WINDOW
    assert in_sample(DEFAULT_TRACE, first, 1) and in_sample(DEFAULT_TRACE, end - 1, 500)
    assert not in_sample(DEFAULT_TRACE, end, 2000) and not in_sample("other.jsonl", first, 2000)
    # The traffic weight was chosen on the synthetic agent trace's window too; another seed is another trace.
    assert in_sample("synthetic:agent", first, 10) and in_sample("synthetic:agent:0", first, 10)
    assert not in_sample("synthetic:agent", end, 10) and not in_sample("synthetic:agent:1", first, 10)
    assert BenchConfig().trace_offset >= end and QUICK.trace_offset >= end


@needs_trace
def test_bench_router_weights_and_grid_replay_the_real_policy(tmp_path):
    args = ("--trace-requests", "100", "--trace-offset", "0")  # each run also searches knobs on its window
    doc = bench_json(tmp_path, *args, "--weight-grid", "4,64:128,256")
    row = doc["prefix_hit_rate_mooncake"]
    assert row["in_sample"] is True and row["weights"] == {"prefill_weight": 64.0, "decode_weight": 256.0}
    grid = row["weight_grid"]
    assert [(g["prefill_weight"], g["decode_weight"]) for g in grid] == [(4, 128), (4, 256), (64, 128), (64, 256)]
    assert grid[3]["hit_rate"] == round(row["value"], 4) and grid[3]["imbalance"] == row["imbalance"]
    chosen = bench_json(tmp_path, *args, "--prefill-weight", "4", "--decode-weight", "128")["prefix_hit_rate_mooncake"]
    assert chosen["policy_config"] == chosen["weights"] == {"prefill_weight": 4.0, "decode_weight": 128.0}
    assert (round(chosen["value"], 4), chosen["imbalance"]) == (grid[0]["hit_rate"], grid[0]["imbalance"])


def test_replicas_see_their_own_placements_at_once_and_the_others_late():
    """Two replicas taking requests in turn, every request on w0 (a recording policy): a replica's
    view is the load at its last sync plus its own placements since, so it misses the other's
    placements until it syncs again."""
    from benchmarks.replica_sim import simulate_replicas
    from controlplane.policies import Decision

    class Recording:
        name = "recording"
        seen: list[list[int]] = []

        def pick(self, request, states):
            Recording.seen.append([s.num_running for s in states])
            return Decision(states[0].worker_id, "recording", "test")

    reqs = [MooncakeRecord(line=i, timestamp_s=i // 2 / 1000, input_length=16, output_length=10_000,
                           hash_ids=(1000 + i,)) for i in range(4)]
    cfg = SimConfig(num_workers=2, capacity_blocks=8, block_size=16)
    simulate_replicas(reqs, Recording, 2, cfg, sync_ms=1e9)
    assert Recording.seen == [[0, 0], [1, 0], [1, 0], [2, 0]]  # truth before each: 0, 1, 2, 3 on w0
    Recording.seen = []
    simulate_replicas(reqs, Recording, 2, cfg, sync_ms=0.0)
    assert Recording.seen == [[0, 0], [1, 0], [2, 0], [3, 0]]


@needs_trace
def test_bench_router_replicas_json(tmp_path):
    path = tmp_path / "replicas.json"
    rc = main(["bench", "router", "--metrics", "hit_rate_replicas", "--trace-requests", str(SLICE),
               "--sim-capacity", "50", "--json", str(path)])
    assert rc == 0
    results = {r["metric"]: r for r in json.loads(path.read_text())["results"]}
    assert set(results) == {"hit_rate_replicas/2/2000/50", "hit_rate_replicas/4/2000/50"}
    assert all(r["baseline_value"] > 0 and r["num_requests"] == SLICE for r in results.values())
