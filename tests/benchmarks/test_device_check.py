"""The GPU device check's script, run the way CI can: `scripts/device-check.sh smoke` runs every
check's code on tiny shapes on the CPU (the Triton kernel under Triton's interpreter), so the
script a lent GPU runs does not rot between the sessions that have one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_run_reports_every_check(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "scripts/device-check.sh", "smoke"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "device-check.json").read_text())
    assert doc["benchmark"] == "device_check" and doc["environment"]["cpu_model"]
    checks = doc["config"]["checks"]
    assert checks["cuda_graphs_decode"] == "skipped: needs a CUDA device"
    assert all(v.startswith("ok") for k, v in checks.items() if k != "cuda_graphs_decode"), checks
    results = {r["metric"]: r for r in doc["results"]}
    assert set(results) >= {"triton_decode_vs_torch/default", "greedy_match_vs_hf", "bf16_logits_vs_hf_fp32",
                            "decode_roofline", "throughput_vs_hf_gpu", "tier_offload", "onboard_overlap",
                            "ipc_handoff", "elementwise_ops/rope/4"}
    assert results["ipc_handoff"]["equal"]  # the bytes another process mapped (host memory here)
    assert results["greedy_match_vs_hf"]["value"] == 1.0  # kvweave fp32 = transformers on the same weights
    assert results["triton_decode_vs_torch/default"]["max_abs_err_vs_fp32"] < 0.05
    assert results["bf16_logits_vs_hf_fp32"]["within_tolerance"]
    for r in results.values():
        assert r["value"] > 0 and r["baseline_value"] > 0  # ratios on the CPU (interpreted kernels) mean nothing


def test_unknown_check_is_refused(capsys) -> None:
    from benchmarks.device_check import main

    with pytest.raises(SystemExit) as exited:  # in this process: no second torch import
        main(["--out", "/tmp/x", "--tokenizer-dir", "/tmp/x", "--checks", "warp_drive"])
    assert exited.value.code == 2 and "unknown checks ['warp_drive']" in capsys.readouterr().err
