"""Prefill/decode disaggregation through the router: a prefill worker, decode workers, real gRPC,
real Redis (tests/inprocess_cluster.py). Outputs equal one engine serving each request alone,
greedy and seeded, for every prompt length modulo the block size, with and without prefix hits;
short prompts stay on the decode worker; a prefill worker that fails, a handoff that expired
before the decode worker pulled it, and a decode worker that fails before its first token never
lose the request; every block comes back."""
from __future__ import annotations

import threading
import time

import pytest

from controlplane.router_types import GenerateInput
from kvweave.sampling_params import SamplingParams
from tests.inprocess_cluster import InProcessCluster, pin_kv_costs

BS = 16
ENGINE = {"dtype": "float32", "num_blocks": 256, "block_size": BS, "num_threads": 1, "max_num_batched_tokens": 64}


def _prompt(n: int, salt: int) -> list[int]:
    return [(i * 29 + salt * 13) % 230 + 7 for i in range(n)]


@pytest.fixture(scope="module")
def reference(tiny_model_variant):
    from worker.engine import EngineConfig, LLMEngine

    engine = LLMEngine(EngineConfig(model=str(tiny_model_variant("gqa")), **ENGINE))
    return lambda prompt, params: engine.generate([prompt], params)[0]


ROUTER = {"disagg_threshold_tokens": 16, "disagg_handoff_margin": 1e6}
"""Hand off every prompt over 16 uncached tokens (the tiny model computes faster than its KV moves:
without the margin, every handoff would be "slow")."""


def _start_pd(redis_server, model, prefill: dict | None = None, decode: dict | None = None, decoders: int = 1,
              policy: str = "chunk_aware"):
    """A cluster of prefill worker p0, decode workers d0.. (their WorkerServers' options and engine
    settings in `prefill`, `decode`) and a router; returns (cluster, p0, [d0, ...])."""
    c = InProcessCluster(redis_server.url, model, 0, **ENGINE).start()
    p0 = c.add_worker("p0", role="prefill", **(prefill or {}))
    ds = [c.add_worker(f"d{i}", role="decode", **(decode or {})) for i in range(decoders)]
    c.add_router(policy, router_config=ROUTER)
    return c, p0, ds


@pytest.fixture(scope="module")
def pd(redis_server, tiny_model_variant):
    """1 prefill + 1 decode worker, shared by the module's tests that break nothing."""
    c, _, _ = _start_pd(redis_server, tiny_model_variant("gqa"))
    yield c
    c.stop()


@pytest.fixture
def make_pd(redis_server, tiny_model_variant):
    """`make(**kwargs)` -> `_start_pd(...)` of a fresh cluster, stopped afterwards."""
    made = []

    def make(**kwargs):
        made.append(_start_pd(redis_server, tiny_model_variant("gqa"), **kwargs))
        return made[-1]

    yield make
    for c, _, _ in made:
        c.stop()


def _generate(cluster: InProcessCluster, prompt, params: SamplingParams, router: int = 0):
    async def run():
        deltas = [d async for d in cluster.routers[router].router.generate(GenerateInput(prompt=prompt, params=params))]
        return deltas
    deltas = cluster.run(run())
    return [t for d in deltas for t in d.token_ids], deltas[-1]


