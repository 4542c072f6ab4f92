"""`kvweave serve --planner` (controlplane/serve_planner.py): the SLA planner in the serving process,
scaling the embedded cluster's own pools with real `kvweave worker` processes on a tiny model.

The planner's bounds make its first decisions certain whatever the load (none here): with min and
max replicas 2, a prefill pool of 1 gets a second worker and a decode pool of 3 loses its newest.
A worker the planner adds is supervised like the first ones; one it stops is not restarted."""
from __future__ import annotations

import asyncio
import time
import urllib.request

import pytest
import redis.asyncio as aioredis

from cli.main import build_parser, main
from cli.serve import config_from_args, planner_config
from controlplane.cluster import LocalCluster
from controlplane.serve_planner import ServePlanner, serve_planner_config
from kvweave.registry import Registry

ENGINE_ARGS = {"dtype": "float32", "num_blocks": 64, "num_threads": 1}


async def registered_roles(redis_url: str) -> dict[str, str]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        return {w.worker_id: w.role for w in await Registry(client).list_workers()}
    finally:
        await client.aclose()


def test_the_planner_adds_and_stops_the_clusters_own_workers(tiny_hf_model) -> None:
    cluster = LocalCluster(workers=0, prefill_workers=1, decode_workers=3, model=str(tiny_hf_model),
                           engine_args=ENGINE_ARGS, insecure=True, startup_timeout=240)
    cluster.start()
    planner = None
    try:
        first = cluster.worker_roles
        assert first == {"prefill-0": "prefill", "decode-0": "decode", "decode-1": "decode", "decode-2": "decode"}
        planner = ServePlanner(cluster, serve_planner_config(cluster.config, min_replicas=2, max_replicas=2,
                                                             interval_s=0.5)).start()
        expected = {"prefill-0": "prefill", "prefill-1": "prefill", "decode-0": "decode", "decode-1": "decode"}
        deadline = time.monotonic() + 180
        while asyncio.run(registered_roles(cluster.redis_url)) != expected:
            assert time.monotonic() < deadline, (cluster.worker_roles, cluster.workers.logs())
            time.sleep(0.3)
        assert cluster.worker_roles == expected
        # Its decisions are on its own metrics port, as `kvweave planner` serves them.
        with urllib.request.urlopen(planner.metrics_url, timeout=10) as resp:
            text = resp.read().decode()
        assert 'kvweave_planner_decisions_total{pool="prefill",reason="bounds"}' in text, text
        decisions = {(d.role, d.current_replicas, d.target_replicas, d.reason) for _, d in planner.loop.decisions}
        assert {("prefill", 1, 2, "bounds"), ("decode", 3, 2, "bounds")} <= decisions
        assert not [d for _, d in planner.loop.decisions if d.changed and d.reason != "bounds"]
        # the added worker is supervised, the stopped one is not (it would be restarted otherwise)
        assert sorted(cluster.supervisor.supervised) == sorted(["redis", "router", *expected])
        assert cluster.check() is None and len(cluster.workers.procs) == 4
    finally:
        if planner is not None:
            planner.stop()
        cluster.stop()


def test_serve_planner_flags_are_the_planners() -> None:
    args = build_parser("all").parse_args(["serve", "--decode-workers", "1", "--planner", "--min-replicas", "2",
                                           "--itl-target-ms", "80", "--interval-s", "0.5", "--correction", "false",
                                           "--min-gain", "0.3"])
    config = planner_config(args, config_from_args(args))
    assert (config.connector, config.model, config.min_replicas, config.itl_target_ms, config.interval_s,
            config.correction, config.min_gain, config.metrics_port) == ("local", args.model, 2, 80.0, 0.5, False,
                                                                          0.3, 0)
    assert config.params().min_gain == 0.3
    args = build_parser("all").parse_args(["serve", "--prefill-workers", "1", "--decode-workers", "1", "--planner",
                                           "--max-replicas", "4", "--prefill-min-replicas", "1",
                                           "--prefill-max-replicas", "1"])
    policies = planner_config(args, config_from_args(args)).policies()
    assert {r: (p.min_replicas, p.max_replicas) for r, p in policies.items()} == {"prefill": (1, 1), "decode": (1, 4)}
    args = build_parser("all").parse_args(["serve", "--decode-workers", "1", "--planner", "--planner-metrics-port", "-1"])
    assert planner_config(args, config_from_args(args)).metrics_port == -1
    args = build_parser("all").parse_args(["serve", "--decode-workers", "1"])
    assert planner_config(args, config_from_args(args)) is None


@pytest.mark.parametrize("argv, message", [
    ([], "--planner scales the prefill and decode pools: start them with --prefill-workers N"),
    (["--launcher", "ray", "--decode-workers", "1"], "--planner scales local worker processes"),
    (["--decode-workers", "1", "--min-replicas", "3", "--max-replicas", "2"],
     "need 0 <= min-replicas <= max-replicas and max-replicas >= 1, got 3 and 2"),
    (["--decode-workers", "1", "--itl-target-ms", "0"], "itl-target-ms must be > 0"),
    (["--decode-workers", "1", "--min-gain", "2"], "min_gain must be in [0, 1], got 2.0"),
])
def test_bad_planner_settings_are_refused_before_anything_starts(argv, message, capsys) -> None:
    assert main(["serve", "--planner", *argv]) == 2
    assert message in capsys.readouterr().err
