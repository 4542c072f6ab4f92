"""The fault-injection suite's harness: a real-process cluster (LocalCluster: redis-server, the router
and worker processes on a tiny model) driven by the load generator (loadgen's Runner with a real
gRPC or OpenAI backend), while a fault runs beside the load in a thread.

`drive(cluster, fault=..., ...)` returns exact counts (`LoadCounts`): every request sent either
succeeded, failed with a clear error (an error kind and a message from the server or the client
library, e.g. unavailable, overloaded, http_429, connection) or hung (no complete reply within the
request timeout, or still in flight when the run ended). The invariant every case asserts is
`sent == succeeded + failed` with `hung == 0`.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import pytest

from controlplane.cluster import LocalCluster
from controlplane.procs import pid_alive
from loadgen.backends import SendOptions, make_backend
from loadgen.records import RequestRecord
from loadgen.runner import RunConfig, Runner
from loadgen.workloads.synthetic import RandomWorkload

ENGINE = {"dtype": "float32", "num_blocks": 256, "block_size": 16, "num_threads": 1, "max_num_seqs": 16}
"""Every worker's engine: the tiny model on one CPU thread."""
TOKEN_RANGE = (7, 500)
"""Prompt token ids within the tiny model's vocabulary (512)."""
HUNG_KINDS = frozenset({"timeout", "cancelled"})
"""Error kinds of requests that got no answer: no reply within the timeout, or cut off at the end."""


@dataclass
class LoadCounts:
    sent: int
    succeeded: int
    failed: int
    """Failed with a clear error (a kind other than the hung ones, and a message)."""
    hung: int
    failed_kinds: Counter = field(default_factory=Counter)
    records: list[RequestRecord] = field(default_factory=list)

    def summary(self) -> str:
        return (f"sent {self.sent}, succeeded {self.succeeded}, failed {self.failed} "
                f"{dict(self.failed_kinds)}, hung {self.hung}")


def count(records: list[RequestRecord]) -> LoadCounts:
    """Exact counts of a run's records (see the module docstring)."""
    ok = [r for r in records if r.ok]
    hung = [r for r in records if not r.ok and (r.error in HUNG_KINDS or not r.message)]
    failed = [r for r in records if not r.ok and r not in hung]
    return LoadCounts(len(records), len(ok), len(failed), len(hung), Counter(r.error for r in failed), records)


def drive(cluster: LocalCluster, *, backend: str = "grpc", **load) -> LoadCounts:
    """`drive_each` through one backend."""
    return drive_each(cluster, (backend,), **load)[backend]


def drive_each(cluster: LocalCluster, backends: Sequence[str], *, fault: Callable[[], None] | None = None,
               duration: float = 10.0, request_rate: float = 8.0, max_concurrency: int = 16, input_len: int = 48,
               output_len: int = 8, request_timeout: float = 30.0, seed: int = 0) -> dict[str, LoadCounts]:
    """Send a random workload for `duration` seconds (Poisson at `request_rate`; math.inf: a closed
    loop of `max_concurrency` users), split evenly over `backends` ("grpc", "openai") sending at the
    same time, while `fault()` runs in a thread; wait for the fault and every request; return each
    backend's counts. A request gets `request_timeout` seconds: past that it counts as hung."""
    n = len(backends)
    errors: list[BaseException] = []

    def run_fault() -> None:
        try:
            fault()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(e)

    async def send(i: int, backend: str) -> list[RequestRecord]:
        url = cluster.grpc_target if backend == "grpc" else cluster.http_url
        workload = RandomWorkload(input_len=input_len, output_len=output_len, token_range=TOKEN_RANGE, seed=seed + i)
        config = RunConfig(request_rate=request_rate / n, max_concurrency=max(1, max_concurrency // n),
                           num_requests=None, duration=duration, seed=seed + i, progress=False)
        client = make_backend(backend, url, options=SendOptions(request_timeout=request_timeout))
        try:
            await client.connect()
            result = await Runner(workload, client, config, log=lambda _: None).run()
        finally:
            await client.close()
        return result.records

    async def main() -> list[list[RequestRecord]]:
        return await asyncio.gather(*(send(i, b) for i, b in enumerate(backends)))

    thread = threading.Thread(target=run_fault, name="fault") if fault is not None else None
    if thread is not None:
        thread.start()
    try:
        records = asyncio.run(main())
    finally:
        if thread is not None:
            thread.join(120)
    if errors:
        raise errors[0]
    return {b: count(r) for b, r in zip(backends, records)}


def wait_until(what: str, condition: Callable[[], bool], timeout: float, step: float = 0.05) -> float:
    """Poll `condition` until it holds; returns the seconds it took; fails the test after `timeout`."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what}: not within {timeout:.0f} s")
        time.sleep(step)
    return time.monotonic() - start


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux /proc); 0 when it is gone."""
    if not pid_alive(pid):
        return 0
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.fixture(scope="module")
def fault_model(tiny_model_variant) -> str:
    return str(tiny_model_variant("gqa"))


@pytest.fixture
def fault_cluster(fault_model) -> Iterator[Callable[..., LocalCluster]]:
    """`start(**options)` -> a started LocalCluster of the tiny model (2 workers, a 2 s lease,
    restarts after 0.5 s unless the options say otherwise); stopped at the end of the test."""
    clusters: list[LocalCluster] = []

    def start(**options) -> LocalCluster:
        settings = {"workers": 2, "model": fault_model, "engine_args": ENGINE, "lease_s": 2.0,
                    "startup_timeout": 120, "restart_backoff_s": 0.5} | options
        cluster = LocalCluster(**settings)
        clusters.append(cluster)
        return cluster.start()

    yield start
    for cluster in clusters:
        cluster.stop()
