"""Routing and peer fetch in a cluster with a secret (in process: router and workers read the same
secret file): the router's keyed hash chain agrees with the workers', so cache-aware routing still
follows the cache, workers fetch each other's blocks over the authenticated data plane, and the
index holds the keyed hashes, none of the unkeyed chain."""
from __future__ import annotations

import os
import time

import grpc
import pytest

from kvstore.index import KVIndex
from kvstore.keys import encode_extra_keys, hash_blocks
from kvweave import cluster_secret
from kvweave.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from tests.inprocess_cluster import InProcessCluster


@pytest.fixture(scope="module")
def secret_env(tmp_path_factory):
    env = cluster_secret.new_cluster_files(tmp_path_factory.mktemp("secret") / "files")
    saved = os.environ.get(cluster_secret.SECRET_ENV)
    os.environ[cluster_secret.SECRET_ENV] = env[cluster_secret.SECRET_ENV]
    yield cluster_secret.load_secret(env[cluster_secret.SECRET_ENV])
    if saved is None:
        del os.environ[cluster_secret.SECRET_ENV]
    else:
        os.environ[cluster_secret.SECRET_ENV] = saved


@pytest.fixture(scope="module")
def cluster(secret_env, redis_server, tiny_model_variant):
    c = InProcessCluster(redis_server.url, tiny_model_variant("gqa")).start()
    yield c
    c.stop()


def prompt_ids(seed: int, n: int) -> list[int]:
    return [(seed * 7919 + i * 104729) % 190 + 5 for i in range(n)]


def generate(router, token_ids: list[int]) -> inference_pb2.GenerateResponse:
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(router.grpc_address))
    request = inference_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=token_ids),
                                            sampling=common_pb2.SamplingParams(max_tokens=2, temperature=0.0,
                                                                               ignore_eos=True))
    return list(stub.Generate(request, timeout=60))[-1]


def wait_indexed(cluster, router, hashes, worker_id: str) -> None:
    deadline = time.monotonic() + 10
    while not all(cluster.run(KVIndex(router.router.redis).lookup(hashes, [worker_id]))[(worker_id, "device")]):
        assert time.monotonic() < deadline, "blocks not indexed in time"
        time.sleep(0.05)


def test_prefix_aware_routing_follows_the_keyed_cache(cluster, secret_env):
    router = cluster.add_router("prefix_aware", traffic_weight=0.0)  # the holder's cache alone decides
    model = router.router.model.name
    prefix = prompt_ids(2, 160)  # 10 full blocks
    holder = generate(router, prefix + [7, 8, 9]).worker_id
    keyed = hash_blocks(prefix, 16, encode_extra_keys((model, ""), secret_env.derive("kv-hash")))
    wait_indexed(cluster, router, keyed, holder)
    for i in range(3):
        last = generate(router, prefix + prompt_ids(100 + i, 20))
        assert last.worker_id == holder and last.usage.cached_tokens >= 160
    unkeyed = hash_blocks(prefix, 16, encode_extra_keys((model, "")))
    found = cluster.run(KVIndex(router.router.redis).lookup(unkeyed, [holder]))
    assert not any(found[(holder, "device")])


def test_workers_fetch_each_others_blocks_over_the_authenticated_data_plane(cluster, secret_env):
    router = cluster.add_router("round_robin")
    model = router.router.model.name
    prefix = prompt_ids(3, 160)
    first = generate(router, prefix + [9])
    keyed = hash_blocks(prefix, 16, encode_extra_keys((model, ""), secret_env.derive("kv-hash")))
    wait_indexed(cluster, router, keyed, first.worker_id)
    second = generate(router, prefix + [10])
    assert second.worker_id != first.worker_id
    assert second.usage.cached_tokens >= 160  # fetched from the first worker, not recomputed
