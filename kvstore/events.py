"""KV events: what a worker's tiers gained, lost or served, for the Redis index (kvstore.index).

The block manager emits them for the device tier, the tier manager for DRAM and SSD; the worker
drains both and writes them in batches. `parent_hash` links a run of stored prefix blocks to the
block before it (None when unknown or for chunks).
"""
from __future__ import annotations

from dataclasses import dataclass

from kvstore.keys import BlockHash


@dataclass(slots=True)
class BlockStored:
    block_hashes: list[BlockHash]
    parent_hash: BlockHash | None
    medium: str = "device"


@dataclass(slots=True)
class BlockRemoved:
    block_hashes: list[BlockHash]
    medium: str = "device"


@dataclass(slots=True)
class BlockTouched:
    """Entries that were just used (the index refreshes their last access)."""

    block_hashes: list[BlockHash]
    medium: str = "device"
