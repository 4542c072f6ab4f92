"""The worker server with a real Redis: health, reflection, registration, KV index publishing,
lapsed leases, and the real `python -m cli worker` process (ready line, SIGKILL, SIGTERM,
bad flags)."""
from __future__ import annotations

import asyncio
import select
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import redis
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cli.main import main as kvweave_main
from controlplane.procs import child_env, free_port
from kvweave.registry import Registry, worker_key
from kvstore.index import KVIndex, index_key
from kvstore.keys import encode_extra_keys, hash_blocks
from kvweave.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from worker.server import WorkerOptions, WorkerServer

REPO = Path(__file__).resolve().parents[2]
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
PROMPT = list(range(3, 53))  # 50 tokens: 3 full blocks of 16
SAMPLING = common_pb2.SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def _request(namespace: str = "") -> worker_pb2.WorkerGenerateRequest:
    return worker_pb2.WorkerGenerateRequest(prompt_token_ids=PROMPT, sampling=SAMPLING, cache_namespace=namespace)


async def _eventually(check, timeout: float = 5.0):
    """Poll an async `check` until it returns something truthy; returns it (or the last value)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.02)


async def _reflected_services(channel) -> set[str]:
    call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    response = await call.read()
    await call.done_writing()
    return {s.name for s in response.list_services_response.service}


@pytest.mark.asyncio
async def test_serves_registers_publishes_and_leaves(redis_url, tiny_engine_factory):
    engine = tiny_engine_factory()
    options = WorkerOptions(worker_id="w-1", redis_url=redis_url, lease_s=2.0, heartbeat_s=0.2, grace_s=1.0)
    server = WorkerServer(engine.config, options, engine=engine)
    await server.start()
    client = aioredis.Redis.from_url(redis_url)
    registry, index = Registry(client), KVIndex(client)
    hashes = hash_blocks(PROMPT, 16, encode_extra_keys((engine.model_name, "tenant-a")))
    other_tenant = hash_blocks(PROMPT, 16, encode_extra_keys((engine.model_name, "tenant-b")))

    async def all_indexed():
        return all((await index.lookup(hashes, ["w-1"]))[("w-1", "device")])

    try:
        (info,) = await registry.list_workers()
        assert (info.worker_id, info.address, info.model, info.role) == \
            ("w-1", server.address, engine.model_name, "colocated")
        assert (info.block_size, info.max_model_len, info.max_num_seqs) == (16, 512, 128)
        assert (info.load.num_kv_blocks_total, info.load.num_running) == (256, 0)
        async with grpc.aio.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "kvweave.v1.Worker"):
                assert (await health.Check(health_pb2.HealthCheckRequest(service=service))).status == SERVING
            assert {"kvweave.v1.Worker", "grpc.health.v1.Health"} <= await _reflected_services(channel)
            messages = [m async for m in worker_pb2_grpc.WorkerStub(channel).Generate(_request("tenant-a"))]
            assert messages[-1].finished and len(hashes) == 3
            assert await _eventually(all_indexed, timeout=1.0)
            assert not any((await index.lookup(other_tenant, ["w-1"]))[("w-1", "device")])

            # A lapsed lease (entry and index gone): the next heartbeat re-registers with a snapshot.
            await client.delete(worker_key("w-1"), index_key("w-1"))
            assert await _eventually(all_indexed)
            assert [w.worker_id for w in await registry.list_workers()] == ["w-1"]

            watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == SERVING
            stopping = asyncio.create_task(server.stop())
            assert (await watch.read()).status == NOT_SERVING
            watch.cancel()
            await stopping
        assert await registry.list_workers() == []
        assert not await client.exists(index_key("w-1"))
    finally:
        await server.stop()
        await client.aclose()


def _worker_args(model: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cli", "worker", "--model", str(model), "--port", "0",
            "--num-blocks", "64", "--num-threads", "1", "--dtype", "float32", *extra]


def _start_worker(model: Path, redis_url: str, worker_id: str, *extra: str) -> subprocess.Popen:
    args = _worker_args(model, "--redis-url", redis_url, "--worker-id", worker_id, "--lease-s", "1",
                        "--heartbeat-s", "0.2", "--grace-s", "1", *extra)
    return subprocess.Popen(args, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def start_stalling_peer(plane: list[str]) -> subprocess.Popen:
    """tests/kvstore/stalling_peer.py: a peer that streams KV slowly (its port on its first stdout line,
    a line per layer sent); `plane` is [] (the gRPC stream), ["--tcp"] (the TCP data plane) or
    ["--dist"] (torch.distributed pairs)."""
    return subprocess.Popen([sys.executable, str(REPO / "tests" / "kvstore" / "stalling_peer.py"), *plane],
                            cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop_workers(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every worker process still running, then wait (kill after 30 s)."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()


def _ready_line(proc: subprocess.Popen, timeout: float = 120.0) -> str:
    """`kvweave worker ID ready on HOST:PORT metrics URL`."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("kvweave worker "):
        proc.kill()
        raise AssertionError(f"worker not ready: {line!r} {proc.communicate()[1][-2000:]}")
    return line.strip()


