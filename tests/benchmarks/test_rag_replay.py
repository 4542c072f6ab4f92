"""The shuffled-passage RAG replay: its requests (tokenized as the router does, passages as chunks
that recur in other orders), and chunk_reuse_vs_sglang's rows through the CLI on a tiny window."""
from __future__ import annotations

import importlib.util
import json
from collections import defaultdict
from pathlib import Path

import pytest

from benchmarks.cluster_sim import SimConfig, replay
from benchmarks.rag_replay import RagReplayConfig, in_sample, rag_trace
from cli.main import main
from controlplane.policies import make_policy
from kvstore.keys import chunk_block_keys, chunk_hash, encode_extra_keys, hash_blocks
from kvweave.model_files import load_tokenizer
from kvweave.segments import encode_segments
from loadgen.workloads.base import DEFAULT_DATASETS
from loadgen.workloads.rag import RagWorkload

needs_data = pytest.mark.skipif(not Path(DEFAULT_DATASETS["rag"]).exists(), reason="the MuSiQue subset is not present")


@needs_data
def test_rag_trace_is_the_workloads_requests_with_router_keys(tiny_hf_model):
    cfg = RagReplayConfig(model=str(tiny_hf_model), request_rate=4.0)
    trace = rag_trace(cfg, 40)
    assert rag_trace(cfg, 10, 30).requests == trace.requests[30:]  # a later window is the same requests
    loaded = load_tokenizer(str(tiny_hf_model))
    extra = encode_extra_keys((loaded.name, ""))
    session = next(RagWorkload(cfg.dataset, num_docs=4, popularity_skew=1.2, shuffle_docs=True, seed=0).sessions())
    token_ids, spans = encode_segments(loaded.tokenizer, session.turns[0].segments)
    first = trace.requests[0]
    assert (first.input_length, list(first.chunk_spans)) == (len(token_ids), spans) and len(spans) == 4
    assert list(first.chain) == hash_blocks(token_ids, 16, extra)
    a, n = spans[1]
    assert first.chunk_entries[1] == chunk_block_keys(chunk_hash(token_ids[a:a + n], extra), n, 16)
    assert trace.prompts[0] == "".join(text for text, _ in session.turns[0].segments)
    times = [r.timestamp_s for r in trace.requests]
    assert times == sorted(times) and times[0] > 0
    # A recurring question brings the same chunk keys back, in another order.
    orders = defaultdict(set)
    for q, r in zip(trace.questions, trace.requests):
        orders[q].add(tuple(keys[0] for keys in r.chunk_entries))
    assert any(len(o) > 1 and len({frozenset(x) for x in o}) == 1 for o in orders.values())


@needs_data
def test_chunk_aware_reuses_more_chunk_tokens_than_round_robin_on_the_replay(tiny_hf_model):
    trace = rag_trace(RagReplayConfig(model=str(tiny_hf_model)), 120)
    cfg = SimConfig(num_workers=4, capacity_blocks=300, block_size=16)
    ours = replay(trace.requests, cfg, "chunk_aware", policy=make_policy("chunk_aware"))
    rotation = replay(trace.requests, cfg, "round_robin", choices=[i % 4 for i in range(120)])
    assert ours.chunk_tokens > rotation.chunk_tokens > 0
    assert ours.num_requests == 120 and sum(ours.requests_per_worker) == 120


def test_rag_rows_overlapping_the_tuning_window_are_in_sample():
    assert in_sample(0, 10) and in_sample(1990, 100) and not in_sample(2000, 100)


@needs_data
@pytest.mark.skipif(importlib.util.find_spec("sglang_router") is None, reason="sglang-router is not installed")
def test_bench_router_chunk_reuse_vs_sglang_rows(tmp_path):
    path = tmp_path / "router.json"
    rc = main(["bench", "router", "--metrics", "chunk_reuse_vs_sglang", "--rag-requests", "30", "--rag-offset", "2000",
               "--rag-capacity", "400", "--sim-tiers", "1,2", "--peer-speedup", "100", "--json", str(path)])
    assert rc == 0
    doc = json.loads(path.read_text())
    row, summary = doc["results"]
    assert (row["metric"], row["first_request"], row["held_out"], row["capacity_blocks"]) == \
        ("chunk_reuse_vs_sglang", 2000, True, 400)
    assert (row["dram_blocks"], row["ssd_blocks"]) == (400, 800)
    for side in ("kvweave", "sglang"):
        assert sum(row[side]["requests_per_worker"]) == 30 and 0.0 <= row[side]["reuse_rate"] <= 1.0
    assert row["value"] == pytest.approx(row["kvweave"]["chunk_tokens_per_request"], abs=0.05)  # rounded in the row
    assert summary["metric"] == "chunk_reuse_vs_sglang_heldout_mean" and summary["num_rows"] == 1
    assert summary["value"] == pytest.approx(row["ratio"], abs=1e-3)


def test_bench_router_rejects_bad_tiers(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "router", "--metrics", "chunk_reuse_vs_sglang", "--sim-tiers", "0,2"])
    assert "an SSD tier needs a DRAM tier" in capsys.readouterr().err
