"""Two real worker processes and a real Redis: a worker without a prompt's blocks fetches them from
the peer that holds them (found through the KV index) instead of computing them (over the default
transport, and over torch.distributed pairs: `--kv-transport dist`), and its greedy output equals a
full recompute; a peer that dies mid-transfer (over the TCP data plane, over the gRPC stream of a
peer without one, or over a torch.distributed pair) only costs the recompute. Both workers' metrics count the transfer
(bytes and time, in and out) or its failure."""
from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis

from kvweave.registry import Registry, WorkerInfo
from kvstore.index import KVIndex
from kvstore.keys import encode_extra_keys, hash_blocks
from kvweave.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from kvweave.sampling_params import SamplingParams

PROMPT = [(i * 37) % 240 + 5 for i in range(100)]  # 6 full blocks of 16; the 7th is computed
SAMPLING = common_pb2.SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_server import _ready_address, _start_worker, start_stalling_peer, stop_workers  # noqa: E402
from test_worker_metrics import scrape  # noqa: E402


async def _generate(address: str, prompt=PROMPT) -> list[worker_pb2.WorkerGenerateResponse]:
    async with grpc.aio.insecure_channel(address) as channel:
        request = worker_pb2.WorkerGenerateRequest(prompt_token_ids=prompt, sampling=SAMPLING)
        return [m async for m in worker_pb2_grpc.WorkerStub(channel).Generate(request, timeout=60)]


async def _load(address: str) -> worker_pb2.Load:
    async with grpc.aio.insecure_channel(address) as channel:
        return (await worker_pb2_grpc.WorkerStub(channel).GetLoad(worker_pb2.GetLoadRequest(), timeout=10)).load


async def _until(check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (value := await check()) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return value


def _tokens(messages) -> list[int]:
    return [t for m in messages for t in m.token_ids]


async def _metrics(redis_url: str, worker_id: str) -> dict:
    """The worker's /metrics samples, found through its registry entry."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        (info,) = [w for w in await Registry(client).list_workers() if w.worker_id == worker_id]
    finally:
        await client.aclose()
    return (await asyncio.to_thread(scrape, f"http://{info.metrics_target}/metrics"))[1]


@pytest.fixture
def cold_output(tiny_engine_factory):
    engine = tiny_engine_factory()
    out = engine.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))[0]
    return out.token_ids, engine.model_name


def _workers(redis_url, model, request, worker_ids):
    """Workers fetching with the transport the test's indirect parameter names (default auto)."""
    transport = getattr(request, "param", "auto")
    procs = [_start_worker(model, redis_url, w, "--kv-transport", transport) for w in worker_ids]
    try:
        yield [_ready_address(p) for p in procs]
    finally:
        stop_workers(procs)


@pytest.fixture
def two_workers(redis_url, tiny_hf_model, request):
    yield from _workers(redis_url, tiny_hf_model, request, ("w-a", "w-b"))


@pytest.fixture
def one_worker(redis_url, tiny_hf_model, request):
    yield from _workers(redis_url, tiny_hf_model, request, ("w-b",))


@pytest.mark.asyncio
@pytest.mark.parametrize("two_workers", ["auto", "dist", "ipc"], indirect=True)
async def test_request_fetches_its_prefix_from_the_peer(redis_url, two_workers, cold_output):
    cold_tokens, model = cold_output
    a, b = two_workers
    first = await _generate(a)
    assert _tokens(first) == cold_tokens and first[-1].usage.cached_tokens == 0
    client = aioredis.Redis.from_url(redis_url)
    try:
        hashes = hash_blocks(PROMPT, 16, encode_extra_keys((model, "")))
        index = KVIndex(client)
        assert len(hashes) == 6
        assert await _until(lambda: _all_on(index, hashes, "w-a"))
        await asyncio.sleep(0.5)  # w-b's peer list refreshes with its heartbeat (0.2 s)
        second = await _generate(b)
        assert _tokens(second) == cold_tokens
        assert second[-1].usage.cached_tokens == 96  # 6 blocks from the peer, 4 tokens computed
        load = await _load(b)
        assert dict(load.prefix_hit_tokens)["peer"] == 96 and load.prefix_query_tokens == 100
        fetched, served = await _metrics(redis_url, "w-b"), await _metrics(redis_url, "w-a")
        nbytes, count = "kvweave_worker_kv_transfer_bytes_total", "kvweave_worker_kv_transfer_seconds_count"
        assert fetched[(nbytes, (("direction", "in"),))] == served[(nbytes, (("direction", "out"),))] > 0
        assert fetched[(count, (("direction", "in"),))] == served[(count, (("direction", "out"),))] == 1
        assert fetched[(nbytes, (("direction", "in"),))] % 6 == 0  # 6 blocks of one size
        assert fetched[("kvweave_worker_prefix_cache_hit_tokens_total", (("source", "peer"),))] == 96
        assert fetched[("kvweave_worker_kv_transfer_failures_total", ())] == 0
        # The fetched blocks are now w-b's own, and indexed as such.
        assert await _until(lambda: _all_on(index, hashes, "w-b"))
    finally:
        await client.aclose()


async def _all_on(index: KVIndex, hashes, worker: str) -> bool:
    return all((await index.lookup(hashes, [worker]))[(worker, "device")])


@pytest.mark.asyncio
@pytest.mark.parametrize("plane, one_worker", [([], "auto"), (["--tcp"], "auto"), (["--dist"], "dist")],
                         ids=["grpc-stream", "tcp-data-plane", "dist"], indirect=["one_worker"])
async def test_peer_killed_mid_transfer_falls_back_to_recompute(redis_url, one_worker, cold_output, plane):
    cold_tokens, model = cold_output
    (b,) = one_worker
    peer = start_stalling_peer(plane)
    client = aioredis.Redis.from_url(redis_url)
    try:
        port = int(peer.stdout.readline().strip())
        # Register the stalling peer as a worker holding the prompt's blocks.
        registry, index = Registry(client, lease_s=30), KVIndex(client, lease_s=30)
        await registry.heartbeat(WorkerInfo("w-stall", f"127.0.0.1:{port}", model))
        await index.replace("w-stall", "device", hash_blocks(PROMPT, 16, encode_extra_keys((model, ""))))
        await asyncio.sleep(0.5)  # w-b's peer list refreshes with its heartbeat

        async def kill_when_streaming() -> None:
            # The peer prints a line once it has sent its first layer.
            await asyncio.to_thread(peer.stdout.readline)
            peer.kill()

        killer = asyncio.create_task(kill_when_streaming())
        out = await _generate(b)
        await killer
        assert peer.wait(timeout=10) == -signal.SIGKILL  # it died mid-stream, not before
        assert _tokens(out) == cold_tokens and out[-1].usage.cached_tokens == 0
        load = await _load(b)
        assert dict(load.prefix_hit_tokens).get("peer", 0) == 0
        metrics = await _metrics(redis_url, "w-b")
        assert metrics[("kvweave_worker_kv_transfer_failures_total", ())] == 1
        assert metrics[("kvweave_worker_kv_transfer_bytes_total", (("direction", "in"),))] == 0
    finally:
        await client.aclose()
        peer.kill()
        peer.communicate()