def _ready_address(proc: subprocess.Popen, timeout: float = 120.0) -> str:
    return _ready_line(proc, timeout).split(" ready on ")[1].split()[0]


def _poll(check, timeout: float):
    deadline = time.monotonic() + timeout
    while not (value := check()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def _generate(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        messages = list(worker_pb2_grpc.WorkerStub(channel).Generate(_request(), timeout=60))
    assert messages[-1].finished


def _worker_ids(redis_url: str) -> list[str]:
    async def ids():
        client = aioredis.Redis.from_url(redis_url)
        try:
            return [w.worker_id for w in await Registry(client).list_workers()]
        finally:
            await client.aclose()

    return asyncio.run(ids())


def test_worker_process_sigkill_and_sigterm(redis_url, tiny_hf_model):
    killed, stopped = _start_worker(tiny_hf_model, redis_url, "w-kill"), _start_worker(tiny_hf_model, redis_url, "w-term")
    sync_redis = redis.Redis.from_url(redis_url)
    try:
        lines = [_ready_line(killed), _ready_line(stopped)]
        addresses = [line.split(" ready on ")[1].split()[0] for line in lines]
        assert addresses[0].startswith("127.0.0.1:")
        metrics_url = lines[1].split(" metrics ")[1]
        with urllib.request.urlopen(metrics_url, timeout=10) as resp:
            assert metrics_url.startswith("http://127.0.0.1:") and b'worker="w-term"' in resp.read()
        assert sorted(_worker_ids(redis_url)) == ["w-kill", "w-term"]
        for address, worker_id in zip(addresses, ("w-kill", "w-term")):
            _generate(address)
            assert _poll(lambda: sync_redis.hlen(index_key(worker_id)) == 3, timeout=5)

        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=10)
        # the lease is 1 s; allow generous slack for a busy machine
        assert _poll(lambda: "w-kill" not in _worker_ids(redis_url), timeout=5)
        assert _poll(lambda: not sync_redis.exists(index_key("w-kill")), timeout=5)

        stopped.send_signal(signal.SIGTERM)
        out, err = stopped.communicate(timeout=30)
        assert stopped.returncode == 0, err
        assert "Traceback" not in err
        assert _worker_ids(redis_url) == []  # deregistered at once, not by lease expiry
        assert not sync_redis.exists(index_key("w-term"))
    finally:
        for proc in (killed, stopped):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        sync_redis.close()


def test_bad_flags_fail_with_a_message(tiny_hf_model, tmp_path, capsys):
    """Every bad flag is a one-line error and a non-zero exit. Two cases run as real `kvweave worker`
    processes (the exit status and stderr a user sees, no traceback); the rest call the same entry
    point in this process (each subprocess would import torch again: seconds of CPU apiece)."""
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    in_subprocesses = [
        (_worker_args(tiny_hf_model, "--role", "bogus"), "invalid choice: 'bogus'"),
        (_worker_args(tiny_hf_model, "--redis-url", dead_redis), "cannot reach Redis"),
    ]
    procs = [subprocess.Popen(args, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for args, _ in in_subprocesses]
    in_process = [
        (_worker_args(tmp_path / "no-such-model"), "cannot load model"),
        (_worker_args(tiny_hf_model, "--lease-s", "1", "--heartbeat-s", "2"), "heartbeat_s"),
        (_worker_args(tiny_hf_model, "--dram-cache-gb", "0"), "dram-cache-gb must be positive"),
        (_worker_args(tiny_hf_model, "--ssd-cache-gb", "-2", "--ssd-cache-dir", str(tmp_path)), "ssd-cache-gb must be positive"),
        (_worker_args(tiny_hf_model, "--ssd-cache-gb", "1", "--ssd-cache-dir", str(not_a_dir / "sub")),
         "cannot open the KV store: SSD cache directory"),
        (_worker_args(tiny_hf_model, "--kv-transfer-timeout-s", "0"), "kv_transfer_timeout_s must be positive"),
        (_worker_args(tiny_hf_model, "--metrics-port", "-2"), "metrics_port must be in"),
        (_worker_args(tiny_hf_model, "--kv-transport", "udp"), "invalid choice: 'udp'"),
    ]
    for args, message in in_process:
        try:
            code = kvweave_main(args[3:])  # after [python, -m, cli]
        except SystemExit as e:  # argparse's errors
            code = e.code
        out, err = capsys.readouterr()
        assert code not in (0, None), args
        assert message in err and "Traceback" not in err
        assert "ready on" not in out
    for proc, (_, message) in zip(procs, in_subprocesses):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode != 0
        assert message in err and "Traceback" not in err
        assert "ready on" not in out
