"""sglang-router as the router bench's peer: prompt text from trace block ids, the fake workers'
cache model, a real sglang-router replaying a tiny window, and the comparison's rows (no timing asserts)."""
from __future__ import annotations

import importlib.util
import json

import pytest

from benchmarks.agent_trace import AgentTraceConfig, parse_name, synthetic_trace
from benchmarks.mooncake_sim import SimConfig, chain_hashes, load_trace, score_choices, sim_requests, simulate
from benchmarks.router import DEFAULT_TRACE
from benchmarks.sglang_peer import FakeWorkers, PeerConfig, PromptTexts, replay
from cli.main import main
from controlplane.policies import make_policy
from loadgen.traces import MooncakeRecord

needs_sglang = pytest.mark.skipif(importlib.util.find_spec("sglang_router") is None,
                                  reason="sglang-router not installed (the bench extra: make setup)")
needs_trace = pytest.mark.skipif(not DEFAULT_TRACE.exists(), reason=f"{DEFAULT_TRACE} not present")


def rec(*ids: int, tokens: int | None = None, ts: float = 0.0, out: int = 8) -> MooncakeRecord:
    return MooncakeRecord(0, ts, tokens if tokens is not None else 512 * len(ids), out, ids)


def test_prompt_text_shares_exactly_the_shared_block_prefix():
    texts = PromptTexts()
    a, b, c = texts.prompt(rec(1, 2, 3)), texts.prompt(rec(1, 2, 4)), texts.prompt(rec(9, 2, 3))
    assert len(a) == len(b) == len(c) == 3 * 512 * 4  # one 4-character word a token
    assert a[:2 * 2048] == b[:2 * 2048] and a[2 * 2048] != b[2 * 2048]
    assert a[0] != c[0] or a[:4] != c[:4]  # different first blocks differ from their first word on
    assert texts.prompt(rec(1, 2, 3)) == a and PromptTexts().prompt(rec(1, 2, 3)) == a  # fixed per id
    partial = texts.prompt(rec(1, 2, tokens=512 + 100))
    assert len(partial) == (512 + 100) * 4 and a.startswith(partial)


def test_fake_workers_hold_each_answer_for_its_uncached_tokens():
    requests = [rec(1, 2, out=100), rec(1, 2, 3, out=0), rec(1, 2, 3, out=0)]
    workers = FakeWorkers(sim_requests(requests), SimConfig(num_workers=2, capacity_blocks=10, ms_per_token=1.0), speedup=10.0)
    assert workers.arrive(0, 0) == pytest.approx((1024 + 100) / 1000 / 10)
    assert workers.arrive(1, 0) == pytest.approx(512 / 1000 / 10)  # its first two blocks are cached on w0
    assert workers.arrive(2, 1) == pytest.approx(1536 / 1000 / 10)  # nothing on w1
    assert workers.choices == [0, 0, 1]


def test_score_choices_is_the_policy_replay_when_given_its_choices():
    requests = load_trace(DEFAULT_TRACE, 150, 2000) if DEFAULT_TRACE.exists() else synthetic_trace("synthetic:agent", 150)
    cfg = SimConfig(num_workers=4, capacity_blocks=200)
    hashes = [chain_hashes(r.hash_ids) for r in requests]
    ours = simulate(requests, make_policy("round_robin"), cfg, hashes)
    recorded = score_choices(requests, [i % 4 for i in range(len(requests))], cfg, hashes)
    assert (recorded.hit_blocks, recorded.prompt_blocks, recorded.requests_per_worker) == \
        (ours.hit_blocks, ours.prompt_blocks, ours.requests_per_worker)
    assert recorded.best_hit_blocks >= recorded.hit_blocks and 0.0 <= recorded.skipped_share <= 1.0


