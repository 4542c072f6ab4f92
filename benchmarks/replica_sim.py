"""Router replicas in the trace replay (benchmarks/mooncake_sim.py's cache model): several
`kvweave router` processes over one KV index, as a load balancer in front of them would use them.

Request i goes to replica i % n. Every replica reads the same exact index (the shared Redis), but
each has its own policy instance (its own tie rotation and churn memory, as separate processes
have) and its own view of the workers' load: the load as published at its last sync, at most
`sync_ms` ago, plus the requests it placed itself since (kvweave's routers add up each other's
in-flight counts through Redis every 0.1 s: controlplane/replica_load.py). One replica with an
exact view is the baseline.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from benchmarks.cluster_sim import ClusterModel, SimConfig, SimResult
from benchmarks.mooncake_sim import sim_requests
from controlplane.policies import Policy, RouteRequest
from kvstore.keys import BlockHash
from loadgen.traces import MooncakeRecord

REPLICA_SYNC_MS = 100.0
"""How stale a replica's view of the other replicas' placements is at most (RouterConfig.load_sync_s)."""


class _View:
    __slots__ = ("at", "running", "prefill", "own_running", "own_prefill")

    def __init__(self, num_workers: int) -> None:
        self.at = float("-inf")
        self.running, self.prefill = [0] * num_workers, [0] * num_workers
        self.own_running, self.own_prefill = [0] * num_workers, [0] * num_workers


def simulate_replicas(requests: Sequence[MooncakeRecord], make_policy: Callable[[], Policy], num_replicas: int,
                      cfg: SimConfig = SimConfig(), hashes: Sequence[Sequence[BlockHash]] | None = None,
                      sync_ms: float = REPLICA_SYNC_MS) -> SimResult:
    """Route every request with `num_replicas` replicas (see the module's docstring)."""
    model = ClusterModel(cfg)
    policies = [make_policy() for _ in range(num_replicas)]
    views = [_View(cfg.num_workers) for _ in range(num_replicas)]
    index_of = {wid: i for i, wid in enumerate(model.ids)}
    result = SimResult(f"{policies[0].name} x{num_replicas} replicas", 0, 0, [0] * cfg.num_workers)
    for i, req in enumerate(sim_requests(requests, hashes)):
        now_ms = req.timestamp_s * 1000.0
        found = model.outcomes(now_ms, req)
        states = model.states(found)
        replica = i % num_replicas
        if num_replicas > 1:
            view = views[replica]
            if now_ms - view.at >= sync_ms:
                view.at, view.running, view.prefill = now_ms, list(model.load.num_running), \
                    list(model.load.num_prefill_tokens)
                view.own_running, view.own_prefill = [0] * cfg.num_workers, [0] * cfg.num_workers
            for w, state in enumerate(states):
                state.num_running = view.running[w] + view.own_running[w]
                state.num_queued_prefill_tokens = view.prefill[w] + view.own_prefill[w]
        decision = policies[replica].pick(RouteRequest(req.input_length, req.chain, req_id=str(i)), states)
        w = index_of[decision.worker_id]
        uncached = model.credit(req, found[w], result)
        result.best_hit_blocks += max(len(x.codes) for x in found)
        result.prompt_blocks += len(req.chain)
        result.prompt_tokens += req.input_length
        result.requests_per_worker[w] += 1
        if num_replicas > 1:
            views[replica].own_running[w] += 1
            views[replica].own_prefill[w] += uncached
        model.place(now_ms, w, req, uncached)
    result.num_requests = len(requests)
    return result
