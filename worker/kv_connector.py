"""The KV connector, scheduler role (vLLM v1's two-role connector): what can be loaded, and the jobs.

The scheduler asks how many of a waiting request's tokens are available outside the device
(prefix blocks staged on it by the prefetcher, or held in a host tier: `get_num_new_matched_tokens`),
and after allocating blocks records what to load and which chunk-caches to place
(`update_state_after_alloc`); the request then waits (WAITING_FOR_KV) while the worker role
(worker/kv_connector_worker.py) copies off the engine thread, and comes back through
`update_connector_output`. Full blocks are written through to the host tiers as soon as they are
cached (`on_blocks_cached`), so an eviction only drops a block; chunks a request computed are
saved the same way (`save_chunk`). Every job holds its blocks (one extra reference) until the
worker reports it finished, so no block is reused while it is read or written. No tensors, no I/O.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from kvstore.events import BlockTouched
from worker.block_manager import Block, BlockManager
from worker.chunk_blend import BlendPlan, ChunkSave
from worker.request import Request
from worker.scheduler_output import (KVConnectorMetadata, KVConnectorOutput, LoadJob, LoadResult, PlaceJob,
                                     SaveBlocksJob, SaveChunkJob)

SOURCES = ("device", "dram", "ssd", "peer", "handoff")


@dataclass
class PrefixStats:
    query_tokens: int = 0
    """Prompt tokens looked up at first admission."""
    hit_tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCES, 0))
    """Of those, served from each source instead of computed."""


class KVConnector:
    def __init__(self, block_manager: BlockManager, store_contains: Callable[[bytes], bool] | None = None,
                 attention_cost_len: int = 0, stats: PrefixStats | None = None) -> None:
        """`store_contains(key)`: whether a host tier holds an entry (None: no host tiers)."""
        self.bm, self.store_contains = block_manager, store_contains
        self.block_size = block_manager.block_size
        self.attention_cost_len = attention_cost_len
        self.stats = stats or PrefixStats()
        self._meta = KVConnectorMetadata()
        self._loading: dict[str, list[int]] = {}
        """Request -> blocks its unfinished load holds."""
        self._num_jobs = 0

    @property
    def has_pending(self) -> bool:
        """Jobs recorded or in flight."""
        return self._num_jobs > 0 or self._meta.has_jobs

    def block_cost(self, index: int) -> float:
        """Recompute cost of block `index` of a prompt (deeper blocks attend to more context)."""
        bs, L = self.block_size, self.attention_cost_len
        return bs * (1 + (index * bs + bs / 2) / L) if L else float(bs)

    # ------------------------------------------------------------------ loads

    def get_num_new_matched_tokens(self, req: Request, num_computed_blocks: int, max_blocks: int | None = None
                                   ) -> int:
        """Tokens past the device hit (whole blocks, at most `max_blocks` in all, the prompt's last
        token never included) that are staged on the request or held in a host tier. A request
        that continues a prefill handoff gets every prompt token its pulled blocks cover (the last
        block partial): its first output token is already known."""
        if req.handoff is not None:
            return self._handoff_tokens(req, num_computed_blocks)
        hashes = self.bm.req_hashes.get(req.req_id, ())
        max_blocks = min((req.num_tokens - 1) // self.block_size, len(hashes),
                         max_blocks if max_blocks is not None else len(hashes))
        n = num_computed_blocks
        while n < max_blocks and (hashes[n] in req.kv.staged_blocks
                                  or (self.store_contains is not None and self.store_contains(hashes[n]))):
            n += 1
        return (n - num_computed_blocks) * self.block_size

    def _handoff_tokens(self, req: Request, num_computed_blocks: int) -> int:
        keys, staged = req.handoff.block_keys, req.kv.staged_blocks
        n = num_computed_blocks
        while n < len(keys) and keys[n] in staged:
            n += 1
        return max(0, min(n * self.block_size, req.handoff.num_tokens) - num_computed_blocks * self.block_size)

    def update_state_after_alloc(self, req: Request, num_computed_tokens: int, num_external_tokens: int,
                                 plan: BlendPlan | None) -> None:
        """Record the load of the request's external blocks and the placement of its blend's chunks
        into the blocks just allocated to it."""
        first = num_computed_tokens // self.block_size
        count = -(-num_external_tokens // self.block_size)  # a handoff's last block may be partial
        blocks = self.bm.req_blocks[req.req_id]
        place = [PlaceJob(p.index, p.start, p.num_tokens) for p in plan.placed] if plan is not None else []
        keys = req.handoff.block_keys if req.handoff is not None else self.bm.req_hashes[req.req_id]
        job = LoadJob(req.req_id, [b.block_id for b in blocks], first, list(keys[first:first + count]), place)
        self._meta.loads.append(job)
        self._loading[req.req_id] = self._hold(blocks)

    def record_admission(self, req: Request, num_device_tokens: int) -> None:
        """Count a request's first admission; its device hits refresh their last access in the index."""
        self.stats.query_tokens += req.num_prompt_tokens
        self.stats.hit_tokens["device"] += num_device_tokens
        if num_device_tokens:
            hashes = self.bm.req_hashes.get(req.req_id, [])[:num_device_tokens // self.block_size]
            self.bm.events.append(BlockTouched(list(hashes)))

    # ------------------------------------------------------------------ saves

    def on_blocks_cached(self, blocks: list[Block]) -> None:
        """Write newly cached full blocks through to the host tiers (those they do not hold yet)."""
        if self.store_contains is None:
            return
        fresh = [b for b in blocks if not self.store_contains(b.block_hash)]
        if fresh:
            self._hold(fresh)
            self._meta.saves.append(SaveBlocksJob([b.block_id for b in fresh], [b.block_hash for b in fresh],
                                                  [self.block_cost(b.depth) for b in fresh]))

    def save_chunk(self, req: Request, save: ChunkSave) -> None:
        bs = self.block_size
        first, last = save.start // bs, (save.start + save.num_tokens - 1) // bs
        blocks = self.bm.req_blocks[req.req_id][first:last + 1]
        self._hold(blocks)
        self._meta.chunk_saves.append(SaveChunkJob(save.key, [b.block_id for b in blocks], first, save.start,
                                                   save.num_tokens))

    def request_finished(self, req_id: str) -> None:
        self._meta.finished_req_ids.append(req_id)

    # ------------------------------------------------------------------ the worker role's side

    def build_connector_meta(self) -> KVConnectorMetadata:
        meta, self._meta = self._meta, KVConnectorMetadata()
        self._num_jobs += len(meta.loads) + len(meta.saves) + len(meta.chunk_saves)
        return meta

    def update_connector_output(self, out: KVConnectorOutput) -> dict[str, LoadResult]:
        """Release the holds of finished jobs; returns the finished loads by request."""
        for req_id in out.loads:
            self._release(self._loading.pop(req_id, []))
        for block_ids in out.saved_blocks:
            self._release(block_ids)
        for _, block_ids, _ in out.saved_chunks:
            self._release(block_ids)
        self._num_jobs -= len(out.loads) + len(out.saved_blocks) + len(out.saved_chunks)
        return out.loads

    def _hold(self, blocks: list[Block]) -> list[int]:
        ids = [b.block_id for b in blocks]
        self.bm.hold(ids)
        return ids

    def _release(self, block_ids: list[int]) -> None:
        self.bm.release(block_ids)
