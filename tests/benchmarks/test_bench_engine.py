"""`kvweave bench engine` end to end on the tiny model: the report's format only (no timing asserts)."""
from __future__ import annotations

import argparse
import json
import math

import pytest

from benchmarks.engine import METRICS, QUICK, fit_context
from benchmarks.report import metric_list_type
from cli.main import main


def test_bench_engine_writes_the_benchmarks_json(tiny_hf_model, tmp_path, capsys):
    path = tmp_path / "engine.json"
    rc = main(["bench", "engine", "--model", str(tiny_hf_model), "--quick", "--repeats", "1", "--json", str(path)])
    assert rc == 0
    doc = json.loads(path.read_text())
    assert doc["benchmark"] == "engine"
    assert doc["config"]["model"] == str(tiny_hf_model)
    assert doc["config"]["quick"] is True and doc["config"]["repeats"] == 1
    assert {"cpus", "torch", "device"} <= set(doc["environment"])
    assert [r["metric"] for r in doc["results"]] == list(METRICS)
    for r in doc["results"]:
        assert {"metric", "value", "unit", "baseline", "baseline_value", "ratio"} <= set(r)
        assert r["value"] > 0 and r["baseline_value"] > 0 and math.isfinite(r["ratio"])
    results = {r["metric"]: r for r in doc["results"]}
    assert results["ttft_prefix_hit"]["cached_tokens"] == doc["config"]["ttft_cached_len"]
    assert results["throughput_vs_hf"]["num_requests"] == doc["config"]["num_requests"]
    assert results["throughput_vs_hf_sequential"]["num_requests"] == doc["config"]["num_sequential"]
    assert {"p50_ms", "baseline_p50_ms"} <= set(results["itl_p99_chunked_prefill"])
    for name, batch in (("throughput_vs_hf", doc["config"]["hf_batch_size"]), ("throughput_vs_hf_sequential", 1)):
        phases = results[name]["step_phases"]
        assert phases["decode"]["steps"] > 0 and phases["mixed"]["steps"] > 0
        assert all(ms >= 0 for kind in phases.values() for ms in kind["ms_per_step"].values())
        ops = results[name]["decode_op_profile"]
        assert ops["batch"] == batch and ops["steps"] > 0 and ops["step_ms"] > 0 and ops["unfused_step_ms"] > 0
        parts = ops["ms_per_step"]  # every linear layer recognised by its shape, the kernels named
        assert {"linear_qkv", "linear_o", "linear_gate_up", "linear_down", "linear_lm_head", "attention",
                "sampler"} <= set(parts) and "linear_other" not in parts
        assert parts["untracked"] >= 0  # ops counted once each: their times fit in the wall time
    table = capsys.readouterr().out
    assert table.startswith("benchmark: engine") and all(m in table for m in METRICS)
    assert "decode step, batch 1" in table


def test_bench_engine_runs_a_subset_of_metrics(tiny_hf_model, tmp_path):
    path = tmp_path / "engine.json"
    rc = main(["bench", "engine", "--model", str(tiny_hf_model), "--quick", "--metrics", "ttft_prefix_hit",
               "--json", str(path)])
    assert rc == 0
    assert [r["metric"] for r in json.loads(path.read_text())["results"]] == ["ttft_prefix_hit"]


def test_unknown_metric_names_the_valid_ones():
    with pytest.raises(argparse.ArgumentTypeError, match="itl_p99_chunked_prefill"):
        metric_list_type(METRICS)("throughput_vs_hf,bogus")


def test_fit_context_shrinks_lengths_to_a_short_context():
    cfg = fit_context(QUICK, 512)
    assert max(cfg.prompt_len[1] + cfg.output_len[1], cfg.itl_prompt_len, cfg.ttft_prompt_len) <= 256
    assert cfg.ttft_cached_len % 16 == 0 and 0 < cfg.ttft_cached_len < cfg.ttft_prompt_len
    assert fit_context(QUICK, 8192) == QUICK
