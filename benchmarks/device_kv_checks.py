"""The device check's KV-movement checks (benchmarks/device_check.py lists them all): the DRAM
tier's offload and onboarding against plain copies, and the IPC handoff between two processes of
one GPU (`ipc_peer_main` is the serving process, started as `python -m benchmarks.device_check
--ipc-peer N`)."""
from __future__ import annotations

import sys
import time

import torch

from benchmarks.device_context import LLAMA_8B, SMOKE_CACHE_GB, SMOL, TINY, Context, greedy, prompts
from benchmarks.report import Result

def check_tier_offload(ctx: Context) -> list[Result]:
    engine = ctx.engine(ctx.model_folder("smol-shape", ctx.shape(SMOL)), "bfloat16", load_format="dummy",
                        kv_cache_gb=SMOKE_CACHE_GB if ctx.smoke else 2.0,
                        dram_cache_gb=SMOKE_CACHE_GB if ctx.smoke else 4.0)
    n, rounds = (16, 2) if ctx.smoke else (256, 5)
    store = engine.store
    values = [engine.connector.device.view(b) for b in range(n)]
    round_keys = iter([[(r * n + i).to_bytes(8, "little") + bytes(24) for i in range(n)] for r in range(rounds + 1)])

    def offload():  # fresh keys each round: a key already held is not copied again
        keys = next(round_keys)
        store.offload_many(keys, values, [1.0] * n)
        assert all(store.contains(k) for k in keys)

    seconds = ctx.timed(offload, rounds, warmup=1)
    nbytes = n * values[0].numel() * values[0].element_size()
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=ctx.device.type == "cuda")
    src = torch.empty(nbytes, dtype=torch.uint8, device=ctx.device)
    copy = ctx.timed(lambda: host.copy_(src, non_blocking=True), 3 if ctx.smoke else 10)
    return [Result("tier_offload", nbytes / seconds / 1e9, "GB/s", "one pinned device-to-host copy",
                   nbytes / copy / 1e9, extra={"blocks": n, "block_bytes": nbytes // n, "target_ratio": 0.7,
                                               "path": "TierManager.offload_many of device block views"})]


def check_onboard_overlap(ctx: Context) -> list[Result]:
    import threading

    blocks = 16 if ctx.smoke else 256
    engine = ctx.engine(ctx.model_folder("smol-shape", ctx.shape(SMOL)), "bfloat16", load_format="dummy",
                        kv_cache_gb=SMOKE_CACHE_GB if ctx.smoke else 2.0,
                        dram_cache_gb=SMOKE_CACHE_GB if ctx.smoke else 4.0)
    store, device = engine.store, engine.connector.device
    top = engine.block_manager.num_blocks
    targets = [device.view(b) for b in range(top - blocks, top)]  # blocks the decode batch never gets
    keys = [(i + 1).to_bytes(8, "little") + bytes(24) for i in range(blocks)]
    store.offload_many(keys, targets, [1.0] * blocks)
    for p in prompts(16, 64, engine.args.vocab_size, seed=21):
        engine.add_request(p, greedy(10_000))
    for _ in range(3):  # prefills done: every step from here decodes the 16
        engine.step()

    def steps(n: int) -> float:
        ctx.sync()
        t = time.perf_counter()
        for _ in range(n):
            engine.step()
        ctx.sync()
        return (time.perf_counter() - t) / n

    n = 3 if ctx.smoke else 30
    plain = steps(n)
    stop, loads = threading.Event(), [0]

    def onboard() -> None:
        while not stop.is_set():
            store.load_many(keys, targets)
            loads[0] += 1

    loader = threading.Thread(target=onboard, daemon=True)
    loader.start()
    try:
        loaded = steps(n)
    finally:
        stop.set()
        loader.join()
    return [Result("onboard_overlap", loaded * 1e3, "ms", "the same decode steps with nothing loading", plain * 1e3,
                   higher_is_better=False, extra={"batch": 16, "blocks_per_load": blocks, "loads_during": loads[0],
                                                  "target_ratio": round(1 / 1.1, 3)})]


