"""The KV connector, worker role: moves KV between the device cache, the host tiers and requests'
staged KV, off the engine thread.

- `DeviceTier`: the block manager's prefix cache and the KV tensor seen through the tier
  interface of kvstore/tier.py (one entry = one block, all layers: [2, n_layers, n_kv_heads,
  block_size, head_dim]). Its eviction order is the block manager's free queue (LRU); an evicted
  block is only dropped (it was written through to the host tiers when it was cached).
- `KVConnectorWorker`: `start_load_kv` hands each step's jobs (worker/scheduler_output.py) to one
  copy thread (a copy stream's place on a GPU): loads of staged or host-tier blocks into a waiting
  request's blocks, then the placement of its chunk-caches (keys re-rotated); batched write-through
  of newly cached blocks; chunk saves. `get_finished` reports what finished; the scheduler role
  held every block a job touches until then. A block that cannot be loaded (damaged, gone) ends
  the run; the rest is computed.
- export (for a peer, on the engine thread between steps), snapshots, the measured per-token
  costs of each source, and the prefix-cache statistics.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from kvstore.chunks import load_chunk, store_chunk
from kvstore.codec import KVLayout
from kvstore.index import DEFAULT_COSTS_MS
from kvstore.keys import BlockHash, chunk_hash
from kvstore.manager import TierManager
from kvstore.tier import KVTier, TierStats
from kvstore.transfer_source import empty_layer_major
from worker.attention import slot_mapping
from worker.block_manager import Block, BlockManager
from worker.chunk_kv import place_chunk_, rebased_chunk
from worker.kv_connector import PrefixStats
from worker.request import Request
from worker.scheduler_output import (KVConnectorMetadata, KVConnectorOutput, LoadJob, LoadResult,
                                     SaveBlocksJob, SaveChunkJob)

logger = logging.getLogger(__name__)

COST_EMA = 0.2


def block_layout(kv_cache: torch.Tensor, block_size: int) -> KVLayout:
    _, n_layers, n_kv_heads, _, head_dim = kv_cache.shape
    return KVLayout(kv_cache.dtype, (2, n_layers, n_kv_heads, block_size, head_dim))


@dataclass
class StagedKV:
    """KV read for a request before it entered the engine (by worker/kv_prefetch.py)."""

    blocks: dict[bytes, tuple[torch.Tensor, str]] = field(default_factory=dict)
    """Block hash -> (KV of one block, source)."""
    chunks: dict[int, torch.Tensor] = field(default_factory=dict)
    """Chunk index -> the chunk-cache [2, L, H, n, D] (keys for positions 0..n-1)."""


def stage_local_chunks(store: TierManager | None, req: Request, staged: StagedKV, block_size: int) -> int:
    """Stage the chunk-caches the local host tiers hold for the request's chunks; returns how many."""
    req.kv.chunks_looked_up = True
    if store is None:
        return 0
    found = 0
    for i, (s, n) in enumerate(req.chunk_spans):
        if i in staged.chunks:
            continue
        kv = load_chunk(store, chunk_hash(req.prompt_token_ids[s:s + n], req.cache_extra), n, block_size)
        if kv is not None:
            staged.chunks[i] = kv
            found += 1
    return found


class DeviceTier(KVTier):
    name = "device"

    def __init__(self, block_manager: BlockManager, kv_cache: torch.Tensor) -> None:
        self.bm, self.kv_cache = block_manager, kv_cache
        self.block_size = block_manager.block_size
        self.layout = block_layout(kv_cache, self.block_size)
        self.on_evict = None
        self.stats = TierStats()
        block_manager.on_evict = self._evicted

    @property
    def capacity(self) -> int:
        return self.bm.num_blocks

    def __len__(self) -> int:
        return len(self.bm.cached_blocks)

    def view(self, block_id: int) -> torch.Tensor:
        """The block's KV in place (a strided view of the cache)."""
        s = block_id * self.block_size
        return self.kv_cache[:, :, :, s:s + self.block_size]

    def _evicted(self, block: Block) -> None:
        self.stats.evictions += 1
        if self.on_evict is not None:  # the engine sets none: blocks were written through when cached
            try:
                self.on_evict(block.block_hash, self.view(block.block_id))
            except Exception:  # a hook must not stop the eviction
                logger.exception("device tier: eviction hook failed for %s", block.block_hash.hex())
        if self.on_drop is not None:
            self.on_drop(block.block_hash)

    def contains(self, key: bytes) -> bool:
        return key in self.bm.cached_blocks

    def keys(self) -> list[bytes]:
        return list(self.bm.cached_blocks)

    def put(self, key: bytes, value: torch.Tensor, cost: float = 1.0) -> bool:
        """Write a block into a free block and cache it (evictable, most recently used)."""
        self._check_value(value)
        if key in self.bm.cached_blocks:
            self.bm.touch(self.bm.cached_blocks[key])
            return True
        block = self.bm.cache_free_block(BlockHash(key))
        if block is None:
            return False
        self.view(block.block_id).copy_(value)
        self.stats.puts += 1
        return True

    def get(self, key: bytes, out: torch.Tensor | None = None) -> torch.Tensor | None:
        if out is not None:
            self._check_value(out)
        block = self.bm.cached_blocks.get(key)
        if block is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        self.bm.touch(block)
        view = self.view(block.block_id)
        return out.copy_(view) if out is not None else view.clone(memory_format=torch.contiguous_format)

    def remove(self, key: bytes) -> bool:
        removed = self.bm.uncache(BlockHash(key))
        if removed and self.on_drop is not None:
            self.on_drop(key)
        return removed


