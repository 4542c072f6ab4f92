"""`kvweave bench serve` end to end with no peer on a tiny model (a real cluster driven over its
OpenAI HTTP API), and its option checks."""
from __future__ import annotations

import json

from cli.main import main


def test_bench_serve_without_peer_reports_every_workload(tiny_model_variant, tmp_path, capsys):
    out = tmp_path / "serve.json"
    rc = main(["bench", "serve", "--model", str(tiny_model_variant("gqa")), "--workloads", "random,prefix-repetition",
               "--num-requests", "4", "--output-len", "4", "--warmup-requests", "1", "--stall-timeout-s", "600",
               "--repeats", "2", "--peer-cache-dir", str(tmp_path / "cache"), "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "serve" and doc["results"] == []  # no peer: no ratio
    config = doc["config"]
    assert config["workloads"] == ["random", "prefix-repetition"] and config["peers"] == []
    assert config["stall_timeout_s"] == 600
    assert config["repeats"] == 2
    for workload in ("random", "prefix-repetition"):
        combined = config["runs"][workload]["kvweave"]
        assert (combined["completed"], combined["failed"]) == (8, 0)  # both runs' requests
        assert len(combined["per_run"]) == 2
        for figures in combined["per_run"]:
            assert (figures["completed"], figures["failed"]) == (4, 0)
            assert figures["total_output_tokens"] == 4 * 4  # ignore_eos: every request gave --output-len tokens
            assert figures["output_throughput"] > 0 and figures["duration"] > 0
            assert abs(figures["output_throughput"] - figures["total_output_tokens"] / figures["duration"]) < 1e-6
            assert 0 < figures["mean_ttft_ms"] <= figures["duration"] * 1000
            assert figures["mean_tpot_ms"] > 0 and figures["median_tpot_ms"] > 0 and figures["mean_itl_ms"] > 0
        rates = sorted(f["output_throughput"] for f in combined["per_run"])
        assert combined["output_throughput"] == sum(rates) / 2  # the median of two
    assert config["cpus"] and config["max_model_len"] == 512
    assert (tmp_path / "cache" / "logs").is_dir()  # the cluster's logs are kept
    assert doc["environment"]["cpu_model"] and doc["environment"]["cpus"] >= 1
    printed = capsys.readouterr()
    assert "benchmark: serve" in printed.out and "kvweave random (run 2):" in printed.err


def test_bench_serve_refuses_an_unknown_peer_before_starting_anything(tmp_path, capsys):
    rc = main(["bench", "serve", "--peer", "vllm,sglang", "--peer-cache-dir", str(tmp_path)])
    assert rc == 2
    assert capsys.readouterr().err.strip() == "error: unknown --peer 'sglang'; valid: vllm, llama.cpp"
    assert not any(tmp_path.iterdir())


def test_bench_serve_refuses_bad_options(tmp_path, capsys):
    for argv, message in ((["--workloads", "random,nope"], "unknown --workloads 'nope'"),
                          (["--num-requests", "0"], "--num-requests, --workers and --repeats must be >= 1"),
                          (["--repeats", "0"], "--num-requests, --workers and --repeats must be >= 1"),
                          (["--output-len", "0"], "--output-len must be >= 1"),
                          (["--stall-timeout-s", "0"], "--stall-timeout-s and --startup-timeout-s must be > 0")):
        assert main(["bench", "serve", "--peer-cache-dir", str(tmp_path), *argv]) == 2
        assert message in capsys.readouterr().err


def test_a_peer_setup_that_fails_ends_the_command_with_an_error_before_any_server(tmp_path, monkeypatch, capsys):
    from dataclasses import replace

    from benchmarks import peers

    unreachable = replace(peers.PEERS["vllm"], requirements=("--no-index", "kvweave-no-such-package-xyz"))
    monkeypatch.setitem(peers.PEERS, "vllm", unreachable)  # pip cannot find it: a real failed install, offline
    rc = main(["bench", "serve", "--peer", "vllm", "--peer-cache-dir", str(tmp_path)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "error: setting up vllm failed at `-m pip install` (exit 1); see " in err and "Traceback" not in err
    assert not (tmp_path / "logs").exists()  # no server was started


def test_text_prompts_send_token_id_prompts_as_their_text(tiny_model_variant):
    from itertools import islice

    from benchmarks.serve import ServeBenchConfig, TextPrompts, build_workload
    from kvweave.model_files import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_variant("gqa"))).tokenizer
    config = ServeBenchConfig(output_len=3)
    ids = [s.turns[0] for s in islice(build_workload("random", config, (5, 60)).sessions(), 3)]
    texts = [s.turns[0] for s in islice(TextPrompts(build_workload("random", config, (5, 60)), tokenizer).sessions(), 3)]
    assert all(t.token_ids is None and t.max_tokens == 3 for t in texts)
    assert [t.prompt for t in texts] == [tokenizer.decode(t.token_ids, skip_special_tokens=False) for t in ids]
    assert len({t.prompt for t in texts}) == 3 and all(t.prompt for t in texts)


def test_repeated_runs_are_paired_run_by_run():
    """With repeats, each ratio is reported on the medians and as the median of run i's ratios (run i
    sent the same requests to both servers)."""
    from benchmarks.peers import PEERS
    from benchmarks.serve import KVWEAVE, combine, ratios

    def figures(rate, tpot):
        return {"completed": 4, "failed": 0, "duration": 1.0, "output_throughput": rate, "mean_tpot_ms": tpot,
                "median_tpot_ms": tpot, "mean_ttft_ms": 10.0, "median_ttft_ms": 10.0, "mean_itl_ms": tpot,
                "total_input_tokens": 40, "total_output_tokens": 16, "errors_by_kind": {"timeout": 1}}

    ours = combine([figures(100, 50), figures(300, 40), figures(200, 45)])
    theirs = combine([figures(50, 100), figures(310, 40), figures(190, 44)])
    assert ours["output_throughput"] == 200 and ours["mean_tpot_ms"] == 45
    assert ours["completed"] == 12 and ours["errors_by_kind"] == {"timeout": 3} and len(ours["per_run"]) == 3
    assert combine([figures(7, 8)]) == figures(7, 8)  # one run: its figures as they are
    results = {r.metric: r for r in ratios({KVWEAVE: {"random": ours}, "vllm": {"random": theirs}},
                                           [PEERS["vllm"]], ["random"])}
    tput, tpot = results["throughput_vs_vllm_cpu/random"], results["tpot_vs_vllm_cpu/random"]
    assert round(tput.ratio, 3) == round(200 / 190, 3)
    assert tput.extra["runs"] == [100, 300, 200] and tput.extra["baseline_runs"] == [50, 310, 190]
    assert tput.extra["paired_ratio_median"] == round(200 / 190, 3)  # of 2.0, 0.968, 1.053
    assert tpot.extra["paired_ratio_median"] == 1.0  # of 2.0, 1.0, 0.978 (peer / kvweave: lower is better)
    assert round(tpot.ratio, 3) == round(44 / 45, 3)
