"""A worker process SIGKILLed under load is restarted by the cluster's supervisor, with its id and
port, and serves again; no request hangs, every failure is a clear error."""
from __future__ import annotations

import os
import signal
import time

from tests.faults.conftest import drive, wait_until


def test_killed_worker_is_restarted_and_serves_again(fault_cluster):
    cluster = fault_cluster()
    victim = cluster.worker_ids[0]
    old = cluster.workers.procs[0]
    address = cluster.worker_addresses[victim]

    def fault() -> None:
        time.sleep(2.0)
        os.killpg(old.pid, signal.SIGKILL)

    during = drive(cluster, fault=fault, duration=8.0, output_len=32)
    print(f"\nworker killed: {during.summary()}")
    assert during.hung == 0, during.summary()
    assert during.sent == during.succeeded + during.failed, during.summary()
    assert during.succeeded > 0

    wait_until("the worker restarted", lambda: cluster.restarts[victim] == 1, 30)
    new = cluster.workers.procs[0]
    assert new.pid != old.pid and new.poll() is None
    assert cluster.worker_addresses[victim] == address  # same id, same port: the router's channel reconnects
    # the restarted worker serves again: within its quarantine and registration, it takes requests
    served_by = set()

    def restarted_served() -> bool:
        after = drive(cluster, duration=1.0, request_rate=8.0)
        assert after.sent == after.succeeded, after.summary()
        served_by.update(r.worker_id for r in after.records)
        return victim in served_by

    wait_until("the restarted worker served a request", restarted_served, 60, step=0.5)
    assert cluster.restarts == {"redis": 0, "router": 0, victim: 1, cluster.worker_ids[1]: 0}