def _idle_blocks_back(cluster: InProcessCluster) -> None:
    """Every worker's engine idle, no handoff held, and every KV block free (cached ones included)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        engines = [w.engine.engine for w in cluster.workers if w.engine is not None]
        if all(len(e.handoffs) == 0 and e.block_manager.num_free_blocks == e.block_manager.num_blocks
               and not e.has_unfinished() for e in engines):
            return
        time.sleep(0.05)
    raise AssertionError({w.worker_id: (len(w.engine.engine.handoffs), w.engine.engine.block_manager.num_free_blocks)
                          for w in cluster.workers})


def test_outputs_equal_colocated_for_every_remainder(pd, reference):
    for r in range(BS):
        length = 3 * BS + r
        for i, params in enumerate((SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
                                    SamplingParams(temperature=50.0, top_k=300, seed=r, max_tokens=6,
                                                   ignore_eos=True))):
            prompt = _prompt(length, r + 50 * i)  # uncached: a second request of a prompt would stay local
            tokens, last = _generate(pd, prompt, params)
            assert tokens == reference(prompt, params).token_ids, (length, params)
            assert last.usage.disaggregation == "remote" and last.usage.prefill_worker_id == "p0"
            assert last.worker_id == "d0" and last.usage.completion_tokens == 6
    _idle_blocks_back(pd)


def test_prefix_hits_on_either_side_keep_outputs_equal(pd, reference):
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    head = _prompt(5 * BS, 99)
    first = head + _prompt(37, 1)
    tokens, last = _generate(pd, first, params)
    assert tokens == reference(first, params).token_ids and last.usage.disaggregation == "remote"
    time.sleep(0.5)  # the KV index learns what both workers hold
    second = head + _prompt(45, 2)  # shares 5 blocks with the first on both workers
    tokens, last = _generate(pd, second, params)
    assert tokens == reference(second, params).token_ids
    assert last.usage.disaggregation == "remote" and last.usage.cached_tokens >= 5 * BS
    time.sleep(0.5)
    again, last = _generate(pd, second, params)  # all but 13 tokens cached on the decode worker: stays there
    assert again == tokens and last.usage.disaggregation == "short" and last.usage.prefill_worker_id == ""
    _idle_blocks_back(pd)


def test_short_uncached_prompts_stay_on_the_decode_worker(pd, reference):
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    prompt = _prompt(6, 5)
    tokens, last = _generate(pd, prompt, params)
    assert tokens == reference(prompt, params).token_ids
    assert last.usage.disaggregation == "short" and last.worker_id == "d0"
    metrics = pd.routers[0].router.metrics.exposition().decode()
    assert 'kvweave_router_disagg_decisions_total{reason="short"}' in metrics
    assert 'kvweave_router_handoffs_total{result="handed_off"}' in metrics


def test_handoff_slower_than_recompute_stays_on_the_decode_worker(pd, reference, monkeypatch):
    router = pd.routers[0].router
    margin, router.config.disagg.handoff_margin = router.config.disagg.handoff_margin, 1.0
    try:
        # d0 on a slow network, as it would measure it
        pin_kv_costs(pd.routers[0], monkeypatch, lambda w: {"peer": 1.0, "recompute": 0.5} if w == "d0" else {})
        params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
        prompt = _prompt(90, 77)
        tokens, last = _generate(pd, prompt, params)
        assert tokens == reference(prompt, params).token_ids
        assert last.usage.disaggregation == "slow_handoff" and last.worker_id == "d0"
    finally:
        router.config.disagg.handoff_margin = margin


def test_first_token_that_ends_the_request_is_answered_by_the_prefill_worker(pd, reference):
    params = SamplingParams(temperature=0.0, max_tokens=1)
    prompt = _prompt(40, 200)
    tokens, last = _generate(pd, prompt, params)
    assert tokens == reference(prompt, params).token_ids and last.finish_reason == "length"
    assert last.worker_id == "p0" and last.usage.disaggregation == "remote"
    _idle_blocks_back(pd)


def test_expired_handoff_is_computed_on_the_decode_worker(make_pd, reference):
    c, _, (d0,) = make_pd(prefill={"handoff_ttl_s": 1e-6})  # gone before any decode worker can pull it
    params = SamplingParams(temperature=50.0, top_k=300, seed=5, max_tokens=5, ignore_eos=True)
    prompt = _prompt(75, 3)
    tokens, last = _generate(c, prompt, params)
    assert tokens == reference(prompt, params).token_ids and last.usage.disaggregation == "remote"
    assert d0.prefetcher.stats.handoff_blocks == 0  # nothing pulled: it was all computed there
    _idle_blocks_back(c)


def test_prefill_worker_failure_falls_back_to_colocated(make_pd, reference):
    c, p0, _ = make_pd()
    c.kill_worker(p0)  # crashed: still in the registry until its lease ends
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    prompt = _prompt(70, 4)
    tokens, last = _generate(c, prompt, params)
    assert tokens == reference(prompt, params).token_ids
    assert last.usage.disaggregation == "prefill_failed" and last.worker_id == "d0"
    metrics = c.routers[0].router.metrics.exposition().decode()
    assert 'kvweave_router_handoffs_total{result="prefill_failed"} 1.0' in metrics


def test_decode_worker_failure_before_its_first_token_is_retried_with_the_handoff(make_pd, reference):
    c, _, (d0, d1) = make_pd(decoders=2, policy="round_robin")
    c.kill_worker(d0)
    params = SamplingParams(temperature=50.0, top_k=300, seed=9, max_tokens=5, ignore_eos=True)
    for salt in range(2):  # round robin: one of the two is sent to the dead worker first
        prompt = _prompt(66, 20 + salt)
        tokens, last = _generate(c, prompt, params)
        assert tokens == reference(prompt, params).token_ids
        assert last.worker_id == "d1" and last.usage.disaggregation == "remote"
    metrics = c.routers[0].router.metrics.exposition().decode()
    assert "kvweave_router_retries_total 1.0" in metrics
    assert 'kvweave_router_handoffs_total{result="handed_off"} 2.0' in metrics
    assert d1.prefetcher.stats.handoff_blocks == 2 * 5  # the retry pulled the handoff the dead one never did


def test_decode_worker_pulls_blocks_while_the_prefill_runs(make_pd, reference):
    """The prefill engine pauses (between steps, still answering KV fetches) once 4 blocks are computed,
    until the decode worker has pulled them: the early handle made it pull during the prefill."""

    c, p0, (d0,) = make_pd(prefill={"max_num_batched_tokens": 32})
    engine, paused, resume = p0.engine.engine, threading.Event(), threading.Event()
    step = engine.step

    def pausing_step():
        if paused.is_set() and not resume.is_set():
            time.sleep(0.005)
            return []  # the engine loop goes on draining commands: KV exports are answered
        out = step()
        req = next(iter(engine.scheduler.requests.values()), None)
        if req is not None and req.num_computed_tokens >= 4 * BS and not resume.is_set():
            paused.set()
        return out
    engine.step = pausing_step

    def early_blocks() -> int:
        pulls = list(d0.prefetcher._pulls.values())
        return pulls[0].next - pulls[0].first if pulls else 0

    def unpause() -> None:
        deadline = time.monotonic() + 30
        while early_blocks() < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        resume.set()
    threading.Thread(target=unpause, daemon=True).start()
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    prompt = _prompt(200, 61)
    tokens, last = _generate(c, prompt, params)
    assert tokens == reference(prompt, params).token_ids and last.usage.disaggregation == "remote"
    assert paused.is_set() and d0.prefetcher.stats.handoff_early_blocks >= 4
    assert d0.prefetcher.stats.handoff_blocks == 13
    _idle_blocks_back(c)


@pytest.mark.parametrize("transport", ["grpc", "dist", "ipc"])
def test_handoff_over_each_transport(make_pd, reference, transport):
    """The TCP data plane carries every other test's handoffs; the gRPC stream, the torch.distributed
    pair (gloo) and shared memory (IPC: P and D are processes of one node here) carry them as well."""
    c, _, (d0,) = make_pd(decode={"kv_transport": transport})
    params = SamplingParams(temperature=50.0, top_k=300, seed=2, max_tokens=5, ignore_eos=True)
    prompt = _prompt(99, 71)
    tokens, last = _generate(c, prompt, params)
    assert tokens == reference(prompt, params).token_ids and last.usage.disaggregation == "remote"
    assert d0.prefetcher.stats.handoff_blocks == 7 and d0.prefetcher.client.transport == transport
    _idle_blocks_back(c)


def test_chunk_cache_hits_on_the_prefill_worker_keep_outputs_equal(make_pd, tiny_model_variant):
    """P reuses the chunk-caches of passages it saw in another order (a blend), hands the blended KV
    off, and D's continuation equals one engine serving both requests with the same caches."""
    from worker.engine import EngineConfig, LLMEngine

    c, p0, _ = make_pd(prefill={"dram_cache_gb": 0.05})
    reference = LLMEngine(EngineConfig(model=str(tiny_model_variant("gqa")), dram_cache_gb=0.05, **ENGINE))
    router = c.routers[0].router
    passages = [" ".join(f"fact{k}-{i}" for i in range(12)) for k in range(2)]
    first = GenerateInput(segments=[("Context:", False), (passages[0], True), (passages[1], True), ("Q1?", False)])
    second = GenerateInput(segments=[("Context:", False), (passages[1], True), (passages[0], True), ("Q2?", False)])
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    outputs, want = [], None
    for i, inp in enumerate((first, second)):
        token_ids, spans = router.encode_prompt(inp)
        reference.add_request(token_ids, params, f"ref-{i}", chunk_spans=spans)
        while reference.has_unfinished():  # the request, then the engine's own chunk-cache requests
            want = next((o for o in reference.step() if o.finished and o.req_id == f"ref-{i}"), None) or want
        inp.params = params
        deltas = c.run(_collect(router, inp))
        outputs.append(([t for d in deltas for t in d.token_ids], deltas[-1]))
        assert outputs[-1][0] == want.token_ids
        _wait_idle(c)  # P has stored the new chunks' caches
    _, last = outputs[1]
    assert last.usage.disaggregation == "remote" and last.usage.chunk_reused_tokens == want.num_chunk_reused_tokens > 0


async def _collect(router, inp):
    return [d async for d in router.generate(inp)]


def _wait_idle(cluster: InProcessCluster) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(w.engine.idle for w in cluster.workers):
        time.sleep(0.05)
