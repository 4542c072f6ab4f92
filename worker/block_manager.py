"""Paged KV block manager with prefix caching (the device tier of the KV store).

Blocks hold `block_size` tokens of KV for every layer. A request owns a block table (a list of
blocks); full blocks are identified by the chained hash of `kvstore.keys` and stay findable in
`cached_blocks` after their request ends, until the block is reused for something else. Free
blocks sit in an LRU queue (an intrusive doubly linked list with sentinels, as in vLLM v1): a
request frees its blocks tail first, so the tail of a prompt is evicted before its shared head.
What the cache holds is reported as KV events (stored / removed), taken by `take_events`.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from kvstore.events import BlockRemoved, BlockStored
from kvstore.keys import BlockHash, hash_blocks

logger = logging.getLogger(__name__)


class Block:
    __slots__ = ("block_id", "ref_cnt", "block_hash", "depth", "prev", "next")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None
        self.depth = 0
        """Index of the block in the prompt it was cached for (deeper blocks cost more to recompute)."""
        self.prev: Block | None = None
        self.next: Block | None = None

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref_cnt={self.ref_cnt})"


class FreeBlockQueue:
    """Doubly linked list of free blocks in eviction order (head is evicted first)."""

    def __init__(self, blocks: list[Block]) -> None:
        self.head, self.tail = Block(-1), Block(-1)
        self.head.next, self.tail.prev = self.tail, self.head
        self.num_free = 0
        for b in blocks:
            self.append(b)

    def append(self, block: Block) -> None:
        last = self.tail.prev
        last.next, block.prev, block.next, self.tail.prev = block, last, self.tail, block
        self.num_free += 1

    def remove(self, block: Block) -> None:
        block.prev.next, block.next.prev = block.next, block.prev
        block.prev = block.next = None
        self.num_free -= 1

    def popleft(self) -> Block:
        assert self.num_free > 0, "no free block"
        block = self.head.next
        self.remove(block)
        return block

    def block_ids(self) -> list[int]:
        ids, b = [], self.head.next
        while b is not self.tail:
            ids.append(b.block_id)
            b = b.next
        return ids


class BlockManager:
    """Owns block ids, ref counts and the prefix cache; knows nothing about tensors."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        assert num_blocks > 0 and block_size > 0
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached_blocks: dict[BlockHash, Block] = {}
        self.req_blocks: dict[str, list[Block]] = {}
        self.req_hashes: dict[str, list[BlockHash]] = {}
        self.req_num_cached: dict[str, int] = {}
        self.events: list[BlockStored | BlockRemoved] = []
        self.on_evict: Callable[[Block], None] | None = None
        """Called with a cached block just before it is reused for something else (its KV still intact)."""

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def block_hashes(self, req_id: str, token_ids: list[int], extra: bytes,
                     known: list[BlockHash] | None = None) -> list[BlockHash]:
        """The hashes of the request's full blocks, extended incrementally as tokens arrive
        (`known`: leading hashes computed before, e.g. while the request waited)."""
        hashes = self.req_hashes.get(req_id)
        if hashes is None:
            hashes = self.req_hashes[req_id] = list(known or ())
        n_full = len(token_ids) // self.block_size
        if len(hashes) < n_full:
            parent = hashes[-1] if hashes else None
            hashes.extend(hash_blocks(token_ids[: n_full * self.block_size], self.block_size, extra,
                                      parent=parent, start_block=len(hashes)))
        return hashes

    def get_computed_blocks(self, req_id: str, token_ids: list[int], extra: bytes,
                            known: list[BlockHash] | None = None) -> tuple[list[Block], int]:
        """Longest run of leading cached blocks; at least one token is always left to compute."""
        if not self.enable_prefix_caching:
            return [], 0
        hits: list[Block] = []
        max_blocks = (len(token_ids) - 1) // self.block_size
        for h in self.block_hashes(req_id, token_ids, extra, known)[:max_blocks]:
            block = self.cached_blocks.get(h)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def allocate_slots(self, req_id: str, num_tokens: int, computed_blocks: list[Block] | None = None) -> bool:
        """Make room for the request to hold `num_tokens` tokens in total.

        `computed_blocks` are prefix-cache hits taken on first allocation. Returns False (and
        changes nothing) when there are not enough free blocks.
        """
        blocks = self.req_blocks.get(req_id, [])
        computed_blocks = computed_blocks or []
        num_needed = -(-num_tokens // self.block_size) - len(blocks) - len(computed_blocks)
        num_evictable_hits = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if num_needed > self.num_free_blocks - num_evictable_hits:
            return False
        for b in computed_blocks:
            if b.ref_cnt == 0:
                self.free_queue.remove(b)
            b.ref_cnt += 1
        blocks = self.req_blocks.setdefault(req_id, blocks)
        blocks.extend(computed_blocks)
        for _ in range(max(num_needed, 0)):
            blocks.append(self._take_free_block())
        if computed_blocks:
            self.req_num_cached[req_id] = len(computed_blocks)
        return True

    def _take_free_block(self) -> Block:
        block = self.free_queue.popleft()
        if block.block_hash is not None:
            if self.on_evict is not None:
                self.on_evict(block)
            del self.cached_blocks[block.block_hash]
            self.events.append(BlockRemoved([block.block_hash]))
            block.block_hash = None
        block.ref_cnt = 1
        return block

    def cache_full_blocks(self, req_id: str, token_ids: list[int], num_computed_tokens: int, extra: bytes
                          ) -> list[Block]:
        """Register the request's newly computed full blocks in the prefix cache; returns them."""
        if not self.enable_prefix_caching:
            return []
        blocks = self.req_blocks[req_id]
        start = self.req_num_cached.get(req_id, 0)
        end = num_computed_tokens // self.block_size
        if end <= start:
            return []
        cached: list[Block] = []
        hashes = self.block_hashes(req_id, token_ids, extra)
        run: list[BlockHash] = []  # one BlockStored per contiguous run of newly cached blocks
        for i in range(start, end):
            block, h = blocks[i], hashes[i]
            if block.block_hash is None and h not in self.cached_blocks:
                block.block_hash = h
                block.depth = i
                self.cached_blocks[h] = block
                cached.append(block)
                if not run:
                    parent = hashes[i - 1] if i else None
                run.append(h)
            elif run:
                self.events.append(BlockStored(run, parent))
                run = []
        if run:
            self.events.append(BlockStored(run, parent))
        self.req_num_cached[req_id] = end
        return cached

    def free(self, req_id: str) -> None:
        """Release the request's blocks, tail first so that shared heads are evicted last."""
        for block in reversed(self.req_blocks.pop(req_id, [])):
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0
            if block.ref_cnt == 0:
                self.free_queue.append(block)
        self.req_hashes.pop(req_id, None)
        self.req_num_cached.pop(req_id, None)

    def hold(self, block_ids: list[int]) -> None:
        """One more reference to each block (a KV connector job reading or writing it)."""
        for i in block_ids:
            block = self.blocks[i]
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def release(self, block_ids: list[int]) -> None:
        """Drop a `hold`; a block nobody references goes back to the free queue (most recent last)."""
        for i in block_ids:
            block = self.blocks[i]
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def touch(self, block: Block) -> None:
        """A cached block was used: an unreferenced one moves to the back of the eviction queue."""
        if block.ref_cnt == 0 and block.prev is not None:
            self.free_queue.remove(block)
            self.free_queue.append(block)

    def cache_free_block(self, block_hash: BlockHash, depth: int = 0) -> Block | None:
        """Take a free block (evicting its old content) and cache it under `block_hash`, unreferenced
        and most recently used; the caller writes its KV. None when every block is in use."""
        if self.num_free_blocks == 0:
            return None
        block = self._take_free_block()
        block.ref_cnt, block.block_hash, block.depth = 0, block_hash, depth
        self.cached_blocks[block_hash] = block
        self.free_queue.append(block)
        self.events.append(BlockStored([block_hash], None))
        return block

    def uncache(self, block_hash: BlockHash) -> bool:
        """Forget a cached block (its KV is no longer trusted or wanted)."""
        block = self.cached_blocks.pop(block_hash, None)
        if block is None:
            return False
        block.block_hash = None
        self.events.append(BlockRemoved([block_hash]))
        return True

    def get_blocks(self, req_id: str) -> list[Block]:
        return self.req_blocks.get(req_id, [])

    def get_block_table(self, req_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(req_id, [])]

    def reset_prefix_cache(self) -> None:
        for h, block in list(self.cached_blocks.items()):
            block.block_hash = None
        if self.cached_blocks:
            self.events.append(BlockRemoved(list(self.cached_blocks)))
        self.cached_blocks.clear()

    def take_events(self) -> list[BlockStored | BlockRemoved]:
        events, self.events = self.events, []
        return events
