"""A worker process SIGKILLed under load is restarted by the cluster's supervisor, with its id and
port, and serves again; no request hangs, every failure is a clear error. `kvweave serve` restarts
a killed worker, and exits with 1 once it gives up on a router that keeps dying."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from controlplane.procs import descendants
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


def _children_running(serve_pid: int, subcommand: str) -> list[int]:
    """Live `kvweave <subcommand>` processes below `serve_pid`."""
    found = []
    for pid in descendants(serve_pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if b"cli" in args and subcommand.encode() in args:
            found.append(pid)
    return found


def test_serve_restarts_a_worker_and_gives_up_on_a_crash_looping_router(fault_model):
    cmd = [sys.executable, "-m", "cli", "serve", "--workers", "1", "--model", fault_model, "--port", "0",
           "--http-port", "0", "--lease-s", "2", "--restart-backoff-s", "0.2", "--max-restarts", "1",
           "--dtype", "float32", "--num-blocks", "64", "--num-threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out = ""
        while not out.startswith("  logs"):
            out = proc.stdout.readline()
            assert out or proc.poll() is None, proc.stderr.read()
        (worker,) = _children_running(proc.pid, "worker")
        os.kill(worker, signal.SIGKILL)
        wait_until("a new worker process", lambda: _children_running(proc.pid, "worker") not in ([], [worker]), 30)
        (router,) = _children_running(proc.pid, "router")
        os.kill(router, signal.SIGKILL)  # restarted once (--max-restarts 1) ...
        wait_until("a new router process", lambda: _children_running(proc.pid, "router") not in ([], [router]), 30)
        (router,) = _children_running(proc.pid, "router")
        os.kill(router, signal.SIGKILL)  # ... and given up on when it dies again within --restart-stable-s
        assert proc.wait(timeout=60) == 1
        assert "error: the router is down" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
