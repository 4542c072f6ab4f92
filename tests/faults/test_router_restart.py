"""The router process SIGKILLed under load: clients see clear errors (gRPC UNAVAILABLE through the
SDK, connection errors over HTTP), none hangs; the cluster's supervisor restarts the router on its
ports and it serves again (the workers never noticed)."""
from __future__ import annotations

import os
import signal
import time

from tests.faults.conftest import drive_each, wait_until

CLEAR_KINDS = {"grpc": {"unavailable"}, "openai": {"connection", "client_error", "stream_broken"}}
"""Error kinds each backend reports for a router that is gone or went away mid-request."""


def test_router_killed_and_restarted(fault_cluster):
    # gRPC and OpenAI clients at once, half the load each: both see the same outage.
    cluster = fault_cluster(restart_backoff_s=2.0)  # down for 2 s: requests arrive while it is gone
    old = cluster.router

    def fault() -> None:
        time.sleep(2.0)
        os.killpg(old.pid, signal.SIGKILL)
        wait_until("the supervisor restarted the router", lambda: cluster.restarts["router"] == 1, 30, step=0.01)

    for backend, during in drive_each(cluster, tuple(CLEAR_KINDS), fault=fault, duration=8.0, output_len=32,
                                      request_timeout=20.0).items():
        print(f"\nrouter killed ({backend}): {during.summary()}")
        assert during.hung == 0, during.summary()
        assert during.sent == during.succeeded + during.failed, during.summary()
        assert during.failed > 0 and set(during.failed_kinds) <= CLEAR_KINDS[backend], during.summary()
    assert cluster.router.pid != old.pid

    wait_until("the restarted router is ready", cluster.router_ready, 60)
    for backend, after in drive_each(cluster, tuple(CLEAR_KINDS), duration=2.0).items():
        print(f"after the restart ({backend}): {after.summary()}")
        assert after.sent > 0 and after.succeeded == after.sent, after.summary()
    assert cluster.restarts["router"] == 1 and cluster.check() is None