def _handoff_entries(layout, n: int, device: torch.device) -> torch.Tensor:
    """The same random KV bytes in every process (seeded on the device), layer-major."""
    from kvstore.transfer_source import to_layer_major

    gen = torch.Generator(device).manual_seed(16)
    raw = torch.randint(0, 256, (n, layout.nbytes), dtype=torch.uint8, generator=gen, device=device)
    return to_layer_major(raw.view(layout.dtype).view(n, *layout.shape))


def _handoff_layout(smoke: bool):
    from kvstore.codec import KVLayout

    shape = TINY if smoke else LLAMA_8B
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    return KVLayout(torch.bfloat16, (2, shape["num_hidden_layers"], shape["num_key_value_heads"], 16, head_dim))


class _ExportingSource:
    """A KVSource that exports a fresh copy per fetch, as a prefill worker exports a pinned handoff."""

    def __init__(self, entries: torch.Tensor) -> None:
        self.entries = entries

    async def export(self, keys, layout, on_device: bool = False):
        entries = self.entries[:len(keys)]
        return entries.clone() if on_device else entries.cpu()


def ipc_peer_main(smoke: bool, n: int) -> None:
    """`--ipc-peer`: serve the handoff entries over the transfer service; print the port; serve until killed."""
    import asyncio

    from kvstore.transfer import serve_transfer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    entries = _handoff_entries(_handoff_layout(smoke), n, device)

    async def serve() -> None:
        server, port = await serve_transfer(_ExportingSource(entries), data_plane=False, dist=False,
                                            kv_device=str(device))
        print(port, flush=True)
        await server.wait_for_termination()

    asyncio.run(serve())


def check_ipc_handoff(ctx: Context) -> list[Result]:
    import asyncio
    import subprocess

    from kvstore.transfer_client import TransferClient

    layout = _handoff_layout(ctx.smoke)
    n, rounds = (8, 2) if ctx.smoke else (256, 5)
    peer = subprocess.Popen([sys.executable, "-m", "benchmarks.device_check", "--ipc-peer", str(n), "--out", "-",
                             "--tokenizer-dir", "-"] + (["--smoke"] if ctx.smoke else []),
                            stdout=subprocess.PIPE, text=True)
    try:
        port = int(peer.stdout.readline())
        keys = [i.to_bytes(16, "little") for i in range(n)]
        want = _handoff_entries(layout, n, ctx.device)

        async def fetches() -> tuple[list[float], bool]:
            client = TransferClient(transport="ipc", ipc_device=ctx.device)
            try:
                times, equal = [], True
                for _ in range(rounds + 1):
                    t = time.perf_counter()
                    got = await client.fetch_kv(f"127.0.0.1:{port}", keys, layout, timeout_s=60)
                    times.append(time.perf_counter() - t)
                    equal = equal and got.shape[0] == n and torch.equal(got.view(torch.uint8), want.view(torch.uint8))
                return times[1:], equal
            finally:
                await client.close()

        times, equal = asyncio.run(fetches())
    finally:
        peer.kill()
        peer.wait()
    if not equal:
        raise AssertionError("the entries fetched over ipc differ from the peer's")
    nbytes = n * layout.nbytes
    src = want.movedim(2, 0).contiguous()
    dst = torch.empty_like(src)
    copy = ctx.timed(lambda: dst.copy_(src), 3 if ctx.smoke else 10)
    seconds = sorted(times)[len(times) // 2]
    return [Result("ipc_handoff", nbytes / seconds / 1e9, "GB/s", "one device-to-device copy of the same bytes",
                   nbytes / copy / 1e9, extra={"blocks": n, "bytes": nbytes, "layout": str(layout), "equal": equal,
                                               "target_ratio": 0.5, "memory": ctx.device.type,
                                               "fetch_s": [round(t, 6) for t in times]})]
