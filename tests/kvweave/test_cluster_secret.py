"""The cluster secret: loading, sub-keys, Redis URLs, the gRPC credential on a real server, signed
registry entries on a real Redis, keyed hashes and the router's bounded salt cache."""
from __future__ import annotations

import os
import stat

import grpc
import pytest
import redis.asyncio as aioredis
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from kvstore.keys import ExtraKeysCache, chunk_hash, encode_extra_keys, hash_blocks
from kvweave import cluster_secret
from kvweave.cluster_secret import ClusterSecret, SecretError
from kvweave.registry import WORKERS_SET, Registry, WorkerInfo, worker_key


def test_new_cluster_files_are_private_and_load(tmp_path) -> None:
    env = cluster_secret.new_cluster_files(tmp_path / "s")
    assert stat.S_IMODE(os.stat(tmp_path / "s").st_mode) == 0o700
    for path in env.values():
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    secret = cluster_secret.load_secret(env[cluster_secret.SECRET_ENV])
    assert len(secret.key) == 64 and "hidden" in repr(secret) and secret.key.decode() not in repr(secret)
    labels = ("grpc-token", "kv-data-plane", "registry", "kv-hash", "ssd-mac")
    assert len({secret.derive(label) for label in labels}) == len(labels)


def test_bad_secret_files_are_clear_errors(tmp_path) -> None:
    short = tmp_path / "short"
    short.write_text("abc")
    with pytest.raises(SecretError, match="16 to 4096 bytes, has 3"):
        cluster_secret.load_secret(str(short))
    with pytest.raises(SecretError, match="cannot read"):
        cluster_secret.load_secret(str(tmp_path / "missing"))


def test_redis_url_gets_the_password_in_memory_and_redact_hides_it(tmp_path, monkeypatch) -> None:
    (tmp_path / "pw").write_text("p@ss/word\n")
    monkeypatch.setenv(cluster_secret.REDIS_PASSWORD_ENV, str(tmp_path / "pw"))
    url = cluster_secret.redis_url("redis://127.0.0.1:6379/0")
    assert url == "redis://:p%40ss%2Fword@127.0.0.1:6379/0"
    assert cluster_secret.redact(url) == "redis://:***@127.0.0.1:6379/0"
    assert cluster_secret.redis_url("redis://:own@h:1/0") == "redis://:own@h:1/0"


@pytest.mark.asyncio
async def test_the_grpc_credential_is_required_and_health_stays_open() -> None:
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    secret = ClusterSecret(b"k" * 32)
    (interceptor,) = cluster_secret.server_interceptors(secret)
    server = grpc.aio.server(interceptors=[interceptor])
    reflection.enable_server_reflection([reflection.SERVICE_NAME], server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()

    async def list_services(channel) -> list[str]:
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for reply in reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([request])):
            return [s.name for s in reply.list_services_response.service]

    try:
        async with cluster_secret.insecure_channel(address, secret=secret) as channel:
            assert await list_services(channel) == [reflection.SERVICE_NAME]  # stream-stream, with the token
        for other in (None, ClusterSecret(b"x" * 32)):
            interceptors = cluster_secret.client_interceptors(other) if other else None
            async with grpc.aio.insecure_channel(address, interceptors=interceptors) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await list_services(channel)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert interceptor.num_refused == 2
    finally:
        await server.stop(None)


@pytest.mark.asyncio
async def test_registry_ignores_entries_without_a_valid_signature(redis_url) -> None:
    key = ClusterSecret(b"r" * 32).derive("registry")
    client = aioredis.Redis.from_url(redis_url)
    try:
        registry = Registry(client, key=key)
        await registry.heartbeat(WorkerInfo("good", "127.0.0.1:1", "m"))
        forged = {"plain": WorkerInfo("plain", "127.0.0.1:2", "m").to_json(),
                  "badsig": "00" * 32 + "\n" + WorkerInfo("badsig", "127.0.0.1:3", "m").to_json(),
                  "garbage": "not json at all"}
        other_key = Registry(client, key=ClusterSecret(b"o" * 32).derive("registry"))
        await other_key.heartbeat(WorkerInfo("othercluster", "127.0.0.1:4", "m"))
        stolen = await client.get(worker_key("good"))  # a valid entry copied under another id
        for worker_id, value in [*forged.items(), ("copy", stolen)]:
            await client.set(worker_key(worker_id), value)
            await client.sadd(WORKERS_SET, worker_id)
        assert [w.worker_id for w in await registry.list_workers()] == ["good"]
        assert registry.num_rejected == 5
        open_reader = Registry(client, key=None)  # no secret in this process: signatures are not checked
        assert "good" in {w.worker_id for w in await open_reader.list_workers()}
    finally:
        await client.aclose()


def test_the_salt_keys_every_block_and_chunk_hash() -> None:
    tokens = list(range(64))
    plain, salted = encode_extra_keys(("m", "t")), encode_extra_keys(("m", "t"), b"\x01" * 32)
    assert plain == b"m\x1ft" and salted != plain
    assert not set(hash_blocks(tokens, 16, plain)) & set(hash_blocks(tokens, 16, salted))
    assert chunk_hash(tokens, plain) != chunk_hash(tokens, salted)
    other = encode_extra_keys(("m", "t"), b"\x02" * 32)
    assert not set(hash_blocks(tokens, 16, salted)) & set(hash_blocks(tokens, 16, other))


def test_extra_keys_cache_is_a_bounded_lru() -> None:
    cache = ExtraKeysCache("m", b"salt", max_entries=3)
    for tenant in ("a", "b", "c"):
        assert cache.get(tenant) == encode_extra_keys(("m", tenant), b"salt")
    cache.get("a")  # most recent now
    cache.get("d")  # evicts b
    assert len(cache) == 3 and set(cache._entries) == {"a", "c", "d"}
    for i in range(1000):
        cache.get(f"tenant-{i}")
    assert len(cache) == 3


@pytest.mark.parametrize("command", ["router", "worker"])
def test_an_unreadable_secret_file_is_a_clear_cli_error(command, tmp_path) -> None:
    import subprocess
    import sys

    short = tmp_path / "secret"
    short.write_text("too short")
    for path, message in ((tmp_path / "missing", "cannot read the cluster secret file"),
                          (short, "must hold 16 to 4096 bytes, has 9")):
        proc = subprocess.run([sys.executable, "-m", "cli", command, "--cluster-secret-file", str(path),
                               "--redis-url", "redis://127.0.0.1:1/0"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
        assert "too short" not in proc.stderr  # never what the file holds


def test_local_cluster_children_get_the_files_not_the_secret(tmp_path) -> None:
    from controlplane.cluster import LocalCluster

    secure = LocalCluster(workers=1, model="m")
    secure._make_security_files()
    try:
        env = secure._env()
        secret_file = env[cluster_secret.SECRET_ENV]
        assert stat.S_IMODE(os.stat(secret_file).st_mode) == 0o600
        assert open(secret_file).read() not in " ".join(env.values())
        assert cluster_secret.REDIS_PASSWORD_ENV in env
    finally:
        secure.stop()
    assert not os.path.exists(secret_file)  # removed with the cluster
    insecure = LocalCluster(workers=1, model="m", insecure=True)
    insecure._make_security_files()
    assert cluster_secret.SECRET_ENV not in insecure._env()
