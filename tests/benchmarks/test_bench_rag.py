"""`kvweave bench rag` on a tiny model and a two-question dataset: every metric and every method is
reported with its same-run baseline, the accounting is consistent, and bad input is refused."""
from __future__ import annotations

import json

import pytest

from benchmarks.rag import METHODS, RagConfig, kl_and_agreement, prefill_flops, run_benchmark, token_f1
from cli.main import main


@pytest.fixture
def dataset(tmp_path):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    items = []
    for i in range(2):
        ctxs = [{"title": f"t{j}", "text": " ".join(words[(i + j + k) % len(words)] for k in range(8))}
                for j in range(3)]
        items.append({"question": f"which word comes after {words[i]}?", "answers": [words[i + 1]], "ctxs": ctxs})
    path = tmp_path / "rag.json"
    path.write_text(json.dumps(items))
    return path


def test_rag_benchmark_reports_every_method(tiny_hf_model, dataset):
    config, results = run_benchmark(RagConfig(model=str(tiny_hf_model), dtype="float32", dataset=str(dataset),
                                              questions=1, question_offset=0, docs=2, threads=1, f1_questions=2,
                                              kv_cache_gb=0.01, dram_cache_gb=0.01))  # ample for two tiny docs
    by_name = {r.metric: r for r in results}
    assert set(by_name) == {"ttft_vs_full_prefill", "ttft_with_cache_build", "prefill_compute_vs_prefix_caching",
                            "prefill_compute_vs_full", "quality_agreement", "quality_kl", "kl_vs_cacheblend",
                            "answer_f1"}
    methods = by_name["quality_agreement"].extra["by_method"]
    assert set(methods) == set(METHODS)
    assert methods["full"]["agreement"] == 1.0 and methods["full"]["kl"] == 0.0
    for m in METHODS:
        assert 0.0 <= methods[m]["agreement"] <= 1.0 and methods[m]["kl"] >= 0.0
        assert methods[m]["ttft_ms"] > 0
    # Each arm really reused the caches, with the share its selection asks for (through the engine).
    assert methods["naive"]["recomputed_share"] == 0.0 == methods["naive_in_context"]["recomputed_share"]
    assert 0.0 < methods["kvweave"]["recomputed_share"] < 0.5
    assert methods["cacheblend"]["recomputed_share"] > methods["cacheblend_same_share"]["recomputed_share"] > 0
    assert config["question_offset"] == 0 and not config["questions_held_out"]
    assert by_name["ttft_with_cache_build"].extra["standalone_cache_build_ms"] > 0
    # Compute: reuse does a fraction of full prefill; prefix caching skips only the instruction.
    g = {m: methods[m]["prefill_gflops"] for m in METHODS}
    assert g["naive"] < g["kvweave"] < g["prefix_caching"] < g["full"]
    assert g["kvweave_in_context"] == g["kvweave"] and g["naive_in_context"] == g["naive"]
    assert g["cacheblend"] > g["chunk_start"]  # its layer-0/1 pass over every reused token
    assert by_name["prefill_compute_vs_full"].ratio > 1
    assert config["questions"] == 1 and config["docs"] == 2
    assert by_name["answer_f1"].extra["questions"] == 2  # the second question ran its answers only
    assert by_name["ttft_vs_full_prefill"].value > 0 and by_name["ttft_vs_full_prefill"].baseline_value > 0


def test_metric_helpers():
    import torch

    a = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    assert kl_and_agreement(a, a) == (1.0, 0.0)
    agree, kl = kl_and_agreement(a, torch.tensor([[0.0, 1.0, 2.0], [0.0, 3.0, 1.0]]))
    assert agree == 0.5 and kl > 0
    assert token_f1("The Eiffel tower", ["eiffel tower"]) == 1.0
    assert token_f1("paris france", ["paris"]) == pytest.approx(2 / 3)
    assert token_f1("", ["x"]) == 0.0

    class Args:
        dim, head_dim, n_layers, n_heads, n_kv_heads, hidden_dim = 8, 4, 2, 2, 1, 16
    # Linear work grows with tokens, attention with their positions.
    assert prefill_flops(Args, range(10)) < prefill_flops(Args, range(10, 20)) < 2 * prefill_flops(Args, range(10, 20))
    assert prefill_flops(Args, [5], layers=1) * 2 == prefill_flops(Args, [5])


@pytest.mark.parametrize("argv,message", [
    (["--dataset", "/nonexistent.json"], "not found"),
    (["--questions", "0"], "must be positive"),
])
def test_bad_input(argv, message, tmp_path, capsys):
    if argv[0] == "--questions":
        bad = tmp_path / "d.json"
        bad.write_text("[]")
        argv = argv + ["--dataset", str(bad)]
    assert main(["bench", "rag", *argv]) == 2
    assert message in capsys.readouterr().err


def test_malformed_dataset(tmp_path, capsys):
    bad = tmp_path / "d.json"
    bad.write_text('{"not": "a list"}')
    assert main(["bench", "rag", "--dataset", str(bad)]) == 2
    assert "MuSiQue-format" in capsys.readouterr().err
