"""`kvweave loadgen` against a real cluster (Redis, two tiny-model workers, a router serving gRPC and
OpenAI HTTP): every workload over both backends through the real CLI entry, with the loadgen's counts
checked against the workload's own lengths and against the router's Prometheus counters; requests
the server rejects are counted by kind; Ctrl-C stops a run cleanly and keeps what it measured."""
from __future__ import annotations

import argparse
import itertools
import json
import signal
import time
from pathlib import Path

import pytest

from cli.main import main
from loadgen_helpers import interrupt_loadgen
from loadgen.workloads import add_workload_arguments, build_workload

TINY = ["--token-range", "10:500"]
"""Token ids within the tiny model's vocabulary (512)."""
STATUSES = ("ok", "invalid", "overloaded", "no_worker", "worker_error", "error", "cancelled")
_runs = itertools.count()


def run_loadgen(tmp_path: Path, *args: str) -> tuple[int, dict]:
    """Run `kvweave loadgen ARGS --json FILE` in-process; (exit code, the JSON result)."""
    out = tmp_path / f"run{next(_runs)}.json"
    rc = main(["loadgen", "--no-progress", "--json", str(out), *args])
    return rc, json.loads(out.read_text())


def counter_deltas(cluster, before: dict, requests: int, timeout: float = 5.0) -> dict:
    """The router's counters minus `before`, once they account for `requests` finished requests."""
    deadline = time.monotonic() + timeout
    while True:
        now = cluster.counters()
        delta = {k: now.get(k, 0.0) - before.get(k, 0.0) for k in now}
        if sum(delta.get(s, 0.0) for s in STATUSES) >= requests or time.monotonic() > deadline:
            return delta
        time.sleep(0.05)


def first_turns(*args: str, n: int) -> list:
    """The first `n` requests (turns) the workload given by `args` makes, as the CLI builds it."""
    parser = argparse.ArgumentParser()
    add_workload_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    sessions = build_workload(parser.parse_args(list(args))).sessions()
    return list(itertools.islice((t for s in sessions for t in s.turns), n))


def target(cluster, backend: str) -> list[str]:
    return ["--backend", backend, "--url", cluster.grpc_target if backend == "grpc" else cluster.http_url]


WORKLOADS = {
    "random": ["--workload", "random", "--input-len", "32", "--output-len", "6", *TINY],
    "prefix-repetition": ["--workload", "prefix-repetition", "--prefix-len", "64", "--suffix-len", "16",
                          "--num-prefixes", "2", "--output-len", "4", *TINY],
    "rag": ["--workload", "rag", "--max-doc-words", "12", "--num-docs", "3", "--output-len", "4"],
    "multi-turn": ["--workload", "multi-turn", "--num-turns", "3", "--turn-input-len", "8", "--output-len", "4"],
    "agent": ["--workload", "agent", "--num-turns", "3", "--turn-input-len", "8", "--tool-output-len", "8",
              "--system-prompt-len", "8", "--tool-pause-mean", "0.01", "--output-len", "4"],
    "mooncake": ["--workload", "mooncake", "--block-size", "16", "--max-input-len", "400", "--max-output-len", "6",
                 "--time-scale", "0.02", *TINY],
    "azure": ["--workload", "azure", "--max-input-len", "400", "--max-output-len", "6", "--time-scale", "0.01", *TINY],
}
CASES = [("random", "grpc"), ("random", "openai"), ("prefix-repetition", "grpc"), ("rag", "openai"),
         ("multi-turn", "grpc"), ("multi-turn", "openai"), ("agent", "grpc"), ("mooncake", "grpc"),
         ("azure", "openai")]


@pytest.mark.parametrize(("workload", "backend"), CASES)
def test_workload_counts_agree_with_the_workload_and_the_router(cluster, tmp_path, workload, backend) -> None:
    n = 9
    args = WORKLOADS[workload]
    before = cluster.counters()
    rc, result = run_loadgen(tmp_path, *target(cluster, backend), "--num-requests", str(n),
                             "--max-concurrency", "4", *args)
    assert rc == 0
    assert (result["completed"], result["failed"], result["errors_by_kind"]) == (n, 0, {})
    turns = first_turns(*args, n=n)
    assert result["total_output_tokens"] == sum(t.max_tokens for t in turns)  # --ignore-eos: lengths as asked
    if turns[0].token_ids is not None:
        assert result["total_input_tokens"] == sum(len(t.token_ids) for t in turns)
    delta = counter_deltas(cluster, before, n)
    assert delta["ok"] == result["completed"]
    assert delta["prompt"] == result["total_input_tokens"]
    assert delta["generation"] == result["total_output_tokens"]
    # Both backends learn the serving worker (the SDK's deltas, the usage's kvweave.worker_id).
    decisions = {k.split(":", 1)[1]: v for k, v in delta.items() if k.startswith("decisions:") and v}
    assert result["requests_by_worker"] == decisions
    assert sum(result["requests_by_worker"].values()) == n
    assert len(result["ttfts"]) == len(result["start_times"]) == n
    assert 0 < result["mean_ttft_ms"] <= result["mean_e2el_ms"]
    assert result["config"]["workload"] == workload and result["backend"] == backend


