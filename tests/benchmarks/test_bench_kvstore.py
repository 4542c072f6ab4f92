"""`kvweave bench kvstore` on a few MB: every metric is produced with its same-run baseline, the
data it moved came back exact (the benchmark asserts it), and a lookup is one Redis round trip."""
from __future__ import annotations

import dataclasses

from benchmarks.kvstore import METRICS, QUICK, run_benchmark


def test_kvstore_benchmark_runs_small(tmp_path):
    cfg = dataclasses.replace(QUICK, total_mb=4, repeats=1, index_entries=1000, lookup_seconds=0.1)
    metrics = [m for m in METRICS if m != "onboard_vs_recompute_512"]  # that one loads the default model
    config, results = run_benchmark(cfg, metrics, str(tmp_path))
    by_name = {r.metric: r for r in results}
    assert set(by_name) == set(metrics)
    for r in results:
        assert r.value > 0 and r.baseline_value > 0, r
    assert by_name["index_round_trips_per_request"].value == 1.0
    assert by_name["index_round_trips_per_request"].extra["worker_locate_round_trips"] == 1.0
    transfer = by_name["transfer_node_to_node"].extra
    assert transfer["transport"] == "tcp data plane"
    assert all(transfer[k] > 0 for k in ("grpc_stream_gb_s", "dist_gloo_gb_s", "dist_gloo_fresh_output_gb_s"))
    assert config["entry_shape"] == [2, 30, 3, 16, 64]
    assert list(tmp_path.iterdir()) == []  # the SSD files are gone
