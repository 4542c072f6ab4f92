"""`kvweave bench serve` end to end with no peer on a tiny model (a real cluster driven over its
OpenAI HTTP API), and its option checks."""
from __future__ import annotations

import json

from cli.main import main


def test_bench_serve_without_peer_reports_every_workload(tiny_model_variant, tmp_path, capsys):
    out = tmp_path / "serve.json"
    rc = main(["bench", "serve", "--model", str(tiny_model_variant("gqa")), "--workloads", "random,prefix-repetition",
               "--num-requests", "4", "--output-len", "4", "--warmup-requests", "1", "--stall-timeout-s", "600",
               "--peer-cache-dir", str(tmp_path / "cache"), "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "serve" and doc["results"] == []  # no peer: no ratio
    config = doc["config"]
    assert config["workloads"] == ["random", "prefix-repetition"] and config["peers"] == []
    assert config["stall_timeout_s"] == 600
    for workload in ("random", "prefix-repetition"):
        figures = config["runs"][workload]["kvweave"]
        assert (figures["completed"], figures["failed"]) == (4, 0)
        assert figures["total_output_tokens"] == 4 * 4  # ignore_eos: every request gave --output-len tokens
        assert figures["output_throughput"] > 0 and figures["duration"] > 0
        assert abs(figures["output_throughput"] - figures["total_output_tokens"] / figures["duration"]) < 1e-6
        assert 0 < figures["mean_ttft_ms"] <= figures["duration"] * 1000
        assert figures["mean_tpot_ms"] > 0 and figures["median_tpot_ms"] > 0 and figures["mean_itl_ms"] > 0
    assert config["cpus"] and config["max_model_len"] == 512
    assert (tmp_path / "cache" / "logs").is_dir()  # the cluster's logs are kept
    assert doc["environment"]["cpu_model"] and doc["environment"]["cpus"] >= 1
    printed = capsys.readouterr()
    assert "benchmark: serve" in printed.out and "kvweave random:" in printed.err


def test_bench_serve_refuses_an_unknown_peer_before_starting_anything(tmp_path, capsys):
    rc = main(["bench", "serve", "--peer", "vllm,sglang", "--peer-cache-dir", str(tmp_path)])
    assert rc == 2
    assert capsys.readouterr().err.strip() == "error: unknown --peer 'sglang'; valid: vllm, llama.cpp"
    assert not any(tmp_path.iterdir())


def test_bench_serve_refuses_bad_options(tmp_path, capsys):
    for argv, message in ((["--workloads", "random,nope"], "unknown --workloads 'nope'"),
                          (["--num-requests", "0"], "--num-requests and --workers must be >= 1"),
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
