"""`kvweave bench disagg` end to end on a tiny model and tiny lengths (real clusters of processes):
every metric the issue names is reported against its colocated baseline, the long prompts are
handed off, the short ones are not, and the run that kills the prefill worker loses nothing."""
from __future__ import annotations

import json

from cli.main import main


def test_bench_disagg_reports_every_metric(tiny_model_variant, tmp_path, capsys):
    out = tmp_path / "disagg.json"
    rc = main(["bench", "disagg", "--model", str(tiny_model_variant("gqa")), "--dtype", "float32",
               "--num-blocks", "512", "--requests", "8", "--rate", "8", "--long-fraction", "0.5",
               "--long-input-len", "200:260", "--long-output-len", "2", "--short-input-len", "8:16",
               "--short-output-len", "6", "--max-num-batched-tokens", "32", "--json", str(out),
               "--handoff-margin", "1e6"])  # the tiny model computes faster than its KV moves
    assert rc == 0
    doc = json.loads(out.read_text())
    results = {r["metric"]: r for r in doc["results"]}
    assert {"itl_p99_disagg", "ttft_p50_disagg", "goodput_disagg", "short_no_handoff_share",
            "handoff_time_vs_prefill", "completed_with_prefill_killed"} <= results.keys()
    assert doc["environment"]["cpu_model"]
    runs = doc["config"]["runs"]
    assert runs["colocated"]["completed"] == runs["disaggregated"]["completed"] == 8
    assert "requests_by_disaggregation" not in runs["colocated"]
    decisions = runs["disaggregated"]["requests_by_disaggregation"]
    assert decisions.get("remote", 0) >= 1 and sum(decisions.values()) == 8
    assert results["short_no_handoff_share"]["value"] == 1.0
    assert 0 < results["handoff_time_vs_prefill"]["value"] < results["handoff_time_vs_prefill"]["baseline_value"]
    killed = results["completed_with_prefill_killed"]
    assert killed["value"] == killed["baseline_value"] == 8 and killed["lost"] == 0
    assert "itl_p99_disagg" in capsys.readouterr().out
