"""The attacker of issue 14 against a real cluster (Redis, a worker and the router as processes,
secure by default: `LocalCluster` makes a cluster secret and a Redis password).

This test process plays a local attacker: it reaches every port, but holds neither the cluster
secret nor the Redis password (the cluster's files are private to the cluster; the test reads them
only for the positive controls that show each refused call works with the credential). It cannot
read Redis, call a worker's Generate or KVTransfer, or fetch a block over the TCP data plane; a
registry entry it writes (given write access to Redis) never receives a request; and the block
hashes in the index are not the unkeyed chain it could compute from a guessed prompt.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import redis
import torch

import kvweave
from controlplane.cluster import LocalCluster, run_sync
from kvstore.codec import KVLayout
from kvstore.index import index_key
from kvstore.keys import encode_extra_keys, hash_blocks
from kvstore.tcp_client import KVDataClient
from kvstore.tcp_wire import CHALLENGE, encode_request
from kvstore.transfer_source import TransferError
from kvweave import cluster_secret
from kvweave.model_files import load_tokenizer
from kvweave.registry import WORKERS_SET, WorkerInfo, worker_key
from kvweave.v1 import kvtransfer_pb2, kvtransfer_pb2_grpc, worker_pb2, worker_pb2_grpc

PROMPT = "The confidential launch code of project falcon is 4417 and the backup code is 9021, said Ada."
ENGINE_ARGS = {"dtype": "float32", "num_blocks": 64, "num_threads": 1}


@pytest.fixture(scope="module")
def cluster(tiny_hf_model):
    c = LocalCluster(workers=1, model=str(tiny_hf_model), engine_args=ENGINE_ARGS, lease_s=2.0,
                     policy="round_robin", startup_timeout=120)
    c.start()
    with kvweave.Client(c.grpc_target, timeout=60) as client:  # a victim's request: its blocks get cached
        client.complete(PROMPT, max_tokens=2, ignore_eos=True)
    deadline = time.monotonic() + 30
    while not cached_hashes(c) and time.monotonic() < deadline:  # published within ~0.1 s
        time.sleep(0.1)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def secret(cluster) -> cluster_secret.ClusterSecret:
    return cluster_secret.load_secret(cluster.security_env[cluster_secret.SECRET_ENV])


def worker_address(cluster) -> str:
    (address,) = cluster.worker_addresses.values()
    return address


def cached_hashes(cluster) -> list[bytes]:
    """The victim's blocks in the index (read with the password: the positive control)."""
    (worker_id,) = cluster.worker_ids
    client = redis.Redis.from_url(cluster.redis_url)
    try:
        return list(client.hgetall(index_key(worker_id, "device")))
    finally:
        client.close()


def layout(tiny_hf_model: Path) -> KVLayout:
    cfg = json.loads((tiny_hf_model / "config.json").read_text())
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    return KVLayout(torch.float32, (2, cfg["num_hidden_layers"], cfg["num_key_value_heads"], 16, head_dim))


async def call_with(address: str, token: str | None, call):
    metadata = ((cluster_secret.TOKEN_METADATA_KEY, token),) if token else None
    async with grpc.aio.insecure_channel(address) as channel:
        return await call(channel, metadata)


def test_no_secret_or_password_on_any_command_line(cluster, secret) -> None:
    password = Path(cluster.security_env[cluster_secret.REDIS_PASSWORD_ENV]).read_text()
    for pid in cluster.pids():
        argv = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert secret.key not in argv and password.encode() not in argv
    folder = Path(cluster.security_env[cluster_secret.SECRET_ENV]).parent
    assert folder.stat().st_mode & 0o077 == 0


def test_redis_refuses_a_client_without_the_password(cluster) -> None:
    public = cluster_secret.redact(cluster.redis_url).replace(":***@", "@").replace("//@", "//")
    client = redis.Redis.from_url(public)
    try:
        with pytest.raises(redis.exceptions.AuthenticationError):
            client.keys("*")
        with pytest.raises(redis.exceptions.AuthenticationError):
            client.hgetall(index_key(cluster.worker_ids[0], "device"))
    finally:
        client.close()
    assert cached_hashes(cluster)  # with the password: the victim's blocks are there


def test_worker_generate_needs_the_cluster_credential(cluster, secret) -> None:
    request = worker_pb2.WorkerGenerateRequest(request_id="attacker", prompt_token_ids=[5, 6, 7, 8])
    request.sampling.max_tokens = 2

    async def generate(channel, metadata):
        return [m async for m in worker_pb2_grpc.WorkerStub(channel).Generate(request, metadata=metadata, timeout=30)]

    wrong_last = "1" if secret.grpc_token.endswith("0") else "0"  # one character off, never the real token
    for token in (None, "0" * 64, secret.grpc_token[:-1] + wrong_last):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            run_sync(call_with(worker_address(cluster), token, generate))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert run_sync(call_with(worker_address(cluster), secret.grpc_token, generate))  # the router's way


def test_kv_transfer_service_needs_the_cluster_credential(cluster, secret) -> None:
    keys = cached_hashes(cluster)

    async def data_port(channel, metadata):
        return await kvtransfer_pb2_grpc.KVTransferStub(channel).DataPort(kvtransfer_pb2.DataPortRequest(),
                                                                        metadata=metadata, timeout=10)

    async def fetch(channel, metadata):
        request = kvtransfer_pb2.FetchRequest(keys=keys)
        return [m async for m in kvtransfer_pb2_grpc.KVTransferStub(channel).Fetch(request, metadata=metadata,
                                                                                  timeout=10)]

    for call in (data_port, fetch):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            run_sync(call_with(worker_address(cluster), None, call))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert run_sync(call_with(worker_address(cluster), secret.grpc_token, data_port)).port > 0


