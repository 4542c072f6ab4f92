"""Disaggregated serving with real processes (LocalCluster: redis-server, a router, a prefill and a
decode worker process): the prefill worker hangs (SIGSTOP) with requests in flight there, then is
killed (SIGKILL), and no request is lost: those it had not answered are prefilled on the decode
worker; every output equals one engine serving the request alone."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

import kvweave
from controlplane.cluster import LocalCluster
from kvweave.sampling_params import SamplingParams

ENGINE = {"dtype": "float32", "num_blocks": 1024, "block_size": 16, "num_threads": 1, "max_num_batched_tokens": 32}
PROMPTS = [[(i * 31 + 17 * k) % 230 + 7 for i in range(300 + 7 * k)] for k in range(16)]


def test_prefill_worker_killed_mid_run_loses_no_request(tiny_model_variant):
    from worker.engine import EngineConfig, LLMEngine

    model = str(tiny_model_variant("gqa"))
    reference = LLMEngine(EngineConfig(model=model, **ENGINE))
    want = [o.token_ids for o in reference.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=8,
                                                                            ignore_eos=True))]
    with LocalCluster(workers=0, prefill_workers=1, decode_workers=1, model=model, engine_args=ENGINE,
                      router_args={"disagg_threshold_tokens": 16, "disagg_handoff_margin": 1e6}, lease_s=1.0,
                      startup_timeout=120) as cluster:
        prefill = cluster.workers.procs[list(cluster.worker_ids).index("prefill-0")]
        results: dict[int, tuple[list[int], str]] = {}
        errors: list[BaseException] = []

        def run(k: int) -> None:
            try:
                with kvweave.Client(cluster.grpc_target, timeout=120) as client:
                    deltas = list(client.generate(token_ids=PROMPTS[k], max_tokens=8, temperature=0.0,
                                                  ignore_eos=True))
                results[k] = ([t for d in deltas for t in d.token_ids], deltas[-1].usage.disaggregation)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        run(0)  # handed off while the prefill worker is up
        os.killpg(prefill.pid, signal.SIGSTOP)  # it hangs with the next requests in flight there ...
        threads = [threading.Thread(target=run, args=(k,)) for k in range(1, len(PROMPTS))]
        for t in threads:
            t.start()
        time.sleep(1.0)
        os.killpg(prefill.pid, signal.SIGKILL)  # ... and dies
        for t in threads:
            t.join(180)
    assert not errors
    assert [results[k][0] for k in range(len(PROMPTS))] == want
    reasons = [results[k][1] for k in range(len(PROMPTS))]
    assert reasons[0] == "remote"
    assert set(reasons[1:]) <= {"prefill_failed", "no_prefill_worker"} and "prefill_failed" in reasons
