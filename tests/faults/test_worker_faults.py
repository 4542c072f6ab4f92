"""Worker faults under load, with real processes (LocalCluster: redis-server, a router and two worker
processes on a tiny model), counted exactly: every request sent ends, as a success or a clear error,
and none hangs.

- SIGKILL a worker while requests stream from it: 0 lost. Requests it had not started are retried,
  those it was streaming are migrated (another worker continues from the prompt plus the tokens
  sent), and every greedy output equals one engine serving the request alone.
- SIGSTOP a worker for longer than the stall timeout and the deadline: every request ends within
  the deadline plus a margin (migrated, or DEADLINE_EXCEEDED); after SIGCONT the worker serves
  again (its circuit breaker closes, or it registers anew).
"""
from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request
from dataclasses import dataclass, field

import pytest

import kvweave
from controlplane.cluster import LocalCluster
from kvweave.sampling_params import SamplingParams

ENGINE = {"dtype": "float32", "num_blocks": 1024, "block_size": 16, "num_threads": 1, "max_num_batched_tokens": 64}
PROMPTS = [[(i * 31 + 17 * k) % 230 + 7 for i in range(24 + 3 * k)] for k in range(16)]
MAX_TOKENS = 160
VICTIM = "worker-0"


@dataclass
class Outcome:
    token_ids: list[int] = field(default_factory=list)
    worker_ids: list[str] = field(default_factory=list)
    error: BaseException | None = None
    ended_at: float | None = None


def reference_outputs(model: str) -> list[list[int]]:
    from worker.engine import EngineConfig, LLMEngine

    engine = LLMEngine(EngineConfig(model=model, **ENGINE))
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [o.token_ids for o in engine.generate(PROMPTS, params)]


def start_load(cluster: LocalCluster, timeout: float) -> tuple[list[Outcome], list[threading.Thread]]:
    """One streaming request per prompt, each in its own thread (the SDK without retries)."""
    outcomes = [Outcome() for _ in PROMPTS]

    def run(k: int) -> None:
        out = outcomes[k]
        try:
            with kvweave.Client(cluster.grpc_target, timeout=timeout, max_retries=0) as client:
                for delta in client.generate(token_ids=PROMPTS[k], max_tokens=MAX_TOKENS, temperature=0.0,
                                             ignore_eos=True):
                    out.token_ids += delta.token_ids
                    if delta.token_ids:
                        out.worker_ids.append(delta.worker_id)
        except BaseException as e:  # noqa: BLE001 - counted by the test
            out.error = e
        out.ended_at = time.monotonic()

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(len(PROMPTS))]
    for t in threads:
        t.start()
    return outcomes, threads


