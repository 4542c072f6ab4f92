"""Between the engine's paged KV cache (the device tier) and the host tiers and peers.

- `DeviceTier`: the block manager's prefix cache and the KV tensor seen through the tier
  interface of kvstore/tier.py (one entry = one block, all layers: [2, n_layers, n_kv_heads,
  block_size, head_dim]). Its eviction order is the block manager's free queue (LRU).
- `KVConnector` (engine thread):
  - offload: a cached block the device evicts is copied into the host tiers first (demotion)
    instead of being lost;
  - onboard: when the scheduler admits a request, the leading blocks after its device prefix hit
    that are staged on the request (read from SSD or fetched from a peer while it waited, see
    worker/kv_prefetch.py) or held in a host tier are copied into its freshly allocated blocks,
    and count as computed; a block that cannot be loaded (damaged) ends the run and is recomputed;
  - export: the leading run of requested blocks this worker holds in any tier, for a peer;
  - prefix-cache statistics per tier (query tokens, hit tokens by device / dram / ssd / peer).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kvstore.codec import KVLayout
from kvstore.events import BlockTouched
from kvstore.index import DEFAULT_COSTS_MS
from kvstore.keys import BlockHash
from kvstore.manager import TierManager
from kvstore.transfer_source import empty_layer_major
from kvstore.tier import KVTier, TierStats
from worker.block_manager import Block, BlockManager
from worker.request import Request

logger = logging.getLogger(__name__)

SOURCES = ("device", "dram", "ssd", "peer")
COST_EMA = 0.2


@dataclass
class PrefixStats:
    query_tokens: int = 0
    """Prompt tokens looked up at first admission."""
    hit_tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCES, 0))
    """Of those, served from each source instead of computed."""


def block_layout(kv_cache: torch.Tensor, block_size: int) -> KVLayout:
    _, n_layers, n_kv_heads, _, head_dim = kv_cache.shape
    return KVLayout(kv_cache.dtype, (2, n_layers, n_kv_heads, block_size, head_dim))


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
        if self.on_evict is not None:
            try:
                self.on_evict(block.block_hash, self.view(block.block_id))
            except Exception:  # offloading is best effort; the engine must go on
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


class KVConnector:
    def __init__(self, block_manager: BlockManager, kv_cache: torch.Tensor, store: TierManager | None = None,
                 attention_cost_len: int = 0) -> None:
        self.bm, self.store = block_manager, store
        self.block_size = block_manager.block_size
        self.device = DeviceTier(block_manager, kv_cache)
        self.layout = self.device.layout
        self.attention_cost_len = attention_cost_len
        self.stats = PrefixStats()
        self.costs_ms = dict(DEFAULT_COSTS_MS)
        """Measured ms per token of each source and of recompute (moving averages), for the router."""
        if store is not None and store.tiers:
            self.device.on_evict = self._offload

    def block_cost(self, index: int) -> float:
        """Recompute cost of block `index` of a prompt (deeper blocks attend to more context)."""
        bs, L = self.block_size, self.attention_cost_len
        return bs * (1 + (index * bs + bs / 2) / L) if L else float(bs)

    def record_cost(self, source: str, seconds: float, tokens: int) -> None:
        """Fold one measurement into the per-token cost of `source` (thread-safe enough: a lost
        update only delays the average)."""
        if tokens > 0:
            old = self.costs_ms.get(source, seconds * 1000 / tokens)
            self.costs_ms[source] = (1 - COST_EMA) * old + COST_EMA * seconds * 1000 / tokens

    def _offload(self, key: bytes, value: torch.Tensor) -> None:
        block = self.bm.cached_blocks.get(key)
        depth = block.depth if block is not None else 0
        self.store.offload(key, value, self.block_cost(depth))

    # ------------------------------------------------------------------ admission (scheduler)

    def num_external_blocks(self, req: Request, start: int, max_blocks: int) -> int:
        """Leading blocks from `start` (< max_blocks) that are staged on the request or in a host tier."""
        hashes = self.bm.req_hashes.get(req.req_id, ())
        staged, store = req.kv_staged, self.store
        n = 0
        for i in range(start, min(max_blocks, len(hashes))):
            h = hashes[i]
            if h in staged or (store is not None and store.contains(h)):
                n += 1
            else:
                break
        return n

    def load_external(self, req: Request, start: int, count: int) -> int:
        """Copy blocks [start, start + count) into the request's blocks: staged ones from the request,
        the others with one batched read per host tier. Returns how many leading blocks loaded (a
        block that cannot be loaded ends the run; the rest are computed)."""
        hashes = self.bm.req_hashes[req.req_id]
        blocks = self.bm.req_blocks[req.req_id]
        sources: list[str | None] = [None] * count
        from_store: list[int] = []
        for j in range(count):
            item = req.kv_staged.pop(hashes[start + j], None)
            if item is not None:
                self.device.view(blocks[start + j].block_id).copy_(item[0])
                sources[j] = item[1]
            else:
                from_store.append(j)
        req.kv_staged.clear()
        if from_store and self.store is not None:
            t0 = time.perf_counter()
            loaded = self.store.load_many([hashes[start + j] for j in from_store],
                                          [self.device.view(blocks[start + j].block_id) for j in from_store])
            seconds = time.perf_counter() - t0
            per_source: dict[str, int] = {}
            for j, (value, source) in zip(from_store, loaded):
                sources[j] = source if value is not None else None
                if value is not None:
                    per_source[source] = per_source.get(source, 0) + 1
            for source, n in per_source.items():  # split the batch's time by blocks
                self.record_cost(source, seconds * n / len(from_store), n * self.block_size)
        n = 0
        while n < count and sources[n] is not None:
            blocks[start + n].depth = start + n
            self.stats.hit_tokens[sources[n]] += self.block_size
            n += 1
        return n

    def record_admission(self, req: Request, num_device_tokens: int) -> None:
        """Count a request's first admission; its device hits refresh their last access in the index."""
        self.stats.query_tokens += req.num_prompt_tokens
        self.stats.hit_tokens["device"] += num_device_tokens
        if num_device_tokens:
            hashes = self.bm.req_hashes.get(req.req_id, [])[:num_device_tokens // self.block_size]
            self.bm.events.append(BlockTouched(list(hashes)))

    # ------------------------------------------------------------------ peers

    def export(self, keys: Sequence[bytes]) -> torch.Tensor | None:
        """[n, *layout.shape]: the leading `keys` this worker holds in any tier (engine thread),
        stored layer-major so that the transfer sends each layer in place."""
        held = 0
        while held < len(keys) and (self.device.contains(keys[held])
                                    or (self.store is not None and self.store.contains(keys[held]))):
            held += 1
        if not held:
            return None
        out = empty_layer_major(held, self.layout)
        n = 0
        for key in keys[:held]:
            if self.device.get(key, out[n]) is None:
                if self.store is None or self.store.load(key, out[n])[0] is None:
                    break
            n += 1
        return out[:n] if n else None

    def take_events(self) -> list:
        return self.store.take_events() if self.store is not None else []

    def snapshot(self) -> dict[str, list[bytes]]:
        """Every key each tier holds, by medium."""
        snap = {"device": self.device.keys()}
        if self.store is not None:
            for tier in self.store.tiers:
                snap[tier.name] = tier.keys()
        return snap
