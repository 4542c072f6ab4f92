"""`kvweave bench planner --quick` end to end on a tiny model (a real cluster of processes, the
planner of `kvweave serve --planner`): the JSON holds every figure the report names, and its
figures agree with each other and with the timelines they come from. Whether the planner scaled,
and how fast ITL recovered, is the benchmark's finding on the machine that runs it, not asserted.
It runs with a prefill pool (`--prefill-workers 1`): the cluster and the planner of the default
(no pool) plus the handoff of every prompt, so the decode workers stream every token."""
from __future__ import annotations

import json

import pytest

from cli.main import main


def test_bench_planner_quick_reports_consistent_timelines(tiny_hf_model, tmp_path, capsys):
    out = tmp_path / "planner.json"
    rc = main(["bench", "planner", "--quick", "--model", str(tiny_hf_model), "--num-blocks", "256",
               "--prefill-workers", "1", "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "planner" and doc["environment"]["cpu_model"]
    config, run = doc["config"], doc["config"]["run"]
    results = {r["metric"]: r for r in doc["results"]}
    assert results.keys() == {"itl_recovery_intervals", "itl_p99_after_recovery", "decode_tokens_per_s"}
    assert run["itl_target_ms"] == pytest.approx(config["target_factor"] * run["unloaded_itl_p99_ms"], abs=0.02)
    assert results["itl_recovery_intervals"]["itl_target_ms"] == run["itl_target_ms"]
    for name in ("timeline_a", "timeline_b"):
        rows = run[name]
        assert [r["interval"] for r in rows] == list(range(1, config["step_intervals"] + 1))
        assert sum(sum(r["tokens_by_worker"].values()) for r in rows) > 0
        assert all(1 <= r["replicas_started"] <= config["max_replicas"] for r in rows)
    assert all(r["replicas_started"] == 1 and len(r["tokens_by_worker"]) == 1 for r in run["timeline_a"])

    def recovered(rows):  # the first interval from which every one is under the target
        under = [r["itl_p99_ms"] is not None and r["itl_p99_ms"] <= run["itl_target_ms"] for r in rows]
        return next((i + 1 for i in range(len(under)) if all(under[i:])), None)

    assert run["recovery_intervals"] == {"a": recovered(run["timeline_a"]), "b": recovered(run["timeline_b"])}
    recovery = results["itl_recovery_intervals"]
    assert recovery["recovered"] == (run["recovery_intervals"]["b"] is not None)
    assert recovery["value"] == (run["recovery_intervals"]["b"] or config["step_intervals"])
    assert recovery["baseline_value"] == 2 and recovery["ratio"] == pytest.approx(2 / recovery["value"], abs=1e-3)
    seconds = config["step_intervals"] * config["interval_s"]
    tokens = results["decode_tokens_per_s"]
    for value, rows in ((tokens["value"], run["timeline_b"]), (tokens["baseline_value"], run["timeline_a"])):
        assert value == pytest.approx(sum(sum(r["tokens_by_worker"].values()) for r in rows) / seconds, abs=1e-3)
    events = run["replica_changes_b"]
    assert events[0] == {"t_s": 0.0, "started": 1, "registered": 1}
    assert all(a["t_s"] <= b["t_s"] and (a["started"], a["registered"]) != (b["started"], b["registered"])
               for a, b in zip(events, events[1:]))
    counts = [e["started"] for e in events]
    assert run["flaps"] == max(0, sum(a != b for a, b in zip(counts, counts[1:])) - 1)
    for row in run["timeline_b"]:  # each interval's end shows the last change before it
        end = row["interval"] * config["interval_s"]
        last = [e for e in events if e["t_s"] <= end][-1]
        assert (row["replicas_started"], row["replicas_registered"]) == (last["started"], last["registered"])
    for name, rows in (("cores_used_a", run["timeline_a"]), ("cores_used_b", run["timeline_b"])):
        served_by = {w for r in rows for w in r["tokens_by_worker"]}  # every worker that served has a figure
        cores = run[name]
        assert {"router", "redis", "bench_process", "machine", "other_processes"} | served_by <= cores.keys()
        assert all(v >= 0 for v in cores.values()) and cores["decode-0"] > 0 and cores["prefill-0"] > 0
        ours = sum(v for k, v in cores.items() if k not in ("machine", "other_processes"))
        assert cores["other_processes"] == pytest.approx(max(0.0, cores["machine"] - ours), abs=0.01)
    assert {d["pool"] for d in run["decisions_b"]} == {"prefill", "decode"}  # the planner sees both pools
    assert all(d["to"] == 1 for d in run["decisions_b"] if d["pool"] == "prefill")  # held at --prefill-workers
    decisions = [d for d in run["decisions_b"] if d["pool"] == "decode"]
    assert decisions and all(1 <= d["to"] <= config["max_replicas"] for d in decisions)
    ups = [d for d in decisions if d["reason"] == "scale_up"]
    assert run["scale_up_at_s"] == (ups[0]["t_s"] if ups else None)
    if max(counts) > 1:  # a second worker was started only by a decision to scale up, and before it registered
        assert ups and ups[0]["t_s"] <= [e["t_s"] for e in events if e["started"] > 1][0]
    if run["added_worker_registered_at_s"] is not None:
        assert [e for e in events if e["registered"] > 1][0]["t_s"] == run["added_worker_registered_at_s"]
    assert "itl_recovery_intervals" in capsys.readouterr().out


def test_context_prompts_share_one_document_and_differ_after_it():
    from benchmarks.mixed_load import vocab_token_range
    from benchmarks.planner import CONTEXT_QUESTION_TOKENS, PROMPT, PlannerBenchConfig, stream_prompts

    assert stream_prompts(PlannerBenchConfig(concurrency=3)) == [{"prompt": PROMPT.format(i=i)} for i in range(3)]
    config = PlannerBenchConfig(concurrency=4, context_tokens=100)
    prompts = [p["token_ids"] for p in stream_prompts(config)]
    lo, hi = vocab_token_range(config.model)
    assert [len(p) for p in prompts] == [100 + CONTEXT_QUESTION_TOKENS] * 4
    assert all(p[:100] == prompts[0][:100] for p in prompts)
    assert len({tuple(p[100:]) for p in prompts}) == 4
    assert all(lo <= t < hi for p in prompts for t in p)
    assert stream_prompts(config) == [{"token_ids": p} for p in prompts]  # the same every run


@pytest.mark.parametrize("argv, message", [
    (["--context-tokens", "-1"], "--idle-intervals, --context-tokens and --prefill-workers >= 0"),
    (["--prefill-workers", "-1"], "--idle-intervals, --context-tokens and --prefill-workers >= 0"),
    (["--context-tokens", "9000"], "exceed the model's context of 8192 tokens"),
    (["--policy", "nearest"], "unknown routing policy 'nearest'; valid: chunk_aware"),
])
def test_bad_settings_are_refused_before_anything_starts(argv, message, capsys):
    assert main(["bench", "planner", *argv]) == 2
    assert message in capsys.readouterr().err
