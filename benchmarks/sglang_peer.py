"""sglang-router as a peer of kvweave's routing policies: a trace replayed through the real router.

sglang-router (PyPI `sglang-router`, the `bench` extra; Rust, started here as its own CLI,
`python -m sglang_router.launch_router`) runs with policy `cache_aware` and its defaults in front
of `num_workers` fake workers: aiohttp servers on free loopback ports, all in this process, that
answer SGLang's `/health`, `/server_info`, `/model_info` and `/generate` and record which worker
got each request (`rid` in the body). No model runs.

Prompt text: sglang's cache_aware keeps an approximate radix tree of prompt *characters* per
worker, so requests carry text. Block id b of the trace becomes a fixed text of 512 words, one word
per token (`loadgen.traces.block_tokens(b, 512, 0, 4096)`, each token id written as 3 hex digits and
a space); a prompt is its blocks' texts in order, the last one cut to its token count. Equal
leading ids are equal leading text, different ids differ from their first characters on.

Other prompts (benchmarks/rag_replay.py's RAG requests) are sent as their own text.

Time and load: request i is sent at its trace timestamp divided by `speedup`; a fake worker holds
its answer for (uncached prompt tokens + output tokens) x ms_per_token / speedup, the uncached
tokens coming from the same cache model as kvweave's replay (benchmarks/cluster_sim.py's
`ClusterModel`, updated as requests arrive). So sglang's load counts (its in-flight
requests per worker) follow the simulated workers' running requests, compressed in time.
The recorded choices are then scored in trace order by the model that scores kvweave's policies
(`cluster_sim.replay`). `lateness` reports how far the sends fell behind their schedule.
"""
from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.cluster_sim import ClusterModel, SimConfig, SimRequest, SimResult
from benchmarks.mooncake_sim import sim_requests
from benchmarks.report import percentile
from controlplane.procs import LOCALHOST, free_port, spawn, stop_process_groups, tail
from loadgen.traces import MOONCAKE_BLOCK_TOKENS, MooncakeRecord, block_tokens

logger = logging.getLogger(__name__)

PACKAGE = "sglang-router"
MODULE = "sglang_router"
TOKEN_RANGE = 4096
"""Token ids per block are drawn from [0, TOKEN_RANGE): 3 hex digits a word."""
DEFAULT_SPEEDUP = 20.0


class PeerUnavailable(RuntimeError):
    """sglang-router cannot run here; the message says why."""


@dataclass(frozen=True)
class PeerConfig:
    speedup: float = DEFAULT_SPEEDUP
    """Trace time / wall time of the replay."""
    policy: str = "cache_aware"
    router_args: tuple[str, ...] = ()
    """More sglang-router flags (its defaults otherwise)."""
    startup_timeout_s: float = 60.0
    replays: int = 1
    """Replays per row (hit_rate_vs_sglang): sglang-router's choices depend on the replay's timing
    (its load counts), so its hit rate on one window moves by up to a few percent between replays;
    the row's baseline is their mean."""

    def __post_init__(self) -> None:
        if self.speedup <= 0 or self.replays < 1:
            raise ValueError("speedup and replays must be positive")


@dataclass
class PeerRun:
    choices: list[int]
    """Worker index per request, in trace order."""
    version: str
    wall_s: float
    lateness_ms: dict[str, float] = field(default_factory=dict)
    """p50/p99/max of how late sends were, in trace milliseconds."""
    reordered: int = 0
    """Requests that reached a worker before one sent earlier (the online cache saw them out of order)."""


def version() -> str:
    """The installed sglang-router's version; PeerUnavailable when it is not installed."""
    if importlib.util.find_spec(MODULE) is None:
        raise PeerUnavailable(f"{PACKAGE} is not installed (pip install -e '.[bench]', or make setup)")
    return importlib.metadata.version(PACKAGE)


# ---------------------------------------------------------------------- prompt text

