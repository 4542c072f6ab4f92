"""`kvweave bench tp` end to end on the tiny model (real rank processes, both all-reduces): every
metric reported for every chunk size, and bad flags refused with exit 2."""
from __future__ import annotations

import json

import pytest

from cli.main import main


def test_bench_tp_reports_the_overlap_and_the_allreduces(tiny_model_variant, tmp_path, capsys):
    out = tmp_path / "tp.json"
    rc = main(["bench", "tp", "--model", str(tiny_model_variant("gqa")), "--chunks", "32,64", "--repeats", "1",
               "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    results = {r["metric"]: r for r in doc["results"]}
    for tokens in (32, 64):
        for impl in ("shm", "gloo"):
            step, hidden = results[f"step_ms/{impl}/{tokens}"], results[f"allreduce_hidden_share/{impl}/{tokens}"]
            assert step["value"] > 0 and step["baseline_value"] > 0 and hidden["baseline_value"] > 0
        assert results[f"shm_allreduce_step/{tokens}"]["baseline"] == "the same step with gloo's all-reduce"
    assert doc["config"]["tensor_parallel_size"] == 2 and doc["environment"]["cpu_model"]
    assert "allreduce_hidden_share/shm/64" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--chunks", "x"], "--chunks must be"),
    (["--tp", "1"], "--tp >= 2"),
    (["--allreduce", "mpi"], "--allreduce 'mpi'"),
    (["--model", "/nonexistent"], "not a Hugging Face folder"),
])
def test_bench_tp_refuses_bad_flags(argv, message, capsys):
    assert main(["bench", "tp", *argv]) == 2
    assert message in capsys.readouterr().err
