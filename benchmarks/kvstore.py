"""`kvweave bench kvstore`: the tiered KV store against this machine's limits, measured in the same run.

Entries are KV blocks of the default model (SmolLM2-135M, bf16, 16 tokens: [2, 30, 3, 16, 64],
368,640 bytes); each figure is the median of `repeats` runs over `total_mb` of distinct entries.
- dram_tier_put / dram_tier_get: `DRAMTier.put` of every entry, and `get` of every entry into a
  preallocated destination (as onboarding into the KV cache does), against one plain memory copy
  (`Tensor.copy_`) of the same number of bytes.
- ssd_tier_write / ssd_tier_read: `SSDTier.put_many` / `get_many` in batches of 32 entries
  (checksummed slots, coalesced O_DIRECT I/O where the filesystem allows), in the steady state of
  a full slab (each new entry evicts an old one), against raw sequential `pwrite` / `pread` of the
  same bytes in 4 MiB pieces over a file written once before, with the same flags (O_DIRECT
  bypasses the page cache; without it the cache is dropped with fsync + POSIX_FADV_DONTNEED
  before reads). `extra` has the rate of one entry per call.
- transfer_node_to_node: `TransferClient.fetch_kv` of every entry (verified, layer by layer) from
  a peer process serving them (kvstore.transfer: the raw TCP data plane that `DataPort` names)
  into a preallocated output, against a raw loopback TCP socket between two processes carrying
  the same bytes into a preallocated buffer. `extra`: the same into a fresh output tensor (on
  this VM, first touches of fresh memory cost more than the transfer), over the gRPC stream, and
  over a torch.distributed gloo pair (`transport="dist"`, into the preallocated output and into a
  fresh one, which it receives in place).
- index_lookups_per_s: the router's index lookup (`KVIndex.leading_tiers`) for a 1k-token prompt
  over 4 workers x 3 tiers each holding `index_entries` keys, 16 lookups in flight, against
  unpipelined PINGs on one connection (one round trip each) with 16 in flight.
- index_round_trips_per_request: Redis round trips (writes on the client connection) per routed
  request for the router's lookup; `extra` has the worker's `locate` of the blocks it lacks; target 1.
- onboard_vs_recompute_512: the engine (default model) loading 512 tokens (32 blocks) of KV from
  the DRAM tier, and from the SSD tier, into its KV cache (`KVConnector.load_external`), against
  computing the same 512 tokens' KV (a prefill forward of 512 tokens). `extra` has the TTFT of a
  513-token request whose first 512 tokens come from each tier against a cold one.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import multiprocessing as mp
import os
import socket
import tempfile
import time
from dataclasses import dataclass

import torch

from benchmarks.onboard import bench_onboard
from benchmarks.report import Result, median, metric_list_type, render, write_json
from kvweave.defaults import DEFAULT_MODEL

METRICS = ("dram_tier_put", "dram_tier_get", "ssd_tier_write", "ssd_tier_read", "transfer_node_to_node",
           "index_lookups_per_s", "index_round_trips_per_request", "onboard_vs_recompute_512")
BLOCK_SHAPE = (2, 30, 3, 16, 64)
GB = 1e9
RAW_PIECE = 4 * 2**20
LOOKUP_CONCURRENCY = 16
SSD_BATCH = 32
"""Entries per put_many / get_many call (a prefetch reads a prompt's run of blocks in one call)."""


@dataclass(frozen=True)
class BenchConfig:
    total_mb: int = 256
    repeats: int = 3
    index_entries: int = 100_000
    """Keys per (worker, tier) in the index."""
    lookup_seconds: float = 2.0
    model: str = DEFAULT_MODEL


QUICK = BenchConfig(total_mb=64, repeats=2, index_entries=10_000, lookup_seconds=0.5)


def _layout():
    from kvstore.codec import KVLayout

    return KVLayout(torch.bfloat16, BLOCK_SHAPE)


def _entries(total_mb: int) -> tuple[list[bytes], torch.Tensor]:
    layout = _layout()
    n = max(1, total_mb * 2**20 // layout.nbytes)
    gen = torch.Generator().manual_seed(0)
    values = torch.randn((n, *layout.shape), generator=gen).to(layout.dtype)
    keys = [i.to_bytes(16, "big") for i in range(n)]
    return keys, values


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _rate(nbytes: int, seconds: list[float]) -> float:
    return nbytes / median(seconds) / GB


# ------------------------------------------------------------------------------------- DRAM

def bench_dram(cfg: BenchConfig) -> list[Result]:
    from kvstore.dram import DRAMTier

    keys, values = _entries(cfg.total_mb)
    layout, n = _layout(), len(keys)
    nbytes = n * layout.nbytes
    src, dst = values.view(-1).view(torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
    dst.fill_(1)
    outs = torch.empty_like(values)
    outs.view(-1).view(torch.uint8).fill_(1)
    memcpy, put, get = [], [], []
    for _ in range(cfg.repeats):
        tier = DRAMTier(layout, nbytes)
        memcpy.append(_timed(lambda: dst.copy_(src)))
        put.append(_timed(lambda: [tier.put(k, v) for k, v in zip(keys, values)]))
        get.append(_timed(lambda: [tier.get(k, o) for k, o in zip(keys, outs)]))
        assert torch.equal(outs.view(torch.int16), values.view(torch.int16))
        tier.close()
    base = _rate(nbytes, memcpy)
    info = {"entries": n, "entry_bytes": layout.nbytes}
    return [Result("dram_tier_put", _rate(nbytes, put), "GB/s", "memcpy", base, extra=info),
            Result("dram_tier_get", _rate(nbytes, get), "GB/s", "memcpy", base,
                   extra={**info, "note": "get into a preallocated destination"})]


# -------------------------------------------------------------------------------------- SSD

def _raw_file_io(path: str, nbytes: int, direct: bool) -> tuple[float, float]:
    """Seconds to overwrite then read `nbytes` of a file sequentially in 4 MiB pieces (O_DIRECT when
    `direct`); the file is written once first, as the tier's slab is."""
    import mmap

    buf = mmap.mmap(-1, RAW_PIECE)
    buf.write(os.urandom(RAW_PIECE))
    flags = os.O_RDWR | os.O_CREAT | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags, 0o644)
    view = memoryview(buf)

    def write_all() -> float:
        t0 = time.perf_counter()
        for off in range(0, nbytes, RAW_PIECE):
            os.pwrite(fd, view, off)
        if not direct:
            os.fsync(fd)
        return time.perf_counter() - t0

    try:
        write_all()
        write_s = write_all()
        if not direct:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        for off in range(0, nbytes, RAW_PIECE):
            os.preadv(fd, [view], off)
        read_s = time.perf_counter() - t0
    finally:
        os.close(fd)
        os.unlink(path)
        view.release()
        buf.close()
    return write_s, read_s


def bench_ssd(cfg: BenchConfig, directory: str | None) -> list[Result]:
    """Steady state, as a worker's slab lives: the tier is filled once, then every measured put of a
    new entry evicts an old one and overwrites its slot."""
    from kvstore.ssd import SSDTier

    keys, values = _entries(cfg.total_mb)
    layout, n = _layout(), len(keys)
    nbytes = n * layout.nbytes
    outs = torch.empty_like(values)
    raw_w, raw_r, put, get, put_one, get_one = [], [], [], [], [], []
    direct = True
    with tempfile.TemporaryDirectory(prefix="kvweave-bench-ssd-", dir=directory) as tmp:
        tier = SSDTier(layout, n * tier_slot_bytes(layout), tmp)
        direct = tier.direct_io
        for k, v in zip(keys, values):  # fill: the slab's first pass
            tier.put(b"fill" + k[4:], v)
        try:
            for r in range(cfg.repeats):
                run_keys = [bytes([2 * r + 1]) + k[1:] for k in keys]
                put.append(_timed(lambda: [tier.put_many(run_keys[i:i + SSD_BATCH], values[i:i + SSD_BATCH])
                                           for i in range(0, n, SSD_BATCH)]))
                if not direct:
                    os.fsync(tier._file.fd)
                    os.posix_fadvise(tier._file.fd, 0, 0, os.POSIX_FADV_DONTNEED)
                get.append(_timed(lambda: [tier.get_many(run_keys[i:i + SSD_BATCH], outs[i:i + SSD_BATCH])
                                           for i in range(0, n, SSD_BATCH)]))
                assert torch.equal(outs.view(torch.int16), values.view(torch.int16))
                # One entry per call, as the engine demotes evicted blocks.
                one_keys = [bytes([2 * r + 2]) + k[1:] for k in keys]
                put_one.append(_timed(lambda: [tier.put(k, v) for k, v in zip(one_keys, values)]))
                get_one.append(_timed(lambda: [tier.get(k, o) for k, o in zip(one_keys, outs)]))
                w, rd = _raw_file_io(os.path.join(tmp, f"raw{r}.bin"), nbytes, direct)
                raw_w.append(w)
                raw_r.append(rd)
        finally:
            tier.close()
    mode = "O_DIRECT" if direct else "buffered, cache dropped"
    info = {"entries": n, "entry_bytes": layout.nbytes, "io": mode, "batch": SSD_BATCH}
    return [Result("ssd_tier_write", _rate(nbytes, put), "GB/s", f"raw sequential write ({mode})",
                   _rate(nbytes, raw_w), extra={**info, "one_per_call_gb_s": round(_rate(nbytes, put_one), 3)}),
            Result("ssd_tier_read", _rate(nbytes, get), "GB/s", f"raw sequential read ({mode})",
                   _rate(nbytes, raw_r), extra={**info, "one_per_call_gb_s": round(_rate(nbytes, get_one), 3)})]


def tier_slot_bytes(layout) -> int:
    from kvstore.ssd import slot_size

    return slot_size(layout)


# --------------------------------------------------------------------------------- transfer

class _LayerMajorSource:
    """Serves a fixed set of entries stored layer-major, as a worker's export builds them."""

    def __init__(self, keys: list[bytes], values: torch.Tensor) -> None:
        from kvstore.transfer_source import empty_layer_major

        self.index = {k: i for i, k in enumerate(keys)}
        self.entries = empty_layer_major(len(keys), _layout())
        self.entries.copy_(values)

    async def export(self, keys, layout):
        n = 0
        while n < len(keys) and self.index.get(keys[n]) == n:
            n += 1
        return self.entries[:n] if n else None


def _serve_entries(total_mb: int, conn) -> None:
    from kvstore.transfer import serve_transfer

    keys, values = _entries(total_mb)

    async def main() -> None:
        source = _LayerMajorSource(keys, values)
        server, port = await serve_transfer(source)
        conn.send(port)
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        await server.stop(0)

    asyncio.run(main())


def _socket_sender(port: int, nbytes: int) -> None:
    payload = memoryview(os.urandom(RAW_PIECE))
    with socket.create_connection(("127.0.0.1", port)) as s:
        sent = 0
        while sent < nbytes:
            chunk = payload[:min(RAW_PIECE, nbytes - sent)]
            s.sendall(chunk)
            sent += len(chunk)
        s.recv(1)


def _raw_socket(nbytes: int, ctx) -> float:
    buf = bytearray(nbytes)
    view = memoryview(buf)
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        proc = ctx.Process(target=_socket_sender, args=(srv.getsockname()[1], nbytes))
        proc.start()
        conn, _ = srv.accept()
        with conn:
            got = 0
            t0 = time.perf_counter()
            while got < nbytes:
                got += conn.recv_into(view[got:])
            seconds = time.perf_counter() - t0
            conn.sendall(b"x")
        proc.join()
    return seconds


def bench_transfer(cfg: BenchConfig) -> list[Result]:
    from kvstore.transfer_client import TransferClient

    keys, values = _entries(cfg.total_mb)
    layout, n = _layout(), len(keys)
    nbytes = n * layout.nbytes
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve_entries, args=(cfg.total_mb, child))
    proc.start()
    try:
        port = parent.recv()

        async def fetch_all(transport: str, into: torch.Tensor | None) -> list[float]:
            client = TransferClient(transport=transport)
            try:
                await client.fetch_kv(f"127.0.0.1:{port}", keys[:4], layout, 30.0)  # connect
                times = []
                for _ in range(cfg.repeats):
                    t0 = time.perf_counter()
                    got = await client.fetch_kv(f"127.0.0.1:{port}", keys, layout, 60.0, out=into)
                    times.append(time.perf_counter() - t0)
                    assert got.shape[0] == n and torch.equal(got.view(torch.int16), values.view(torch.int16))
                    del got
                return times
            finally:
                await client.close()

        out = torch.zeros_like(values)  # received into memory already touched, as the raw baseline does
        tcp_times = asyncio.run(fetch_all("auto", out))
        fresh_times = asyncio.run(fetch_all("auto", None))
        grpc_times = asyncio.run(fetch_all("grpc", out))
        dist_times = asyncio.run(fetch_all("dist", out))
        dist_fresh_times = asyncio.run(fetch_all("dist", None))
    finally:
        parent.send("stop")
        proc.join(timeout=30)
    raw = [_raw_socket(nbytes, ctx) for _ in range(cfg.repeats)]
    return [Result("transfer_node_to_node", _rate(nbytes, tcp_times), "GB/s", "raw loopback TCP socket",
                   _rate(nbytes, raw), extra={"entries": n, "entry_bytes": layout.nbytes, "transport": "tcp data plane",
                                              "fresh_output_gb_s": round(_rate(nbytes, fresh_times), 3),
                                              "grpc_stream_gb_s": round(_rate(nbytes, grpc_times), 3),
                                              "dist_gloo_gb_s": round(_rate(nbytes, dist_times), 3),
                                              "dist_gloo_fresh_output_gb_s": round(_rate(nbytes, dist_fresh_times), 3)})]


# ------------------------------------------------------------------------------------ index

class _CountingRoundTrips:
    """Counts the writes a redis.asyncio client makes: one per round trip (a pipeline packs all
    its commands into one write, then reads all the replies)."""

    def __init__(self) -> None:
        self.count = 0

    def __enter__(self):
        from redis.asyncio.connection import AbstractConnection

        self._cls, self._orig = AbstractConnection, AbstractConnection.send_packed_command
        counter = self

        async def send_packed_command(conn, *args, **kwargs):
            counter.count += 1
            return await counter._orig(conn, *args, **kwargs)

        AbstractConnection.send_packed_command = send_packed_command
        return self

    def __exit__(self, *exc) -> None:
        self._cls.send_packed_command = self._orig


async def _index_bench(cfg: BenchConfig, url: str) -> list[Result]:
    import random

    import redis.asyncio as aioredis

    from kvstore.index import MEDIUMS, KVIndex
    from kvstore.keys import encode_extra_keys, hash_blocks

    client = aioredis.Redis.from_url(url)
    try:
        index = KVIndex(client, lease_s=3600)
        rng = random.Random(0)
        prompt = hash_blocks([rng.randrange(50_000) for _ in range(1024)], 16, encode_extra_keys(("bench", "")))
        workers = [f"w{i}" for i in range(4)]
        for w in workers:
            for m in MEDIUMS:
                held = [rng.randbytes(16) for _ in range(cfg.index_entries)]
                if w == "w0" and m == "dram":
                    held += prompt[:48]
                if w == "w1" and m == "device":
                    held += prompt[:16]
                await index.replace(w, m, held, 368_640)
        codes = await index.leading_tiers(prompt, workers)
        assert codes["w0"] == b"2" * 48 and codes["w1"] == b"1" * 16 + b"0" * 32, codes

        async def rate(op) -> float:
            deadline = time.perf_counter() + cfg.lookup_seconds
            counts = [0] * LOOKUP_CONCURRENCY

            async def loop(i: int) -> None:
                while time.perf_counter() < deadline:
                    await op()
                    counts[i] += 1
            t0 = time.perf_counter()
            await asyncio.gather(*(loop(i) for i in range(LOOKUP_CONCURRENCY)))
            return sum(counts) / (time.perf_counter() - t0)

        lookups, pings = [], []
        for _ in range(cfg.repeats):
            lookups.append(await rate(lambda: index.leading_tiers(prompt, workers)))
            pings.append(await rate(client.ping))
        # Round trips per request: the router's lookup and the worker's peer lookup.
        requests = 50
        with _CountingRoundTrips() as router_count:
            for _ in range(requests):
                await index.leading_tiers(prompt, workers)
        with _CountingRoundTrips() as worker_count:
            for _ in range(requests):
                await index.locate(prompt[16:], workers)
        per_request = router_count.count / requests
        info = {"prompt_blocks": len(prompt), "workers": len(workers), "tiers": len(MEDIUMS),
                "keys_per_worker_tier": cfg.index_entries, "in_flight": LOOKUP_CONCURRENCY}
        return [Result("index_lookups_per_s", median(lookups), "1/s", "redis PING (one round trip)",
                       median(pings), extra=info),
                Result("index_round_trips_per_request", per_request, "count", "target", 1.0,
                       higher_is_better=False,
                       extra={"worker_locate_round_trips": worker_count.count / requests})]
    finally:
        await client.aclose()


def bench_index(cfg: BenchConfig) -> list[Result]:
    from controlplane.procs import RedisServer

    with RedisServer() as server:
        return asyncio.run(_index_bench(cfg, server.url))


# ------------------------------------------------------------------------------------- main

def run_benchmark(cfg: BenchConfig, metrics: list[str], directory: str | None = None) -> tuple[dict, list[Result]]:
    results: list[Result] = []
    wanted = set(metrics)
    if wanted & {"dram_tier_put", "dram_tier_get"}:
        results += [r for r in bench_dram(cfg) if r.metric in wanted]
    if wanted & {"ssd_tier_write", "ssd_tier_read"}:
        results += [r for r in bench_ssd(cfg, directory) if r.metric in wanted]
    if "transfer_node_to_node" in wanted:
        results += bench_transfer(cfg)
    if wanted & {"index_lookups_per_s", "index_round_trips_per_request"}:
        results += [r for r in bench_index(cfg) if r.metric in wanted]
    if "onboard_vs_recompute_512" in wanted:
        results += bench_onboard(cfg.model, cfg.repeats, directory)
    config = dataclasses.asdict(cfg) | {"entry_shape": list(BLOCK_SHAPE), "entry_dtype": "bfloat16",
                                        "load_avg": [round(x, 2) for x in os.getloadavg()]}
    return config, results


def add_parser(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser("kvstore", help="KV store tiers, transfer, index and onboarding against this machine's limits")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--quick", action="store_true", help="less data, fewer repeats: well under a minute")
    p.add_argument("--metrics", type=metric_list_type(METRICS), default=list(METRICS),
                   help=f"comma-separated subset of: {', '.join(METRICS)}")
    p.add_argument("--dir", default=None, help="where the SSD files go (default: the system temp dir)")
    p.add_argument("--model", default=None, help="model of onboard_vs_recompute_512 (default: smollm2-135m)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = QUICK if args.quick else BenchConfig()
    if args.model:
        cfg = dataclasses.replace(cfg, model=args.model)
    if args.dir and not os.path.isdir(args.dir):
        print(f"error: --dir {args.dir} is not a directory", file=__import__("sys").stderr)
        return 2
    config, results = run_benchmark(cfg, args.metrics, args.dir)
    print(render("kvstore", config, results))
    if args.json:
        write_json(args.json, "kvstore", config, results)
    return 0
