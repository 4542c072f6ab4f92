"""`kvweave bench epd`: encode workers and the cluster-wide embedding cache, on a SmolVLM-256M-shaped model.

Every request goes through the real serving path (router, gRPC, worker processes of
controlplane.cluster.LocalCluster). By default the model is benchmarks/vlm_checkpoint.py's random-weight
SmolVLM-256M shape (`--load-format dummy`); `--model` takes any Idefics3 folder. Images are seeded
noise PNGs, each new image unseen by the cluster (so its embedding is cold unless the run put it
there). Reported, each with its baseline from the same run:
- `ttft_embedding_cache`: on a cluster of 1 encode + 1 colocated worker, the median TTFT of a
  request whose image embedding is already held by the encode worker (encoded beforehand by a direct
  `Encode` call, then fetched by the colocated worker through the KV transfer path), against the
  same request shape with a new image that the cluster encodes cold (the router's `Encode` call, then
  the fetch). Text before the image differs per request, so no prefix cache helps either.
- `text_ttft_p99_image_burst`: text-only requests at a steady rate while bursts of image requests
  (new images) arrive, the same seeded schedule on two clusters of two worker processes each: 1
  encode + 1 colocated worker (images encoded in the encode pool) against 2 colocated workers (each
  encodes the images of its own requests). The p99 of the text requests' TTFT. With
  `--long-prefill-token-threshold N` every worker of both clusters caps long prompts at N tokens a
  step and admits short ones past them (worker/scheduler.py): once a burst's embeddings are in, its
  image prompts otherwise fill whole steps of the serving worker, and a text prompt arriving then
  waits for all of them. `--long-prefill-chunk-tokens` and `--prioritize-short-prefills` shorten
  the steps a text prompt waits for and its own (docs/engine-performance.md); the engine's
  defaults (all off) are the benchmark's.
`--quick` runs a few requests of each kind (the test runs it end to end for the structure only).
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.report import Result, median, percentile, render, write_json
from kvweave.defaults import REGISTRY_LEASE_S


@dataclass
class EPDBenchConfig:
    model: str | None = None
    """An Idefics3 folder; None: a SmolVLM-256M-shaped one with random weights (benchmarks/vlm_checkpoint.py)."""
    image_size: tuple[int, int] = (512, 384)
    """Width, height of the images."""
    reps: int = 5
    """Requests of each kind for `ttft_embedding_cache`."""
    text_requests: int = 100
    """Enough that the p99 is not simply the slowest one (it was, with 40: two runs gave 5.8x and 1.8x)."""
    text_interval_s: float = 0.4
    """One text request every this many seconds."""
    bursts: int = 4
    burst_images: int = 3
    """Image requests per burst; bursts are spread evenly over the text requests' span."""
    max_tokens: int = 4
    threads_per_worker: int = 1
    dtype: str = "auto"
    dram_cache_gb: float = 0.5
    num_blocks: int = 1024
    long_prefill_token_threshold: int = 0
    """Every worker's --long-prefill-token-threshold (0: off, the engine's default)."""
    long_prefill_chunk_tokens: int = 0
    """Every worker's --long-prefill-chunk-tokens (with a threshold; 0: the threshold)."""
    prioritize_short_prefills: bool = False
    """Every worker's --prioritize-short-prefills (with a threshold)."""
    seed: int = 0

    def engine_args(self) -> dict:
        args = {"num_threads": self.threads_per_worker, "dtype": self.dtype, "dram_cache_gb": self.dram_cache_gb,
                "num_blocks": self.num_blocks, "long_prefill_token_threshold": self.long_prefill_token_threshold,
                "long_prefill_chunk_tokens": self.long_prefill_chunk_tokens,
                "prioritize_short_prefills": self.prioritize_short_prefills}
        return args | ({} if self.model else {"load_format": "dummy"})


QUICK = {"reps": 2, "text_requests": 6, "text_interval_s": 0.2, "bursts": 1, "burst_images": 2, "max_tokens": 2}


def make_image(size: tuple[int, int], seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def image_messages(png: bytes, n: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": f"Request {n}: what does this picture show?"},
                                         {"type": "image", "data": png}]}]


def text_messages(n: int) -> list[dict]:
    return [{"role": "user", "content": f"Request {n}: name three colours of the rainbow and one animal."}]