def test_synthetic_agent_trace_is_deterministic_and_well_formed():
    trace = synthetic_trace("synthetic:agent", 600)
    assert trace == synthetic_trace("synthetic:agent:0", 600) and trace != synthetic_trace("synthetic:agent:1", 600)
    assert synthetic_trace("synthetic:agent", 300) == trace[:300]  # a longer trace starts the same
    assert [r.timestamp_s for r in trace] == sorted(r.timestamp_s for r in trace)
    first_of: dict[int, tuple[int, ...]] = {}
    for r in trace:
        assert len(r.hash_ids) == -(-r.input_length // 512) <= AgentTraceConfig().max_blocks + 8
        for k, h in enumerate(r.hash_ids):  # prefix-unique ids: an id always follows the same prefix
            assert first_of.setdefault(h, r.hash_ids[:k]) == r.hash_ids[:k]
    assert len({r.hash_ids[0] for r in trace}) <= AgentTraceConfig().num_agents
    with pytest.raises(ValueError, match="synthetic:agent"):
        parse_name("synthetic:rag")


@needs_sglang
def test_sglang_router_replays_a_tiny_window_and_records_a_choice_per_request(tmp_path):
    # Three conversations of growing turns: cache_aware keeps each on the worker that first got it.
    requests = [rec(1, 10 * c + 1, *range(10 * c + 2, 10 * c + 2 + t), ts=0.05 * (3 * t + c), out=4)
                for t in range(3) for c in range(3)]
    cfg = SimConfig(num_workers=3, capacity_blocks=100)
    run = replay(requests, cfg, PeerConfig(speedup=50.0), log_dir=tmp_path)
    assert len(run.choices) == len(requests) and set(run.choices) <= {0, 1, 2}
    assert run.version == "0.3.2" and (tmp_path / "sglang-router.log").exists()
    by_conversation = [{run.choices[3 * t + c] for t in range(3)} for c in range(3)]
    assert all(len(workers) == 1 for workers in by_conversation), run.choices
    scored = score_choices(requests, run.choices, cfg)
    assert scored.hit_blocks == scored.best_hit_blocks > 0


@needs_sglang
@needs_trace
def test_bench_router_vs_sglang_rows(tmp_path):
    path = tmp_path / "router.json"
    rc = main(["bench", "router", "--metrics", "hit_rate_vs_sglang", "--trace-requests", "60", "--trace-offset",
               "0,2000", "--sim-capacity", "500", "--peer-speedup", "300", "--peer-replays", "2",
               "--json", str(path)])
    assert rc == 0
    doc = json.loads(path.read_text())
    rows = [r for r in doc["results"] if r["metric"] == "hit_rate_vs_sglang"]
    assert [(r["first_request"], r["capacity_blocks"], r["held_out"]) for r in rows] == [(0, 500, False),
                                                                                          (2000, 500, True)]
    for r in rows:
        # Two replays of sglang-router: the baseline is their mean.
        assert r["sglang_replays"] == 2 and len(r["sglang_replay_imbalances"]) == 2
        assert r["baseline_value"] == pytest.approx(sum(r["sglang_replay_hit_rates"]) / 2, abs=1e-4)
        assert sum(r["requests_per_worker"]) == sum(r["sglang_requests_per_worker"]) == 60
        assert r["imbalance"] >= 1.0 and r["sglang_imbalance"] >= 1.0 and r["sglang_version"] == "0.3.2"
        # No placement beats a cache that never evicts: the ceiling bounds both routers.
        assert r["value"] <= r["unbounded_hit_rate"] + 1e-4 and r["baseline_value"] <= r["unbounded_hit_rate"] + 1e-4
        assert r["ceiling_ratio"] == pytest.approx(r["unbounded_hit_rate"] / r["baseline_value"], rel=1e-2)
    summary, = [r for r in doc["results"] if r["metric"] == "hit_rate_vs_sglang_heldout_mean"]
    assert summary["num_rows"] == 1 and summary["value"] == pytest.approx(rows[1]["ratio"], abs=1e-3)
    assert summary["ceiling_mean_ratio"] == rows[1]["ceiling_ratio"]


def test_peer_replays_must_be_positive(capsys):
    assert main(["bench", "router", "--metrics", "hit_rate_vs_sglang", "--peer-replays", "0"]) == 2
    assert "--peer-replays must be positive" in capsys.readouterr().err


def test_vs_sglang_says_why_when_sglang_router_is_missing(monkeypatch):
    import benchmarks.sglang_peer as peer
    from benchmarks.vs_sglang import bench_vs_sglang

    monkeypatch.setattr(peer.importlib.util, "find_spec", lambda name: None)
    rows, why = bench_vs_sglang(["synthetic:agent"], 20, [0], [100], SimConfig(), PeerConfig())
    assert rows == [] and why.startswith("sglang-router is not installed")
