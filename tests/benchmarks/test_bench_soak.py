"""`kvweave bench soak` end to end on a tiny model for seconds (a real cluster of processes): every
process's RSS at the start, the end and in between, and every request accounted for."""
from __future__ import annotations

import json

from cli.main import main


def test_bench_soak_reports_rss_of_every_process_and_every_request(tiny_model_variant, tmp_path, capsys):
    out = tmp_path / "soak.json"
    rc = main(["bench", "soak", "--model", str(tiny_model_variant("gqa")), "--duration-s", "3", "--warmup-s", "0",
               "--rate", "4", "--long-input-len", "100:200", "--short-input-len", "8:16", "--short-output-len", "4",
               "--sample-s", "0.5", "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    results = {r["metric"]: r for r in doc["results"]}
    processes = {"router", "redis", "worker-0", "worker-1"}
    assert {f"rss_{name}" for name in processes} <= results.keys()
    assert all(results[f"rss_{name}"]["value"] > 0 and results[f"rss_{name}"]["baseline_value"] > 0
               for name in processes)
    run = doc["config"]["run"]
    assert run["requests_sent"] > 0 and run["requests_ok"] + sum(run["failed_by_kind"].values()) == run["requests_sent"]
    assert results["requests_ok"]["value"] == run["requests_ok"]
    assert len(run["rss_samples_mib"]) >= 3 and processes <= run["rss_samples_mib"][0].keys()
    assert doc["environment"]["cpu_model"]
    assert "rss_router" in capsys.readouterr().out