class PromptTexts:
    """The text of trace prompts, one fixed text per block id (kept while the replay runs)."""

    def __init__(self, block_size: int = MOONCAKE_BLOCK_TOKENS) -> None:
        self.block_size = block_size
        self._blocks: dict[int, str] = {}

    def block(self, hash_id: int) -> str:
        text = self._blocks.get(hash_id)
        if text is None:
            tokens = block_tokens(hash_id, self.block_size, 0, TOKEN_RANGE)
            text = self._blocks[hash_id] = "".join(f"{t:03x} " for t in tokens)
        return text

    def prompt(self, r: MooncakeRecord) -> str:
        """`r`'s text: its blocks' texts, the last cut to the tokens it holds (4 characters a token)."""
        parts = [self.block(h) for h in r.hash_ids]
        last_tokens = r.input_length - self.block_size * (len(parts) - 1)
        if parts and last_tokens < self.block_size:
            parts[-1] = parts[-1][:4 * last_tokens]
        return "".join(parts)


# ---------------------------------------------------------------------- fake workers

class FakeWorkers:
    """`cfg.num_workers` SGLang-like HTTP servers that record who got each request and hold each
    answer for its simulated duration (see the module docstring)."""

    def __init__(self, requests: Sequence[SimRequest], cfg: SimConfig, speedup: float) -> None:
        self.requests, self.cfg, self.speedup = requests, cfg, speedup
        self.model, self._scratch = ClusterModel(cfg), SimResult("online", 0, 0)
        self.choices: list[int | None] = [None] * len(requests)
        self.arrivals: list[int] = []
        self.ports: list[int] = []
        self._runners = []

    @property
    def urls(self) -> list[str]:
        return [f"http://{LOCALHOST}:{p}" for p in self.ports]

    async def start(self) -> None:
        from aiohttp import web

        logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)  # sglang probes for gRPC (HTTP/2)
        for w in range(self.cfg.num_workers):
            app = web.Application(client_max_size=1 << 30)
            app.router.add_post("/generate", self._generate_handler(w))
            app.router.add_route("GET", "/{tail:.*}", self._info)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            port = free_port()
            await web.TCPSite(runner, LOCALHOST, port).start()
            self._runners.append(runner)
            self.ports.append(port)

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()

    async def _info(self, request):
        from aiohttp import web

        if request.path.endswith("model_info"):
            return web.json_response({"is_generation": True})
        if request.path.endswith("server_info"):
            return web.json_response({"dp_size": 1})
        return web.json_response({})

    def _generate_handler(self, w: int):
        from aiohttp import web

        async def generate(request):
            body = await request.json()
            i = int(body["rid"])
            seconds = self.arrive(i, w)
            await asyncio.sleep(seconds)
            r = self.requests[i]
            return web.json_response({"text": "", "meta_info": {
                "id": body["rid"], "prompt_tokens": r.input_length, "completion_tokens": r.output_length,
                "finish_reason": {"type": "length", "length": r.output_length}}})

        return generate

    def arrive(self, i: int, w: int) -> float:
        """Request `i` reached worker `w`: record it, update `w`'s cache; seconds to hold the answer."""
        assert self.choices[i] is None, f"request {i} arrived twice"
        self.choices[i] = w
        self.arrivals.append(i)
        r = self.requests[i]
        uncached = self.model.credit(r, self.model.outcome(w, r), self._scratch)
        self.model.place(r.timestamp_s * 1000.0, w, r, uncached)
        return (uncached + r.output_length) * self.cfg.ms_per_token / 1000.0 / self.speedup


# ---------------------------------------------------------------------- the router

class SglangRouter:
    """sglang-router's CLI in its own process group, on a free loopback port, its log kept."""

    def __init__(self, worker_urls: list[str], peer: PeerConfig, log_path: Path) -> None:
        self.port, self.log_path, self.peer = free_port(), log_path, peer
        self.command = [sys.executable, "-m", f"{MODULE}.launch_router", "--host", LOCALHOST,
                        "--port", str(self.port), "--policy", peer.policy, "--worker-urls", *worker_urls,
                        "--log-level", "warn", "--prometheus-host", LOCALHOST, "--prometheus-port", str(free_port()),
                        *peer.router_args]  # its metrics port, fixed by default, on a free one: runs can overlap
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    async def start(self, session, num_workers: int) -> None:
        """Start it and wait until it lists every worker as healthy."""
        self.proc = spawn(self.command, self.log_path)
        deadline = time.monotonic() + self.peer.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PeerUnavailable(f"sglang-router exited with {self.proc.returncode} while starting; "
                                      f"{self.log_path}:\n{tail(self.log_path, 8)}")
            if await self._num_healthy(session) >= num_workers:
                return
            await asyncio.sleep(0.2)
        raise PeerUnavailable(f"sglang-router did not list {num_workers} healthy workers within "
                              f"{self.peer.startup_timeout_s:.0f} s; {self.log_path}:\n{tail(self.log_path, 8)}")

    async def _num_healthy(self, session) -> int:
        try:
            async with session.get(f"{self.url}/workers") as resp:
                if resp.status != 200:
                    return 0
                doc = await resp.json()
        except (OSError, ValueError, asyncio.TimeoutError):
            return 0
        except Exception as e:  # aiohttp's ClientError and the like while it starts
            logger.debug("sglang-router not ready: %s", e)
            return 0
        workers = doc.get("workers", doc) if isinstance(doc, dict) else doc
        return sum(1 for x in workers if isinstance(x, dict) and x.get("is_healthy", True))

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_groups([self.proc], timeout=10)
            self.proc = None


