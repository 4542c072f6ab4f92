"""3x overload for a fixed time: a closed loop of 3x as many users as the router admits (its
`max_inflight`) for 6 s. Every request beyond the limit gets a 429 (RESOURCE_EXHAUSTED over gRPC)
at once; no request fails with a 5xx or hangs; the admitted ones all succeed; and the resident
memory of every process (router, workers, redis-server) grows by less than RSS_BOUND over the
overload (measured after a warm-up run at the same load)."""
from __future__ import annotations

import math

from tests.faults.conftest import drive_each, rss_bytes

MAX_INFLIGHT = 8
RSS_BOUND = 32 << 20
"""Stated bound on the RSS growth of each process across the overload run."""
REFUSED_KINDS = {"grpc": "overloaded", "openai": "http_429"}


def test_overload_gets_429s_no_5xx_and_flat_memory(fault_cluster):
    # OpenAI and gRPC users at once, half of them each.
    cluster = fault_cluster(router_args={"max_inflight": MAX_INFLIGHT}, max_waiting=MAX_INFLIGHT)
    load = dict(request_rate=math.inf, max_concurrency=3 * MAX_INFLIGHT, output_len=16)
    warm = drive_each(cluster, tuple(REFUSED_KINDS), duration=3.0, **load)
    assert all(w.hung == 0 for w in warm.values()), warm
    before = {pid: rss_bytes(pid) for pid in cluster.pids()}
    by_backend = drive_each(cluster, tuple(REFUSED_KINDS), duration=6.0, **load)
    growth = {pid: rss_bytes(pid) - rss for pid, rss in before.items()}
    print("\noverload: " + "; ".join(f"{b}: {c.summary()}" for b, c in by_backend.items()) + "; RSS growth MiB: "
          + ", ".join(f"{pid}: {g / 2**20:+.1f}" for pid, g in growth.items()))
    for backend, counts in by_backend.items():
        assert counts.hung == 0, counts.summary()
        assert counts.sent == counts.succeeded + counts.failed, counts.summary()
        assert set(counts.failed_kinds) == {REFUSED_KINDS[backend]}, counts.summary()  # only 429s: no 5xx
        assert counts.succeeded > 0 and counts.failed > 0, counts.summary()
    assert all(g < RSS_BOUND for g in growth.values()), growth
    assert cluster.check() is None