def wait_streaming_from(outcomes: list[Outcome], worker_id: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not any(worker_id in o.worker_ids for o in outcomes):
        assert time.monotonic() < end, f"no request streamed from {worker_id}"
        time.sleep(0.01)


def migrated(o: Outcome) -> bool:
    return len(set(o.worker_ids)) > 1


@pytest.mark.parametrize("policy", ["round_robin", "chunk_aware"])
def test_sigkill_a_worker_mid_load_loses_no_request(tiny_model_variant, policy):
    model = str(tiny_model_variant("gqa"))
    want = reference_outputs(model)
    with LocalCluster(workers=2, model=model, engine_args=ENGINE, policy=policy, lease_s=1.0,
                      startup_timeout=120) as cluster:
        victim = cluster.workers.procs[list(cluster.worker_ids).index(VICTIM)]
        outcomes, threads = start_load(cluster, timeout=120)
        wait_streaming_from(outcomes, VICTIM)
        os.killpg(victim.pid, signal.SIGKILL)
        for t in threads:
            t.join(150)
    assert [t.is_alive() for t in threads] == [False] * len(PROMPTS)  # 0 hung
    assert [o.error for o in outcomes] == [None] * len(PROMPTS)  # sent == succeeded
    assert [o.token_ids for o in outcomes] == want
    assert any(migrated(o) for o in outcomes)


@pytest.mark.parametrize("lease_s", [1.0, 30.0], ids=["lease_lapses", "stall_timeout"])
def test_sigstop_a_worker_past_the_deadline_every_request_ends_and_it_serves_again(tiny_model_variant, lease_s):
    """With a short lease the paused worker drops out of the registry (its calls are cancelled);
    with a long one the stall timeout finds it, and its circuit breaker closes after SIGCONT."""
    model = str(tiny_model_variant("gqa"))
    want = reference_outputs(model)
    deadline_s, stall_s, margin_s = 10.0, 4.0, 5.0
    router_args = {"request_timeout_s": deadline_s, "stall_timeout_s": stall_s, "breaker_probe_s": 0.2}
    with LocalCluster(workers=2, model=model, engine_args=ENGINE, policy="round_robin", lease_s=lease_s,
                      router_args=router_args, startup_timeout=120) as cluster:
        victim = cluster.workers.procs[list(cluster.worker_ids).index(VICTIM)]
        start = time.monotonic()
        outcomes, threads = start_load(cluster, timeout=None)  # the router's default deadline applies
        wait_streaming_from(outcomes, VICTIM)
        os.killpg(victim.pid, signal.SIGSTOP)
        try:
            for t in threads:
                t.join(max(0.0, start + deadline_s + margin_s - time.monotonic()))
            hung = [t.is_alive() for t in threads]
        finally:
            time.sleep(max(0.0, start + deadline_s + 1.0 - time.monotonic()))  # paused past the deadline
            os.killpg(victim.pid, signal.SIGCONT)
        served_by = wait_served_by(cluster, VICTIM)
        breaker = breaker_transitions(cluster)
    assert hung == [False] * len(PROMPTS)
    assert all(o.ended_at - start <= deadline_s + margin_s for o in outcomes)
    failed = [o for o in outcomes if o.error is not None]
    # A clear error: a typed one with the router's message (a deadline, or on a loaded machine the
    # other worker stalling too), never an unexpected exception.
    assert all(isinstance(o.error, kvweave.KVWeaveError) and str(o.error) for o in failed), \
        [repr(o.error) for o in failed]
    succeeded = [k for k, o in enumerate(outcomes) if o.error is None]
    assert len(succeeded) + len(failed) == len(PROMPTS)
    assert [outcomes[k].token_ids for k in succeeded] == [want[k] for k in succeeded]
    assert any(migrated(outcomes[k]) for k in succeeded)
    assert served_by == VICTIM
    if lease_s > deadline_s:  # the worker never left the registry: the breaker opened and closed
        assert breaker == {"open": 1, "closed": 1}


def breaker_transitions(cluster: LocalCluster) -> dict[str, int]:
    text = urllib.request.urlopen(cluster.http_url + "/metrics", timeout=10).read().decode()
    prefix = "kvweave_router_breaker_transitions_total{state=\""
    return {line[len(prefix):].split('"')[0]: int(float(line.split()[-1]))
            for line in text.splitlines() if line.startswith(prefix)}


def wait_served_by(cluster: LocalCluster, worker_id: str, timeout: float = 30.0) -> str:
    """Send short requests (round robin) until `worker_id` answers one; returns who answered last."""
    end, last = time.monotonic() + timeout, ""
    with kvweave.Client(cluster.grpc_target, timeout=10, max_retries=0) as client:
        while time.monotonic() < end and last != worker_id:
            last = client.complete(token_ids=PROMPTS[0], max_tokens=2, temperature=0.0).worker_id
            time.sleep(0.1)
    return last


def test_sigstop_the_prefill_worker_past_the_stall_timeout_requests_are_prefilled_on_the_decode_worker(
        tiny_model_variant):
    """A prefill worker that hangs (its lease still live) is found by the stall timeout: the requests
    it held are prefilled on the decode worker instead, with the same greedy outputs."""
    model = str(tiny_model_variant("gqa"))
    want = reference_outputs(model)
    router_args = {"stall_timeout_s": 4.0, "disagg_threshold_tokens": 16, "disagg_handoff_margin": 1e6}
    with LocalCluster(workers=0, prefill_workers=1, decode_workers=1, model=model, engine_args=ENGINE,
                      lease_s=30.0, router_args=router_args, startup_timeout=120) as cluster:
        prefill = cluster.workers.procs[list(cluster.worker_ids).index("prefill-0")]
        os.killpg(prefill.pid, signal.SIGSTOP)
        try:
            outcomes, threads = start_load(cluster, timeout=60)
            for t in threads:
                t.join(90)
        finally:
            os.killpg(prefill.pid, signal.SIGCONT)
        breaker = breaker_transitions(cluster)
    assert [t.is_alive() for t in threads] == [False] * len(PROMPTS)
    assert [o.error for o in outcomes] == [None] * len(PROMPTS)
    assert [o.token_ids for o in outcomes] == want
    assert breaker["open"] == 1