class KVConnectorWorker:
    def __init__(self, block_manager: BlockManager, kv_cache: torch.Tensor, store: TierManager | None,
                 inv_freq: torch.Tensor, stats: PrefixStats | None = None) -> None:
        self.bm, self.kv_cache, self.store = block_manager, kv_cache, store
        self.block_size = block_manager.block_size
        self.inv_freq = inv_freq
        self.device = DeviceTier(block_manager, kv_cache)
        self.layout = self.device.layout
        self.stats = stats or PrefixStats()
        self.costs_ms = dict(DEFAULT_COSTS_MS)
        """Measured ms per token of each source and of recompute (moving averages), for the router."""
        self.handoff_block: Callable[[bytes], int | None] = lambda key: None
        """The device block a handoff key names (worker/kv_handoff.py; set by the engine)."""
        self._staged: dict[str, StagedKV] = {}
        self._inflight: list[tuple[str, object, Future]] = []
        self._done = threading.Event()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvweave-kv-copy")

    def record_cost(self, source: str, seconds: float, tokens: int) -> None:
        """Fold one measurement into the per-token cost of `source` (a lost update from another
        thread only delays the average)."""
        if tokens > 0:
            old = self.costs_ms.get(source, seconds * 1000 / tokens)
            self.costs_ms[source] = (1 - COST_EMA) * old + COST_EMA * seconds * 1000 / tokens

    # ------------------------------------------------------------------ jobs

    def stage(self, req_id: str, staged: StagedKV) -> None:
        """Take over the KV staged for a request that enters the engine."""
        if staged.blocks or staged.chunks:
            self._staged[req_id] = staged

    def start_load_kv(self, meta: KVConnectorMetadata) -> None:
        """Start this step's jobs on the copy thread (in order: loads, block saves, chunk saves)."""
        for job in meta.loads:
            staged = self._staged.get(job.req_id) or StagedKV()
            self._submit("load", job, self._load, job, staged)
        if meta.saves:
            self._submit("save", meta.saves, self._save_blocks, meta.saves)
        for job in meta.chunk_saves:
            self._submit("chunk", job, self._save_chunk, job)
        for req_id in meta.finished_req_ids:
            self._staged.pop(req_id, None)

    def _submit(self, kind: str, job, fn, *args) -> None:
        future = self._pool.submit(fn, *args)
        future.add_done_callback(lambda _: self._done.set())
        self._inflight.append((kind, job, future))

    def wait(self, timeout: float) -> None:
        """Block until some job finishes (or `timeout` seconds): the engine has nothing else to do."""
        if self._inflight and not any(f.done() for _, _, f in self._inflight):
            self._done.clear()
            if not any(f.done() for _, _, f in self._inflight):
                self._done.wait(timeout)

    def get_finished(self) -> KVConnectorOutput:
        out = KVConnectorOutput()
        still = []
        for kind, job, future in self._inflight:
            if not future.done():
                still.append((kind, job, future))
                continue
            try:
                result = future.result()
            except Exception:  # a failed copy only means the KV is computed (or not kept)
                logger.exception("KV connector: %s job failed", kind)
                result = None
            if kind == "load":
                out.loads[job.req_id] = result or LoadResult(0, placed=False)
            elif kind == "save":
                out.saved_blocks.extend(j.block_ids for j in job)
            else:
                out.saved_chunks.append((job.key, job.block_ids, bool(result)))
        self._inflight = still
        return out

    # ------------------------------------------------------------------ on the copy thread

    def _slots(self, block_ids: list[int], positions: torch.Tensor) -> torch.Tensor:
        table = torch.tensor(block_ids, dtype=torch.long, device=self.kv_cache.device)
        return slot_mapping(table, positions.to(self.kv_cache.device), self.block_size)

    def _load(self, job: LoadJob, staged: StagedKV) -> LoadResult:
        count = len(job.block_hashes)
        views = [self.device.view(b) for b in job.block_ids[job.first_block:job.first_block + count]]
        sources: list[str | None] = [None] * count
        from_store: list[int] = []
        for j, h in enumerate(job.block_hashes):
            item = staged.blocks.pop(h, None)
            if item is not None:
                views[j].copy_(item[0])
                sources[j] = item[1]
            else:
                from_store.append(j)
        if from_store and self.store is not None:
            t0 = time.perf_counter()
            loaded = self.store.load_many([job.block_hashes[j] for j in from_store], [views[j] for j in from_store])
            seconds = time.perf_counter() - t0
            per_source: dict[str, int] = {}
            for j, (value, source) in zip(from_store, loaded):
                if value is not None:
                    sources[j] = source
                    per_source[source] = per_source.get(source, 0) + 1
            for source, n in per_source.items():  # split the batch's time by blocks
                self.record_cost(source, seconds * n / len(from_store), n * self.block_size)
        n = 0
        while n < count and sources[n] is not None:
            n += 1
        result = LoadResult(n)
        for s in sources[:n]:
            result.sources[s] = result.sources.get(s, 0) + 1
        for p in job.place:
            kv = staged.chunks.get(p.chunk_index)
            if kv is None or kv.shape[3] != p.num_tokens:
                result.placed = False
                break
            slots = self._slots(job.block_ids, torch.arange(p.start, p.start + p.num_tokens))
            place_chunk_(self.kv_cache, kv, slots, p.start, self.inv_freq)
        return result

    def _save_blocks(self, jobs: list[SaveBlocksJob]) -> None:
        keys = [h for j in jobs for h in j.block_hashes]
        values = [self.device.view(b) for j in jobs for b in j.block_ids]
        costs = [c for j in jobs for c in j.costs]
        self.store.offload_many(keys, values, costs)

    def _save_chunk(self, job: SaveChunkJob) -> bool:
        first = job.first_block * self.block_size  # block_ids[0] holds this position
        slots = self._slots(job.block_ids, torch.arange(job.start - first, job.start - first + job.num_tokens))
        kv = rebased_chunk(self.kv_cache, slots, job.start, self.inv_freq)
        return store_chunk(self.store, job.key, kv, self.block_size, cost=float(job.num_tokens))

    # ------------------------------------------------------------------ peers, snapshots

    def export(self, keys: Sequence[bytes], on_device: bool = False) -> torch.Tensor | None:
        """[n, *layout.shape]: the leading `keys` this worker holds in any tier, or as blocks of a
        handoff it holds (engine thread), stored layer-major so that the transfer sends each layer
        in place; in host memory, or `on_device` in the KV cache's device memory."""
        held = 0
        while held < len(keys) and (self.handoff_block(keys[held]) is not None or self.device.contains(keys[held])
                                    or (self.store is not None and self.store.contains(keys[held]))):
            held += 1
        if not held:
            return None
        out = empty_layer_major(held, self.layout, self.kv_cache.device if on_device else None)
        n = 0
        for key in keys[:held]:
            block = self.handoff_block(key)
            if block is not None:
                out[n].copy_(self.device.view(block))
            elif self.device.get(key, out[n]) is None:
                value = None if self.store is None else self.store.load(key, None if on_device else out[n])[0]
                if value is None:
                    break
                if on_device:  # the tiers read into host memory
                    out[n].copy_(value)
            n += 1
        return out[:n] if n else None

    def export_blocks(self, block_ids: Sequence[int], on_device: bool = False) -> torch.Tensor:
        """[n, *layout.shape]: copies of device blocks (layer-major; in host memory, or `on_device`
        in the KV cache's device memory), from any thread: the caller makes sure nothing writes
        them meanwhile (a pinned handoff, worker/kv_handoff.py)."""
        out = empty_layer_major(len(block_ids), self.layout, self.kv_cache.device if on_device else None)
        for i, block in enumerate(block_ids):
            out[i].copy_(self.device.view(block))
        return out

    def take_events(self) -> list:
        return self.store.take_events() if self.store is not None else []

    def snapshot(self) -> dict[str, list[bytes]]:
        """Every key each tier holds, by medium."""
        snap = {"device": self.device.keys()}
        if self.store is not None:
            for tier in self.store.tiers:
                snap[tier.name] = tier.keys()
        return snap

    def close(self) -> None:
        self._pool.shutdown(wait=True)
