"""`kvweave planner` (controlplane/planner_main.py): bad flags are refused with a message and a
non-zero exit; `--once` runs the real command as a process against a real Redis registry (fake
worker registrations with real metrics endpoints, tests/controlplane/test_planner_observer.py) and
the thin scale-API server of tests/controlplane/test_planner_connectors.py, reached through a
kubeconfig as a user outside the cluster would."""
from __future__ import annotations

import asyncio
import sys

import pytest
import redis.asyncio as aioredis

from cli.main import main
from controlplane.planner_main import PlannerConfig
from kvweave.registry import Registry
from tests.controlplane.test_planner_connectors import FakeScaleAPI
from tests.controlplane.test_planner_observer import FakeWorker

KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "%s"}}]
users: [{name: u, user: {token: planner-token}}]
contexts: [{name: x, context: {cluster: c, user: u, namespace: llm}}]
current-context: x
"""


@pytest.mark.parametrize("argv, message", [
    (["--connector", "kubernetes"], "the kubernetes connector needs --prefill-deployment or --decode-deployment"),
    (["--decode-deployment", "d", "--min-replicas", "5", "--max-replicas", "2"],
     "need 0 <= min-replicas <= max-replicas and max-replicas >= 1, got 5 and 2"),
    (["--decode-deployment", "d", "--max-replicas", "4", "--prefill-min-replicas", "5"],
     "prefill pool: need 0 <= min-replicas <= max-replicas and max-replicas >= 1, got 5 and 4"),
    (["--decode-deployment", "d", "--itl-target-ms", "0"], "itl-target-ms must be > 0, got 0.0"),
    (["--decode-deployment", "d", "--quantile", "1.5"], "quantile must be in (0, 1), got 1.5"),
    (["--decode-deployment", "d", "--hysteresis", "1"], "hysteresis must be in [0, 1), got 1.0"),
    (["--decode-deployment", "d", "--window", "0"], "window >= 1"),
    (["--connector", "local"], "the local connector needs --model"),
    (["--connector", "ray"], "the ray connector needs --model"),
    (["--connector", "ray", "--model", "m", "--gpus-per-worker", "-1"], "gpus-per-worker must be >= 0"),
    (["--connector", "ray", "--model", "m", "--ray-address", "127.0.0.1:1"],
     "cannot connect to Ray at 127.0.0.1:1: nothing listens there"),
    (["--decode-deployment", "d", "--kubeconfig", "/nonexistent/kubeconfig"], "no Kubernetes configuration"),
])
def test_bad_settings_are_refused_with_a_message(argv, message, capsys):
    assert main(["planner", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--connector", "ray-cluster"], "argument --connector: invalid choice: 'ray-cluster'"),
    (["--decode-deployment", "d", "--min-replicas", "two"], "argument --min-replicas: invalid int value: 'two'"),
    (["--decode-deployment", "d", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_malformed_flags_exit_non_zero(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["planner", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_the_config_holds_what_the_flags_say():
    config = PlannerConfig(prefill_deployment="p", decode_deployment="d", min_replicas=0, max_replicas=3)
    assert config.deployments == {"prefill": "p", "decode": "d"}
    assert {r: (p.min_replicas, p.max_replicas) for r, p in config.policies().items()} == {
        "prefill": (0, 3), "decode": (0, 3)}
    config = PlannerConfig(decode_deployment="d", max_replicas=4, prefill_min_replicas=2, prefill_max_replicas=2,
                           decode_max_replicas=6)
    assert {r: (p.min_replicas, p.max_replicas) for r, p in config.policies().items()} == {
        "prefill": (2, 2), "decode": (1, 6)}


async def run_planner(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "cli", "--log-level", "INFO", "planner", *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.asyncio
@pytest.mark.parametrize("dry_run", [False, True])
async def test_once_scales_a_loaded_decode_pool_through_the_scale_subresource(redis_url, tmp_path, dry_run):
    client = aioredis.Redis.from_url(redis_url)
    registry = Registry(client, lease_s=120, key=None)
    decode = await FakeWorker(registry, "decode-0", "decode").start()
    prefill = await FakeWorker(registry, "prefill-0", "prefill").start()
    try:
        await decode.publish(num_running=70)  # 70 running against a first estimate of 32 per worker
        await prefill.publish(num_queued_prefill_tokens=10)
        with FakeScaleAPI({("llm", "kv-decode"): 1, ("llm", "kv-prefill"): 1}) as api:
            kubeconfig = tmp_path / "kubeconfig"
            kubeconfig.write_text(KUBECONFIG % api.url)
            rc, out, err = await run_planner(
                "--kubeconfig", str(kubeconfig), "--namespace", "llm", "--prefill-deployment", "kv-prefill",
                "--decode-deployment", "kv-decode", "--redis-url", redis_url, "--interval-s", "0.2",
                "--decode-running", "32", "--once", *(["--dry-run"] if dry_run else []))
        assert rc == 0, err
        assert "prefill: 1 -> 1 (steady;" in out
        assert "decode: 1 -> 3 (scale_up; load 70.0, predicted 70.0, capacity/replica 32.0" in out
        patches = [(path, body) for method, path, _, body in api.requests if method == "PATCH"]
        if dry_run:
            assert patches == [] and api.replicas[("llm", "kv-decode")] == 1 and "[dry run]" in err
        else:
            assert patches == [("/apis/apps/v1/namespaces/llm/deployments/kv-decode/scale", {"spec": {"replicas": 3}})]
    finally:
        for w in (decode, prefill):
            await w.stop()
        await client.aclose()


def test_every_planner_metric_is_documented_and_records_a_decision():
    from pathlib import Path

    from prometheus_client import generate_latest

    from controlplane.planner import Decision
    from controlplane.planner_main import PlannerMetrics

    metrics = PlannerMetrics()
    metrics.record(Decision("decode", 1, 3, "scale_up", "", predicted_load=70.0, correction_factor=1.5))
    text = generate_latest(metrics.registry).decode()
    assert 'kvweave_planner_decisions_total{pool="decode",reason="scale_up"} 1.0' in text
    assert 'kvweave_planner_decisions_total{pool="prefill",reason="steady"} 0.0' in text
    assert 'kvweave_planner_target_replicas{pool="decode"} 3.0' in text
    assert 'kvweave_planner_correction_factor{pool="decode"} 1.5' in text
    documented = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    names = {f.name + ("_total" if f.type == "counter" else "") for f in metrics.registry.collect()}
    assert names and all(f"`{name}`" in documented for name in names), names
