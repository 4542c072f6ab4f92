"""Redis killed under load (SIGKILL of the embedded redis-server), then restarted EMPTY by the
cluster's supervisor by itself: the router keeps routing over the workers it knows (counted as
degraded), the workers keep serving, no request hangs and every failure is a clear error; the
registry and every worker's KV-index entries are rebuilt within two leases of Redis coming back."""
from __future__ import annotations

import os
import signal
import time
import urllib.request

import pytest
import redis

from kvweave.registry import WORKERS_SET, worker_key
from tests.faults.conftest import drive, drive_each, wait_until

LEASE_S = 2.0
OUTAGE_S = 3.0
"""The supervisor's first restart delay: how long Redis stays down."""


def _rebuilt(client: redis.Redis, worker_ids: list[str]) -> bool:
    """Every worker is registered again and has republished its device-tier KV entries."""
    try:
        registered = {m.decode() for m in client.smembers(WORKERS_SET)}
        return all(w in registered and client.exists(worker_key(w)) and client.hlen(f"kvweave:kv:{w}:device") > 0
                   for w in worker_ids)
    except redis.RedisError:
        return False


def _degraded(cluster, reason: str) -> float:
    with urllib.request.urlopen(f"{cluster.http_url}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(f'kvweave_router_degraded_total{{reason="{reason}"}}'):
                return float(line.split()[-1])
    return -1.0


def test_redis_killed_and_restarted_by_the_supervisor(fault_cluster):
    # gRPC and OpenAI clients at once, half the load each: both see the same outage.
    cluster = fault_cluster(lease_s=LEASE_S, restart_backoff_s=OUTAGE_S)
    workers = cluster.worker_ids
    client = redis.Redis.from_url(cluster.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
    rebuild_s: list[float] = []

    def fault() -> None:
        time.sleep(2.5)
        assert _rebuilt(client, workers)  # the workers published what they cached so far
        old = cluster.redis.proc
        os.killpg(old.pid, signal.SIGKILL)
        wait_until("the supervisor restarted Redis", lambda: cluster.restarts["redis"] == 1, 30, step=0.01)
        assert cluster.redis.proc.pid != old.pid
        rebuild_s.append(wait_until("registry and index rebuilt", lambda: _rebuilt(client, workers),
                                    2 * LEASE_S, step=0.02))

    try:
        by_backend = drive_each(cluster, ("grpc", "openai"), fault=fault, duration=10.0, output_len=64,
                                request_timeout=20.0)
    finally:
        client.close()
    for backend, counts in by_backend.items():
        print(f"\nredis killed ({backend}): {counts.summary()}; rebuilt {rebuild_s[0]:.2f} s after the restart")
        assert counts.hung == 0, counts.summary()
        assert counts.sent == counts.succeeded + counts.failed, counts.summary()
        assert counts.succeeded >= counts.sent - 2, counts.summary()  # the workers kept serving
    assert _degraded(cluster, "registry") > 0
    assert cluster.check() is None


def test_redis_hung_holds_no_request(fault_cluster):
    """Redis stops answering without dropping its connections (SIGSTOP) for 5 s, then resumes: every
    Redis call on a request's path times out (2 s) instead of holding it, so every request still
    succeeds, none hangs; the router counts its failed refreshes as degraded."""
    cluster = fault_cluster(lease_s=LEASE_S)

    def fault() -> None:
        time.sleep(2.0)
        os.killpg(cluster.redis.proc.pid, signal.SIGSTOP)
        try:
            time.sleep(5.0)
        finally:
            os.killpg(cluster.redis.proc.pid, signal.SIGCONT)

    counts = drive(cluster, fault=fault, duration=10.0, output_len=16, request_timeout=20.0)
    print(f"\nredis stopped 5 s: {counts.summary()}; latency max {max(r.latency for r in counts.records):.1f} s")
    assert counts.hung == 0, counts.summary()
    assert counts.sent == counts.succeeded + counts.failed, counts.summary()
    assert counts.succeeded == counts.sent, counts.summary()
    assert _degraded(cluster, "registry") > 0
    assert cluster.restarts["redis"] == 0  # stopped is not dead: nothing restarted it
