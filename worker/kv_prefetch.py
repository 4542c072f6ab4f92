"""Stage a request's reusable KV before it enters the engine: from SSD, and from peer workers.

Runs in the worker's event loop for each request, before the engine queues it (so the engine
thread never waits on disk or network; other requests keep running meanwhile), after the request's
image embeddings are staged (worker/embedding_stage.py):
1. the prompt's full blocks are hashed with the engine's chain; the leading run already on the
   device is skipped (read without a lock: at worst a block just evicted is recomputed);
2. the following blocks held in the host tiers: those only on SSD are read in a thread and staged
   on the request (DRAM blocks are copied at admission, a memcpy);
3. the blocks after that: the KV index says which peers hold them (one Redis round trip); the
   peer with the longest leading run sends them over kvstore.transfer (layer by layer, verified)
   and they are staged too;
4. the request's reusable chunks (`Request.chunk_spans`): the chunk-caches the local host tiers hold
   are read in a thread; for the chunks still missing, the index says which peers hold all of a
   chunk's entries (one Redis round trip for every chunk), and each chosen peer sends the entries
   of all the chunks it serves in one transfer. They are staged too, and blended in at admission
   (worker/chunk_blend.py).
A request that continues a prefill handoff (worker/kv_handoff.py) instead pulls the blocks of the
handle it lacks on the device straight from the prefill worker, by the handle's keys, and then
tells that worker to release them (a release that fails is left to the handoff's TTL). The router
may start that pull early (`start_pull`, with the prefill's early handle): the blocks are then
fetched as the prefill worker computes them, and the request waits only for the last ones.
What is staged (`StagedKV`) is handed to the engine with the request; the KV connector copies it into
the request's blocks when it admits it (worker/kv_connector_worker.py).
A failed read or transfer only means those blocks (or chunks) are computed: the request itself
never fails here. Each transfer from a peer (its bytes and time, or its failure) is also reported to
the worker's metrics (worker/metrics.py) when it has them.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvstore.chunks import join_chunk
from kvstore.index import CHUNK_MEDIUMS, KVIndex
from kvstore.keys import chunk_block_keys, chunk_hash, hash_blocks
from kvstore.transfer_client import TransferClient, TransferError
from worker.embedding_stage import EmbeddingStager
from worker.engine import LLMEngine
from worker.kv_connector_worker import StagedKV, stage_local_chunks
from worker.kv_handoff import Handoff
from worker.metrics import WorkerMetrics
from worker.request import Request

logger = logging.getLogger(__name__)


PULL_POLL_S = 0.02
"""An early pull that found no new block waits this long before asking again (doubling, up to
PULL_MAX_WAIT_S, while nothing new comes)."""
PULL_MAX_WAIT_S = 0.5


@dataclass(eq=False)
class _Pull:
    """A handoff being pulled: the blocks arrived so far, by key."""

    handoff: Handoff
    first: int
    """Index of the first block pulled (the ones before it are on this worker's device)."""
    blocks: dict[bytes, torch.Tensor] = field(default_factory=dict)
    next: int = 0
    nbytes: int = 0
    complete: bool = False
    """The request with the complete handle is here: every block is held there."""
    task: asyncio.Future | None = None

    def __post_init__(self) -> None:
        self.next = self.first


@dataclass
class PrefetchStats:
    ssd_blocks: int = 0
    peer_blocks: int = 0
    peer_bytes: int = 0
    peer_seconds: float = 0.0
    peer_failures: int = 0
    chunk_local: int = 0
    """Chunk-caches staged from this worker's host tiers."""
    chunk_peer: int = 0
    """Chunk-caches fetched from peers."""
    handoff_blocks: int = 0
    """Blocks of prefill handoffs pulled."""
    handoff_failures: int = 0
    handoff_early_blocks: int = 0
    """Of those, the blocks that had arrived (pulled as the prefill worker computed them) when their
    request came."""


class KVPrefetcher:
    def __init__(self, engine: LLMEngine, index: KVIndex | None = None,
                 peers: Callable[[], dict[str, str]] | None = None, client: TransferClient | None = None,
                 timeout_s: float = 5.0, metrics: WorkerMetrics | None = None) -> None:
        """`peers()`: worker id -> address of the other workers serving this model."""
        self.engine = engine
        self.index, self.peers = index, peers
        self.client = client or TransferClient()
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.stats = PrefetchStats()
        self.embeddings = EmbeddingStager(engine, index, peers, self.client, timeout_s, metrics) \
            if engine.images is not None else None
        """Stages the embeddings of a request's images (worker/embedding_stage.py)."""
        self._releases: set[asyncio.Task] = set()
        self._pulls: dict[str, _Pull] = {}
        """Handoff id -> its early pull (started by `start_pull`), until a request claims it."""

    async def __call__(self, req: Request) -> StagedKV:
        if req.images is not None:  # needed, unlike the KV: a failure here (a bad image) fails the request
            await self.embeddings.stage(req)
        staged = StagedKV()
        try:
            await self._prefetch(req, staged)
        except Exception:  # staging is an optimization: never fail the request for it
            logger.exception("KV prefetch for %s failed; its blocks will be computed", req.req_id)
        return staged

    async def _prefetch(self, req: Request, staged: StagedKV) -> None:
        if req.handoff is not None:
            await self._pull_handoff(req, staged)
            return
        if not self.engine.block_manager.enable_prefix_caching:
            return
        covered = await self._stage_blocks(req, staged)
        if req.chunk_spans:
            await self._stage_chunks(req, staged, covered)

    async def _stage_blocks(self, req: Request, staged: StagedKV) -> int:
        """Stage the prompt's prefix blocks; returns how many leading prompt tokens they (and the
        device's cache) are expected to cover."""
        engine = self.engine
        bs = engine.config.block_size
        n_blocks = (req.num_prompt_tokens - 1) // bs  # at least one token is always computed
        if n_blocks <= 0:
            return 0
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
            await asyncio.to_thread(self._read_host, staged, on_ssd)
            engine.connector.record_cost("ssd", time.perf_counter() - t0, len(on_ssd) * bs)
        if i < n_blocks and self.index is not None and self.peers is not None:
            i += await self._fetch_from_peers(req, staged, hashes[i:])
        return i * bs

    def start_pull(self, h: Handoff, first_block: int = 0) -> bool:
        """Start pulling the blocks of a prefill in progress (its early handle) from `first_block` on,
        as the prefill worker computes them; the request that comes with the complete handle takes
        what arrived. False when this handoff is already being pulled or the handle is unusable."""
        if h.handoff_id in self._pulls or not h.source_address or not 0 <= first_block <= len(h.block_keys):
            return False
        pull = _Pull(h, first_block)
        pull.task = asyncio.ensure_future(self._pull(pull))
        pull.task.add_done_callback(_retrieve)  # a failure is seen by the request that claims it, or by nobody
        self._pulls[h.handoff_id] = pull
        # Not claimed by a request within the handoff's TTL (the router sent it elsewhere): dropped.
        asyncio.get_running_loop().call_later(max(h.ttl_s, self.timeout_s) * 2, self._forget, h.handoff_id, pull)
        return True

    def close(self) -> None:
        """Stop the early pulls nobody claimed."""
        for pull in self._pulls.values():
            pull.task.cancel()
        self._pulls.clear()

    def _forget(self, handoff_id: str, pull: "_Pull") -> None:
        if self._pulls.get(handoff_id) is pull:
            del self._pulls[handoff_id]
            pull.task.cancel()

    async def _pull(self, pull: "_Pull") -> None:
        """Fetch the handoff's blocks as they become available, until all arrived (or the prefill
        worker stops answering, or makes no progress within the transfer timeout)."""
        h, layout = pull.handoff, self.engine.connector.layout
        idle_since, wait = time.perf_counter(), PULL_POLL_S
        while pull.next < len(h.block_keys):
            keys = list(h.block_keys[pull.next:])
            kv = await self.client.fetch_kv(h.source_address, keys, layout, self.timeout_s)
            for key, value in zip(keys, kv):
                pull.blocks[key] = value
            pull.next += kv.shape[0]
            pull.nbytes += kv.numel() * kv.element_size()
            if kv.shape[0]:
                idle_since, wait = time.perf_counter(), PULL_POLL_S
            elif pull.complete or time.perf_counter() - idle_since > h.ttl_s:
                return  # the complete handle's blocks are all held: the rest is gone (expired, released)
            else:  # not computed yet (the prompt may still be queued there): ask again, less and less often
                await asyncio.sleep(wait)
                wait = min(wait * 2, PULL_MAX_WAIT_S)

    async def _pull_handoff(self, req: Request, staged: StagedKV) -> None:
        """Stage the handoff's blocks past the leading run already on the device: what an early pull
        got, and the rest now."""
        h, engine = req.handoff, self.engine
        bs = engine.config.block_size
        first = 0
        if engine.block_manager.enable_prefix_caching:
            full = h.num_tokens // bs
            hashes = hash_blocks(req.prompt_token_ids[:full * bs], bs, req.cache_extra)
            cached = engine.block_manager.cached_blocks
            while first < full and hashes[first] in cached:
                first += 1
        t0 = time.perf_counter()
        pull = self._pulls.pop(h.handoff_id, None)
        if pull is None or pull.first > first:
            if pull is not None:
                pull.task.cancel()
            pull = _Pull(h, first)
        elif pull.next < first:  # an early pull from before the run this worker holds: skip to its end
            pull.task.cancel()
            pull.task, pull.first, pull.next = None, first, first
        pull.complete = True
        self.stats.handoff_early_blocks += pull.next - pull.first
        if pull.task is None or pull.task.done():  # none yet, or it stopped early: go on from where it got
            pull.task = asyncio.ensure_future(self._pull(pull))
        failure = None
        try:
            await asyncio.wait_for(asyncio.shield(pull.task), self.timeout_s)
        except (TransferError, ValueError, asyncio.TimeoutError) as e:
            pull.task.cancel()
            failure = e
        seconds = time.perf_counter() - t0
        keys = h.block_keys[first:]
        n = 0
        while n < len(keys) and keys[n] in pull.blocks:
            staged.blocks[keys[n]] = (pull.blocks[keys[n]], "handoff")
            n += 1
        self.stats.handoff_blocks += n
        if n and failure is None:
            engine.connector.record_cost("peer", seconds, min(n * bs, h.num_tokens - first * bs))
        result = "complete" if n == len(keys) else "partial" if n else "failed"
        if result == "failed":
            self.stats.handoff_failures += 1
        if self.metrics is not None:
            self.metrics.handoff_pulled(result, pull.nbytes, seconds)
        if n < len(keys):
            logger.warning("request %s: %d of the %d blocks of its handoff arrived from %s (%s); the rest is computed "
                           "here", req.req_id, n, len(keys), h.source_worker_id or h.source_address,
                           failure or "released or expired there")
        self._release(h)

    def _release(self, h) -> None:
        """Tell the prefill worker to free the handoff's blocks, without waiting for the answer."""
        task = asyncio.ensure_future(self.client.release(h.source_address, h.handoff_id, self.timeout_s))
        self._releases.add(task)
        task.add_done_callback(self._released)

    def _released(self, task: asyncio.Task) -> None:
        self._releases.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("releasing a handoff failed (its TTL frees it): %s", task.exception())

    def _read_host(self, staged: StagedKV, keys: list[bytes]) -> None:
        for key, (value, source) in zip(keys, self.engine.store.load_many(keys)):
            if value is None:
                return
            staged.blocks[key] = (value, source)
            self.stats.ssd_blocks += 1

    async def _fetch_from_peers(self, req: Request, staged: StagedKV, keys: list[bytes]) -> int:
        """Stage the leading run of `keys` the best peer holds; returns how many were staged."""
        peers = self.peers()
        if not peers:
            return 0
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
            return 0
        t0 = time.perf_counter()
        try:
            kv = await self.client.fetch_kv(peers[best], keys[:n], self.engine.connector.layout, self.timeout_s)
        except (TransferError, ValueError) as e:
            self._failed()
            logger.warning("request %s: fetching %d KV blocks from %s failed, computing them instead: %s",
                           req.req_id, n, best, e)
            return 0
        seconds = time.perf_counter() - t0
        self._fetched(kv, seconds)
        if kv.shape[0]:
            self.engine.connector.record_cost("peer", seconds, kv.shape[0] * self.engine.config.block_size)
        self.stats.peer_blocks += kv.shape[0]
        for key, value in zip(keys, kv):
            staged.blocks[key] = (value, "peer")
        logger.debug("request %s: %d KV blocks from %s in %.1f ms", req.req_id, kv.shape[0], best,
                     (time.perf_counter() - t0) * 1000)
        return kv.shape[0]

    def _fetched(self, kv, seconds: float) -> None:
        nbytes = kv.numel() * kv.element_size()
        self.stats.peer_bytes += nbytes
        self.stats.peer_seconds += seconds
        if self.metrics is not None:
            self.metrics.kv_transferred("in", nbytes, seconds)

    def _failed(self) -> None:
        self.stats.peer_failures += 1
        if self.metrics is not None:
            self.metrics.kv_transfer_failed()

    # ------------------------------------------------------------------ chunk-caches

    async def _stage_chunks(self, req: Request, staged: StagedKV, covered: int) -> None:
        """Stage the request's chunk-caches: the local host tiers' first, then the peers' for the
        chunks still missing that start at or after `covered` (earlier ones are prefix-cached)."""
        bs = self.engine.config.block_size
        self.stats.chunk_local += await asyncio.to_thread(stage_local_chunks, self.engine.store, req, staged, bs)
        missing = [i for i, (s, _) in enumerate(req.chunk_spans) if i not in staged.chunks and s >= covered]
        if missing and self.index is not None and self.peers is not None:
            await self._fetch_chunks_from_peers(req, staged, missing)

    async def _fetch_chunks_from_peers(self, req: Request, staged: StagedKV, missing: list[int]) -> None:
        peers = self.peers()
        if not peers:
            return
        bs = self.engine.config.block_size
        keys: dict[int, list[bytes]] = {}
        for i in missing:
            s, n = req.chunk_spans[i]
            keys[i] = chunk_block_keys(chunk_hash(req.prompt_token_ids[s:s + n], req.cache_extra), n, bs)
        holders: dict[int, set[str]] = await self.index.holders(keys, list(peers), CHUNK_MEDIUMS)
        # Each chunk from the peer that holds the most of them: as few transfers as possible.
        count = {w: sum(w in h for h in holders.values()) for w in peers}
        plan: dict[str, list[int]] = {}
        for i, held in holders.items():
            plan.setdefault(max(sorted(held), key=count.get), []).append(i)
        await asyncio.gather(*(self._fetch_chunks(req, staged, w, peers[w], chunks, keys) for w, chunks in plan.items()))

    async def _fetch_chunks(self, req: Request, staged: StagedKV, worker: str, address: str, chunks: list[int],
                            keys: dict[int, list[bytes]]) -> None:
        """One transfer of every entry of `chunks` from one peer; stages the chunks it got whole."""
        flat = [k for i in chunks for k in keys[i]]
        t0 = time.perf_counter()
        try:
            kv = await self.client.fetch_kv(address, flat, self.engine.connector.layout, self.timeout_s)
        except (TransferError, ValueError) as e:
            self._failed()
            logger.warning("request %s: fetching %d chunk-caches from %s failed, computing them instead: %s",
                           req.req_id, len(chunks), worker, e)
            return
        seconds = time.perf_counter() - t0
        self._fetched(kv, seconds)
        at, tokens = 0, 0
        for i in chunks:
            m = len(keys[i])
            if at + m > kv.shape[0]:  # the peer no longer holds all of it (leading entries only)
                break
            n = req.chunk_spans[i][1]
            staged.chunks[i] = join_chunk(kv[at:at + m], n)
            self.stats.chunk_peer += 1
            tokens += n
            at += m
        if tokens:
            self.engine.connector.record_cost("peer", seconds, tokens)
        logger.debug("request %s: %d of %d chunk-caches from %s in %.1f ms", req.req_id,
                     sum(i in staged.chunks for i in chunks), len(chunks), worker, seconds * 1000)


def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()
