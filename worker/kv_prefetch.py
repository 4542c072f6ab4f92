"""Stage a request's reusable KV before it enters the engine: from SSD, and from peer workers.

Runs in the worker's event loop for each request, before the engine queues it (so the engine
thread never waits on disk or network; other requests keep running meanwhile):
1. the prompt's full blocks are hashed with the engine's chain; the leading run already on the
   device is skipped (read without a lock: at worst a block just evicted is recomputed);
2. the following blocks held in the host tiers: those only on SSD are read in a thread and staged
   on the request (DRAM blocks are copied at admission, a memcpy);
3. the blocks after that: the KV index says which peers hold them (one Redis round trip); the
   peer with the longest leading run sends them over kvstore.transfer (layer by layer, verified)
   and they are staged too.
The engine copies staged blocks into the request's blocks when it admits it (worker/kv_connector.py).
A failed read or transfer only means those blocks are computed: the request itself never fails
here.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from kvstore.index import KVIndex
from kvstore.keys import hash_blocks
from kvstore.transfer import TransferClient, TransferError
from worker.engine import LLMEngine
from worker.request import Request

logger = logging.getLogger(__name__)


@dataclass
class PrefetchStats:
    ssd_blocks: int = 0
    peer_blocks: int = 0
    peer_bytes: int = 0
    peer_seconds: float = 0.0
    peer_failures: int = 0


class KVPrefetcher:
    def __init__(self, engine: LLMEngine, index: KVIndex | None = None,
                 peers: Callable[[], dict[str, str]] | None = None, client: TransferClient | None = None,
                 timeout_s: float = 5.0) -> None:
        """`peers()`: worker id -> address of the other workers serving this model."""
        self.engine = engine
        self.index, self.peers = index, peers
        self.client = client or TransferClient()
        self.timeout_s = timeout_s
        self.stats = PrefetchStats()

    async def __call__(self, req: Request) -> None:
        try:
            await self._prefetch(req)
        except Exception:  # staging is an optimization: never fail the request for it
            logger.exception("KV prefetch for %s failed; its blocks will be computed", req.req_id)

    async def _prefetch(self, req: Request) -> None:
        engine = self.engine
        if not engine.block_manager.enable_prefix_caching:
            return
        bs = engine.config.block_size
        n_blocks = (req.num_prompt_tokens - 1) // bs  # at least one token is always computed
        if n_blocks <= 0:
            return
        hashes = req.block_hashes = hash_blocks(req.prompt_token_ids[:n_blocks * bs], bs, req.cache_extra)
        cached = engine.block_manager.cached_blocks
        i = 0
        while i < n_blocks and hashes[i] in cached:
            i += 1
        store = engine.store
        on_ssd = []
        while store is not None and i < n_blocks:
            where = store.where(hashes[i])
            if where is None:
                break
            if where == "ssd":
                on_ssd.append(hashes[i])
            i += 1
        if on_ssd:
            t0 = time.perf_counter()
            await asyncio.to_thread(self._read_host, req, on_ssd)
            engine.connector.record_cost("ssd", time.perf_counter() - t0, len(on_ssd) * bs)
        if i < n_blocks and self.index is not None and self.peers is not None:
            await self._fetch_from_peers(req, hashes[i:])

    def _read_host(self, req: Request, keys: list[bytes]) -> None:
        for key, (value, source) in zip(keys, self.engine.store.load_many(keys)):
            if value is None:
                return
            req.kv_staged[key] = (value, source)
            self.stats.ssd_blocks += 1

    async def _fetch_from_peers(self, req: Request, keys: list[bytes]) -> None:
        peers = self.peers()
        if not peers:
            return
        located = await self.index.locate(keys, list(peers))
        runs: dict[str, int] = dict.fromkeys(peers, 0)
        for w in peers:
            n = 0
            for holders in located:
                if not any(loc.worker_id == w for loc in holders):
                    break
                n += 1
            runs[w] = n
        best = max(runs, key=runs.get)
        n = runs[best]
        if n == 0:
            return
        t0 = time.perf_counter()
        try:
            kv = await self.client.fetch_kv(peers[best], keys[:n], self.engine.connector.layout, self.timeout_s)
        except (TransferError, ValueError) as e:
            self.stats.peer_failures += 1
            logger.warning("request %s: fetching %d KV blocks from %s failed, computing them instead: %s",
                           req.req_id, n, best, e)
            return
        seconds = time.perf_counter() - t0
        self.stats.peer_seconds += seconds
        if kv.shape[0]:
            self.engine.connector.record_cost("peer", seconds, kv.shape[0] * self.engine.config.block_size)
        self.stats.peer_blocks += kv.shape[0]
        self.stats.peer_bytes += kv.numel() * kv.element_size()
        for key, value in zip(keys, kv):
            req.kv_staged[key] = (value, "peer")
        logger.debug("request %s: %d KV blocks from %s in %.1f ms", req.req_id, kv.shape[0], best,
                     (time.perf_counter() - t0) * 1000)