# ---------------------------------------------------------------------- the replay

async def _replay(requests: Sequence[SimRequest], prompts: Sequence[str], cfg: SimConfig, peer: PeerConfig,
                  log_dir: Path) -> PeerRun:
    import aiohttp

    workers = FakeWorkers(requests, cfg, peer.speedup)
    await workers.start()
    router = SglangRouter(workers.urls, peer, log_dir / "sglang-router.log")
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
            await router.start(session, cfg.num_workers)
            late = []

            async def send(i: int, r: SimRequest) -> None:
                body = {"text": prompts[i], "rid": str(i),
                        "sampling_params": {"max_new_tokens": r.output_length}, "stream": False}
                async with session.post(f"{router.url}/generate", json=body) as resp:
                    if resp.status != 200:
                        raise PeerUnavailable(f"sglang-router answered {resp.status} to request {i}: "
                                              f"{(await resp.text())[:200]}")
                    await resp.read()

            t0, first = time.perf_counter(), requests[0].timestamp_s if requests else 0.0
            tasks = []
            for i, r in enumerate(requests):
                due = (r.timestamp_s - first) / peer.speedup
                delay = due - (time.perf_counter() - t0)
                if delay > 0:
                    await asyncio.sleep(delay)
                late.append(max(0.0, time.perf_counter() - t0 - due) * peer.speedup * 1000.0)
                tasks.append(asyncio.create_task(send(i, r)))
            await asyncio.gather(*tasks)
            wall = time.perf_counter() - t0
    finally:
        router.stop()
        await workers.stop()
    missing = [i for i, w in enumerate(workers.choices) if w is None]
    assert not missing, f"requests {missing[:5]} reached no worker"
    reordered = sum(1 for a, b in zip(workers.arrivals, workers.arrivals[1:]) if b < a)
    return PeerRun(list(workers.choices), version(), round(wall, 2),
                   {"p50": round(percentile(late, 50), 1), "p99": round(percentile(late, 99), 1),
                    "max": round(max(late, default=0.0), 1)}, reordered)


def replay(requests: Sequence[MooncakeRecord], cfg: SimConfig, peer: PeerConfig = PeerConfig(),
           log_dir: str | Path | None = None, texts: PromptTexts | None = None) -> PeerRun:
    """Replay Mooncake `requests` through sglang-router in front of fake workers; its choice per request.
    PeerUnavailable when sglang-router is not installed or does not start (the message says why)."""
    version()
    texts = texts or PromptTexts(cfg.block_size)
    return replay_prompts(sim_requests(requests), [texts.prompt(r) for r in requests], cfg, peer, log_dir)


def replay_prompts(requests: Sequence[SimRequest], prompts: Sequence[str], cfg: SimConfig,
                   peer: PeerConfig = PeerConfig(), log_dir: str | Path | None = None) -> PeerRun:
    """Replay `requests`, request i as the text `prompts[i]`, through sglang-router in front of fake
    workers; its choice per request. PeerUnavailable as `replay`."""
    version()
    if log_dir is not None:
        return asyncio.run(_replay(requests, prompts, cfg, peer, Path(log_dir)))
    with tempfile.TemporaryDirectory(prefix="kvweave-sglang-") as tmp:
        return asyncio.run(_replay(requests, prompts, cfg, peer, Path(tmp)))