async def timed(client, messages: list[dict], max_tokens: int) -> tuple[float, object]:
    """(TTFT in seconds, the usage) of one chat request through the router."""
    t0, ttft, usage = time.perf_counter(), None, None
    async for delta in client.generate(messages=messages, max_tokens=max_tokens, temperature=0.0, ignore_eos=True):
        if ttft is None and delta.token_ids:
            ttft = time.perf_counter() - t0
        usage = delta.usage or usage
    return ttft, usage


async def encode_on(cluster, worker_id: str, pngs: list[bytes]) -> list[str]:
    """Have one encode worker encode `pngs` directly (its Encode call); their sources."""
    from kvweave import cluster_secret
    from kvweave.v1 import worker_pb2, worker_pb2_grpc

    async with cluster_secret.insecure_channel(cluster.worker_addresses[worker_id], secret=cluster.secret) as ch:
        resp = await worker_pb2_grpc.WorkerStub(ch).Encode(worker_pb2.EncodeRequest(images=pngs), timeout=600)
    return list(resp.sources)


async def warm_up(client, config: EPDBenchConfig, seed: int) -> None:
    """One text and one image request per worker's first steps (kernels, allocations), untimed."""
    for i in range(2):
        await timed(client, text_messages(-1 - i), config.max_tokens)
        await timed(client, image_messages(make_image(config.image_size, seed + i), -1 - i), config.max_tokens)


async def embedding_cache_run(cluster, config: EPDBenchConfig) -> dict:
    import kvweave

    cold, cached, sources = [], [], {"cold": [], "cached": []}
    async with kvweave.AsyncClient(cluster.grpc_target, timeout=900) as client:
        await warm_up(client, config, config.seed + 10_000)
        for i in range(config.reps):
            ttft, usage = await timed(client, image_messages(make_image(config.image_size, config.seed + 2 * i), 2 * i),
                                      config.max_tokens)
            cold.append(ttft)
            sources["cold"].append(_sources(usage))
            png = make_image(config.image_size, config.seed + 2 * i + 1)
            await encode_on(cluster, "encode-0", [png])
            ttft, usage = await timed(client, image_messages(png, 2 * i + 1), config.max_tokens)
            cached.append(ttft)
            sources["cached"].append(_sources(usage))
    return {"cold_ttft_s": cold, "cached_ttft_s": cached, "image_sources": sources}


def _sources(usage) -> dict:
    return {"cached": usage.images_cached, "fetched": usage.images_fetched, "encoded": usage.images_encoded}


async def burst_run(cluster, config: EPDBenchConfig) -> dict:
    """Text requests every `text_interval_s`, image bursts spread over them; the TTFTs by kind."""
    import kvweave

    span = config.text_requests * config.text_interval_s
    bursts = [span * (b + 0.5) / config.bursts for b in range(config.bursts)]
    async with kvweave.AsyncClient(cluster.grpc_target, timeout=900) as client:
        await warm_up(client, config, config.seed + 20_000)
        start = time.perf_counter()

        async def at(t: float, messages: list[dict]) -> tuple[float, object]:
            await asyncio.sleep(max(0.0, start + t - time.perf_counter()))
            return await timed(client, messages, config.max_tokens)

        texts = [at(i * config.text_interval_s, text_messages(i)) for i in range(config.text_requests)]
        images = [at(t, image_messages(make_image(config.image_size, config.seed + 30_000 + b * 100 + k), 1000 + k))
                  for b, t in enumerate(bursts) for k in range(config.burst_images)]
        results = await asyncio.gather(*texts, *images)
    text, image = results[:len(texts)], results[len(texts):]
    return {"text_ttft_s": [t for t, _ in text], "image_ttft_s": [t for t, _ in image],
            "image_sources": [_sources(u) for _, u in image]}


def run_cluster(config: EPDBenchConfig, model: str, pools: dict, runs) -> list[dict]:
    from controlplane.cluster import LocalCluster
    from controlplane.cluster_config import heartbeat_s

    with LocalCluster(model=model, engine_args=config.engine_args(), startup_timeout=900, **pools) as cluster:
        # A worker lists its peers at each heartbeat: until then, one that registered after it (the
        # encode worker) is not a peer it fetches from, and its images would be encoded where served.
        time.sleep(2 * heartbeat_s(cluster.config.lease_s or REGISTRY_LEASE_S))
        return [asyncio.run(run(cluster, config)) for run in runs]