def test_prefix_reuse_goodput_and_plots(cluster, tmp_path) -> None:
    rc, result = run_loadgen(tmp_path, *target(cluster, "grpc"), "--num-requests", "6", "--max-concurrency", "1",
                             *WORKLOADS["prefix-repetition"], "--seed", "5", "--goodput", "ttft:60000", "e2el:60000",
                             "--plot", str(tmp_path / "plots"), "--label", "prefix run")
    assert rc == 0 and result["label"] == "prefix run"
    assert result["total_cached_tokens"] > 0 and result["prefix_reuse_ratio"] > 0
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])  # generous SLOs: all good
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == \
        ["latency_cdf.png", "throughput.png", "ttft_over_time.png"]


def test_duration_bounds_the_run(cluster, tmp_path) -> None:
    before = cluster.counters()
    t0 = time.monotonic()
    rc, result = run_loadgen(tmp_path, *target(cluster, "openai"), "--duration", "1", "--request-rate", "10",
                             *WORKLOADS["random"])
    assert rc == 0 and time.monotonic() - t0 < 5
    assert 3 <= result["completed"] <= 30 and result["failed"] == 0 and result["num_prompts"] is None
    assert max(result["start_times"]) <= 1.0
    assert counter_deltas(cluster, before, result["completed"])["ok"] == result["completed"]


@pytest.mark.parametrize("backend", ["grpc", "openai"])
def test_rag_reports_chunk_reuse_when_passages_recur(cluster, tmp_path, backend) -> None:
    """Questions share passages at different positions, so later ones reuse earlier chunk-caches."""
    passages = [{"title": f"Doc {i} {backend}", "text": text} for i, text in enumerate([
        "The quick brown fox jumps over the lazy dog near the river bank.",
        "A serving engine should never compute the same key value cache twice.",
        "Retrieved documents and system prompts recur across many requests.",
        "Prefill and decode can run on separate workers in a cluster."])]
    data = [{"question": f"What is item {i}?", "answers": [], "ctxs": [passages[(i + k) % 4] for k in range(3)]}
            for i in range(4)]
    dataset = tmp_path / "rag.json"
    dataset.write_text(json.dumps(data))
    rc, result = run_loadgen(tmp_path, *target(cluster, backend), "--num-requests", "8", "--max-concurrency", "1",
                             "--workload", "rag", "--dataset", str(dataset), "--num-docs", "3", "--output-len", "2")
    assert rc == 0 and result["completed"] == 8
    assert result["total_chunk_reused_tokens"] > 0 and result["chunk_reuse_ratio"] > 0
    assert result["total_recomputed_tokens"] <= result["total_chunk_reused_tokens"]


@pytest.mark.parametrize(("backend", "kind"), [("grpc", "invalid_request"), ("openai", "http_400")])
def test_requests_the_server_rejects_are_counted_by_kind(cluster, tmp_path, capsys, backend, kind) -> None:
    """Prompts of 210..630 tokens against a 512-token context: the long ones are rejected."""
    n = 12
    args = ["--workload", "random", "--input-len", "420", "--range-ratio", "0.5", "--output-len", "2", *TINY]
    too_long = sum(len(t.token_ids) >= 512 for t in first_turns(*args, n=n))
    assert 0 < too_long < n
    before = cluster.counters()
    rc, result = run_loadgen(tmp_path, *target(cluster, backend), "--num-requests", str(n), *args)
    assert rc == 0
    assert result["completed"] == n - too_long
    assert result["failed"] == too_long and result["errors_by_kind"] == {kind: too_long}
    assert sum(bool(e) for e in result["errors"]) == too_long
    delta = counter_deltas(cluster, before, n)
    assert (delta["ok"], delta["invalid"]) == (n - too_long, too_long)
    assert f"{kind}:" in capsys.readouterr().out  # the summary's error lines


def test_ctrl_c_stops_the_run_and_keeps_what_it_measured(cluster, tmp_path) -> None:
    out = tmp_path / "interrupted.json"
    before = cluster.counters()
    args = [*target(cluster, "grpc"), "--request-rate", "20", "--num-requests", "100000", "--json", str(out),
            "--no-progress", *WORKLOADS["random"]]
    rc, stdout, stderr, seconds = interrupt_loadgen(
        args, lambda: counter_deltas(cluster, before, 0).get("ok", 0) >= 3, signal.SIGINT)
    assert seconds < 5
    assert rc == 130, stderr
    assert "Traceback" not in stderr
    result = json.loads(out.read_text())
    assert result["completed"] >= 3 and result["interrupted"] == "SIGINT"
    assert set(result["errors_by_kind"]) <= {"cancelled"}
    assert "Serving Benchmark Result" in stdout
