"""Chunk-caches across workers: two real worker processes (DRAM tier, chunk reuse) and a real Redis.

Worker A serves a request with reusable chunks: it stores their caches in its DRAM tier and the
entries reach the KV index. Worker B then gets the same chunks in another order, after other
text: its prefetcher finds them in the index, fetches them from A in one transfer and blends them
in; with every reused token recomputed (`--chunk-recompute-ratio 1.0`) its output equals a full
recompute. A peer that dies mid-transfer only costs computing the chunks.
"""
from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis

from controlplane.procs import child_env
from kvweave.registry import Registry, WorkerInfo
from kvstore.keys import chunk_block_keys, chunk_hash
from kvstore.index import CHUNK_MEDIUMS, KVIndex
from kvstore.keys import encode_extra_keys
from kvweave.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from kvweave.sampling_params import SamplingParams

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_server import _ready_address, _worker_args, start_stalling_peer, stop_workers  # noqa: E402

BS = 16
DRAM_ENTRIES = 256
MAX_TOKENS = 6


def toks(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 250) for _ in range(n)]


DOC_A, DOC_B = toks(48, 11), toks(40, 12)
FIRST = [(toks(20, 13), False), (DOC_A, True), (DOC_B, True), (toks(9, 14), False)]
SECOND = [(toks(13, 15), False), (DOC_B, True), (DOC_A, True), (toks(11, 16), False)]
"""(tokens, reusable) parts of each prompt: the second has the first's chunks in another order."""


def build(parts) -> tuple[list[int], list[tuple[int, int]]]:
    prompt, spans = [], []
    for tokens, reusable in parts:
        if reusable:
            spans.append((len(prompt), len(tokens)))
        prompt += tokens
    return prompt, spans


async def _generate(address: str, parts) -> list[worker_pb2.WorkerGenerateResponse]:
    prompt, spans = build(parts)
    request = worker_pb2.WorkerGenerateRequest(
        prompt_token_ids=prompt,
        sampling=common_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=3),
        chunks=[common_pb2.ChunkSpan(start=s, length=n) for s, n in spans])
    async with grpc.aio.insecure_channel(address) as channel:
        return [m async for m in worker_pb2_grpc.WorkerStub(channel).Generate(request, timeout=60)]


def _tokens(messages) -> list[int]:
    return [t for m in messages for t in m.token_ids]


def _logprobs(messages) -> list[float]:
    return [lp.logprob for m in messages for lp in m.logprobs]


async def _until(check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (value := await check()) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return value


@pytest.fixture(scope="module")
def model(tiny_model_variant):
    """A tiny model whose next token depends on the context (a wrong KV shows in the output)."""
    return tiny_model_variant("gqa")


@pytest.fixture
def reference(tiny_engine_factory, model):
    """The second prompt's greedy tokens and logprobs computed in full (no chunk reuse), the model
    name, and the byte size of one KV entry."""
    engine = tiny_engine_factory(model)
    prompt, _ = build(SECOND)
    out = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                                                   logprobs=3))[0]
    return out.token_ids, [lp for lp, _ in out.logprobs], engine.model_name, engine.connector.layout.nbytes


def _chunk_keys(model_name: str) -> list[list[bytes]]:
    extra = encode_extra_keys((model_name, ""))
    return [chunk_block_keys(chunk_hash(doc, extra), len(doc), BS) for doc in (DOC_A, DOC_B)]


def _start(model: Path, redis_url: str, worker_id: str, entry_bytes: int) -> subprocess.Popen:
    args = _worker_args(model, "--redis-url", redis_url, "--worker-id", worker_id, "--lease-s", "1",
                        "--heartbeat-s", "0.2", "--grace-s", "1", "--peer-fetch", "true",
                        "--dram-cache-gb", f"{DRAM_ENTRIES * entry_bytes / 2**30:.12f}",
                        "--chunk-recompute-ratio", "1.0")
    return subprocess.Popen(args, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.fixture
def start_workers(redis_url, model, reference):
    procs: list[subprocess.Popen] = []

    def start(*worker_ids: str) -> list[str]:
        new = [_start(model, redis_url, w, reference[3]) for w in worker_ids]
        procs.extend(new)
        return [_ready_address(p) for p in new]

    yield start
    stop_workers(procs)


@pytest.mark.asyncio
async def test_worker_fetches_chunk_caches_from_the_peer(redis_url, start_workers, reference):
    ref_tokens, ref_logprobs, model_name, _ = reference
    a, b = start_workers("w-a", "w-b")
    first = await _generate(a, FIRST)
    assert first[-1].finished and first[-1].usage.chunk_reused_tokens == 0
    client = aioredis.Redis.from_url(redis_url)
    try:
        index = KVIndex(client)
        keys = [k for chunk in _chunk_keys(model_name) for k in chunk]

        async def on(worker: str) -> bool:
            return all(any(loc.worker_id == worker for loc in holders)
                       for holders in await index.locate(keys, [worker], CHUNK_MEDIUMS))

        assert await _until(lambda: on("w-a"))  # A stored both chunks and published them
        assert not await on("w-b")
        await asyncio.sleep(0.5)  # w-b's peer list refreshes with its heartbeat (0.2 s)
        second = await _generate(b, SECOND)
    finally:
        await client.aclose()
    usage = second[-1].usage
    assert usage.chunk_reused_tokens == len(DOC_A) + len(DOC_B) == usage.recomputed_tokens
    assert usage.cached_tokens == 0
    assert _tokens(second) == ref_tokens
    assert _logprobs(second) == pytest.approx(ref_logprobs, abs=1e-4)


@pytest.mark.asyncio
@pytest.mark.parametrize("plane", [[], ["--tcp"]], ids=["grpc-stream", "tcp-data-plane"])
async def test_peer_killed_mid_chunk_transfer_falls_back_to_computing(redis_url, start_workers, reference, plane):
    ref_tokens, ref_logprobs, model_name, _ = reference
    (b,) = start_workers("w-b")
    peer = start_stalling_peer(plane)
    client = aioredis.Redis.from_url(redis_url)
    try:
        port = int(peer.stdout.readline().strip())
        # Register the stalling peer as a worker holding both chunks in its DRAM tier.
        registry, index = Registry(client, lease_s=30), KVIndex(client, lease_s=30)
        await registry.heartbeat(WorkerInfo("w-stall", f"127.0.0.1:{port}", model_name))
        await index.replace("w-stall", "dram", [k for chunk in _chunk_keys(model_name) for k in chunk])
        await asyncio.sleep(0.5)  # w-b's peer list refreshes with its heartbeat

        async def kill_when_streaming() -> None:
            await asyncio.to_thread(peer.stdout.readline)  # the peer has sent its first layer
            peer.kill()

        killer = asyncio.create_task(kill_when_streaming())
        second = await _generate(b, SECOND)
        await killer
        assert peer.wait(timeout=10) == -signal.SIGKILL  # it died mid-stream, not before
    finally:
        await client.aclose()
        peer.kill()
        peer.communicate()
    assert second[-1].usage.chunk_reused_tokens == 0  # computed, not reused
    assert _tokens(second) == ref_tokens
    assert _logprobs(second) == pytest.approx(ref_logprobs, abs=1e-4)