def run_bench(config: EPDBenchConfig, log=print) -> tuple[list[Result], dict]:
    with tempfile.TemporaryDirectory(prefix="kvweave-epd-") as tmp:
        model = config.model
        if model is None:
            from benchmarks.vlm_checkpoint import write_smolvlm_like

            model = str(write_smolvlm_like(Path(tmp) / "smolvlm-256m-shape"))
        log("1 encode + 1 colocated worker: embedding cache, then text under image bursts")
        cache, epd = run_cluster(config, model, {"workers": 1, "encode_workers": 1},
                                 [embedding_cache_run, burst_run])
        log("2 colocated workers: text under image bursts, images encoded where they are served")
        (colo,) = run_cluster(config, model, {"workers": 2}, [burst_run])
    results = [
        Result("ttft_embedding_cache", median(cache["cached_ttft_s"]) * 1000, "ms", "ttft_encoded_cold",
               median(cache["cold_ttft_s"]) * 1000, higher_is_better=False,
               extra={"requests_each": config.reps}),
        Result("text_ttft_p99_image_burst", percentile(epd["text_ttft_s"], 99) * 1000, "ms",
               "text_ttft_p99_encode_in_prefill_worker", percentile(colo["text_ttft_s"], 99) * 1000,
               higher_is_better=False,
               extra={"text_ttft_p50_ms": round(median(epd["text_ttft_s"]) * 1000, 1),
                      "baseline_text_ttft_p50_ms": round(median(colo["text_ttft_s"]) * 1000, 1),
                      "image_ttft_p50_ms": round(median(epd["image_ttft_s"]) * 1000, 1),
                      "baseline_image_ttft_p50_ms": round(median(colo["image_ttft_s"]) * 1000, 1)}),
    ]
    return results, {"embedding_cache": cache, "burst_encode_pool": epd, "burst_colocated": colo}


def add_parser(bsub: argparse._SubParsersAction) -> None:
    d = EPDBenchConfig()
    p = bsub.add_parser("epd", help="encode workers and the cluster-wide embedding cache (a SmolVLM-256M-shaped "
                                    "model): TTFT with a cached embedding, text TTFT under image bursts")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--model", default=None, help="an Idefics3 folder (default: SmolVLM-256M's shape, random weights)")
    p.add_argument("--quick", action="store_true", help="a few requests of each kind (checks the structure)")
    for name in ("reps", "text_requests", "bursts", "burst_images", "max_tokens", "threads_per_worker", "num_blocks",
                 "long_prefill_token_threshold", "long_prefill_chunk_tokens", "seed"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    p.add_argument("--text-interval-s", type=float, default=d.text_interval_s)
    p.add_argument("--dram-cache-gb", type=float, default=d.dram_cache_gb)
    p.add_argument("--dtype", default=d.dtype)
    p.add_argument("--prioritize-short-prefills", action="store_true",
                   help="every worker's --prioritize-short-prefills (with --long-prefill-token-threshold)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    given = {k: getattr(args, k) for k in EPDBenchConfig.__dataclass_fields__ if hasattr(args, k)}
    if args.quick:
        given |= QUICK
    config = EPDBenchConfig(**given)
    if min(config.reps, config.text_requests, config.bursts, config.burst_images, config.max_tokens) < 1 \
            or not config.text_interval_s > 0:
        print("error: --reps, --text-requests, --bursts, --burst-images and --max-tokens must be >= 1, "
              "--text-interval-s > 0", file=sys.stderr)
        return 2
    from worker.config import ConfigError
    from worker.scheduler import check_long_prefill

    try:
        check_long_prefill(config.long_prefill_token_threshold, 1, config.long_prefill_chunk_tokens,
                           config.prioritize_short_prefills)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results, details = run_bench(config, log=lambda m: print(m, file=sys.stderr, flush=True))
    cfg = asdict(config)
    print(render("epd", cfg, results))
    if args.json:
        write_json(args.json, "epd", {**cfg, "quick": args.quick, "runs": details}, results)
    return 0
