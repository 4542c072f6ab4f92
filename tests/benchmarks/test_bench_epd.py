"""`kvweave bench epd --quick` end to end on the tiny vision model (real clusters of processes): both
metrics reported against their baselines from the same run, and the embeddings came from where the
benchmark says (a cached embedding fetched from the encode worker, a cold one encoded there); the
long-prefill flags reach every worker (a worker given a setting it rejects does not start)."""
from __future__ import annotations

import json

from cli.main import main


def test_bench_epd_quick_reports_both_metrics(tiny_vlm_model, tmp_path, capsys):
    out = tmp_path / "epd.json"
    rc = main(["bench", "epd", "--quick", "--model", str(tiny_vlm_model), "--dtype", "float32",
               "--num-blocks", "256", "--dram-cache-gb", "0.02",  # 0.5 GiB: a second per worker
               "--long-prefill-token-threshold", "32", "--long-prefill-chunk-tokens", "8",
               "--prioritize-short-prefills", "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert (doc["config"]["long_prefill_token_threshold"], doc["config"]["long_prefill_chunk_tokens"],
            doc["config"]["prioritize_short_prefills"]) == (32, 8, True)
    results = {r["metric"]: r for r in doc["results"]}
    assert results.keys() == {"ttft_embedding_cache", "text_ttft_p99_image_burst"}
    assert all(r["value"] > 0 and r["baseline_value"] > 0 for r in results.values())
    assert doc["environment"]["cpu_model"] and doc["config"]["quick"] is True
    runs = doc["config"]["runs"]
    fetched = {"cached": 0, "fetched": 1, "encoded": 0}
    # both kinds are fetched from the encode worker; the cold image was encoded there for the request
    assert runs["embedding_cache"]["image_sources"] == {"cold": [fetched] * 2, "cached": [fetched] * 2}
    assert runs["burst_encode_pool"]["image_sources"] == [fetched] * 2
    assert runs["burst_colocated"]["image_sources"] == [{"cached": 0, "fetched": 0, "encoded": 1}] * 2
    assert len(runs["burst_colocated"]["text_ttft_s"]) == len(runs["burst_encode_pool"]["text_ttft_s"]) == 6
    assert "ttft_embedding_cache" in capsys.readouterr().out


def test_bench_epd_rejects_long_prefill_settings_without_a_threshold(capsys):
    assert main(["bench", "epd", "--long-prefill-chunk-tokens", "8"]) == 2
    assert "need a long_prefill_token_threshold" in capsys.readouterr().err