def test_tcp_data_plane_serves_no_block_without_the_handshake(cluster, secret, tiny_hf_model) -> None:
    keys = cached_hashes(cluster)
    assert keys

    async def port(channel, metadata):
        return (await kvtransfer_pb2_grpc.KVTransferStub(channel).DataPort(kvtransfer_pb2.DataPortRequest(),
                                                                         metadata=metadata, timeout=10)).port

    host = worker_address(cluster).rsplit(":", 1)[0]
    data_address = f"{host}:{run_sync(call_with(worker_address(cluster), secret.grpc_token, port))}"
    kv_layout = layout(tiny_hf_model)
    # The 36-byte request of the attack, sent straight away: the server closes the
    # connection (a reset: our request lies unread) after its challenge, without one byte of KV.
    received = b""
    with socket.create_connection((host, int(data_address.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(encode_request(keys, kv_layout))
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    assert len(received) <= CHALLENGE.size and b"KVWR" not in received

    async def fetch(key: bytes | None):
        client = KVDataClient(key=key)
        try:
            return await client.fetch_kv(data_address, keys, kv_layout, timeout_s=10)
        finally:
            await client.close()

    for key in (None, b"\x00" * 32):
        with pytest.raises(TransferError):
            run_sync(fetch(key))
    assert run_sync(fetch(secret.derive("kv-data-plane"))).shape[0] > 0  # with the secret: served


class _FakeWorker(grpc.GenericRpcHandler):
    """What an attacker's process serves: it counts every call that reaches it."""

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def service(self, handler_call_details):
        with self._lock:
            self.calls += 1
        return None


def test_forged_registry_entry_never_receives_a_request(cluster) -> None:
    fake = _FakeWorker()
    server = grpc.server(ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers([fake])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    client = redis.Redis.from_url(cluster.redis_url)  # an attacker who can write into Redis
    try:
        model = cluster_model_name(cluster)
        for worker_id, signature in (("evil-0", ""), ("evil-1", "ab" * 32 + "\n")):
            info = WorkerInfo(worker_id=worker_id, address=f"127.0.0.1:{port}", model=model)
            client.set(worker_key(worker_id), signature + info.to_json(), px=60_000)
            client.sadd(WORKERS_SET, worker_id)
        served_by = set()
        with kvweave.Client(cluster.grpc_target, timeout=60) as api:
            for i in range(6):  # round robin over every worker it accepted
                served_by.add(api.complete(f"request {i}", max_tokens=2, ignore_eos=True).worker_id)
        assert served_by == set(cluster.worker_ids)
        assert fake.calls == 0
    finally:
        client.delete(worker_key("evil-0"), worker_key("evil-1"))
        client.srem(WORKERS_SET, "evil-0", "evil-1")
        client.close()
        server.stop(0)


def cluster_model_name(cluster) -> str:
    client = redis.Redis.from_url(cluster.redis_url)
    try:
        value = client.get(worker_key(cluster.worker_ids[0]))
    finally:
        client.close()
    return WorkerInfo.from_json(value.split(b"\n", 1)[1]).model


def test_block_hashes_are_keyed_with_the_cluster_secret(cluster, secret, tiny_hf_model) -> None:
    tok = load_tokenizer(str(tiny_hf_model))
    token_ids = tok.tokenizer.encode(PROMPT, add_special_tokens=True)
    held = set(cached_hashes(cluster))
    unkeyed = hash_blocks(token_ids, 16, encode_extra_keys((tok.name, "")))
    keyed = hash_blocks(token_ids, 16, encode_extra_keys((tok.name, ""), secret.derive("kv-hash")))
    assert len(keyed) >= 2 and set(keyed) <= held  # the victim's prompt, as the cluster names it
    assert not held & set(unkeyed)  # what an attacker could compute offline names nothing
    assert not set(keyed) & set(unkeyed)


def test_refused_calls_are_counted_in_the_workers_metrics(cluster, secret, tiny_hf_model) -> None:
    """An operator sees the attempts: each refused gRPC call and each failed data-plane handshake."""
    import urllib.request

    (worker_id,) = cluster.worker_ids

    def refused() -> dict[str, float]:
        with urllib.request.urlopen(cluster.metrics_urls[worker_id], timeout=10) as resp:
            text = resp.read().decode()
        return {plane: float(line.rsplit(" ", 1)[1]) for plane in ("grpc", "kv_data") for line in text.splitlines()
                if line.startswith(f'kvweave_worker_unauthenticated_calls_total{{plane="{plane}"}}')}

    before = refused()

    async def data_port(channel, metadata):
        return (await kvtransfer_pb2_grpc.KVTransferStub(channel).DataPort(kvtransfer_pb2.DataPortRequest(),
                                                                         metadata=metadata, timeout=10)).port

    with pytest.raises(grpc.aio.AioRpcError):
        run_sync(call_with(worker_address(cluster), None, data_port))
    host = worker_address(cluster).rsplit(":", 1)[0]
    data_address = f"{host}:{run_sync(call_with(worker_address(cluster), secret.grpc_token, data_port))}"

    async def fetch():
        client = KVDataClient(key=b"\x00" * 32)
        try:
            return await client.fetch_kv(data_address, cached_hashes(cluster), layout(tiny_hf_model), timeout_s=10)
        finally:
            await client.close()

    with pytest.raises(TransferError):
        run_sync(fetch())
    deadline = time.monotonic() + 10  # the server counts the handshake once it has read the bad answer
    while (after := refused())["kv_data"] == before["kv_data"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert after["grpc"] - before["grpc"] == 1
    assert after["kv_data"] - before["kv_data"] == 1
