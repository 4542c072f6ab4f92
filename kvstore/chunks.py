"""Chunk-caches in the tiered store: the KV of a reusable chunk as block-sized entries.

A chunk of n tokens is stored as ceil(n / block_size) entries of the tiers' block layout
([2, n_layers, n_kv_heads, block_size, head_dim], the last one zero-padded), so the same slots,
eviction, index and transfer serve prefix blocks and chunks alike. Entry i of a chunk has the key
BLAKE2b(chunk hash, i): the chunk hash covers the chunk's token ids, the model and namespace
(extra keys) and the tokens it was computed after (empty for a standalone cache), so two caches
of the same text computed in different contexts never collide; n is known to whoever asks (it has
the token ids), so nothing else needs storing. The keys (`chunk_hash`, `chunk_block_keys`) are in
kvstore/keys.py with the block-hash chain, torch-free, so the router computes them too; this
module holds the tensors.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from kvstore.keys import chunk_block_keys
from kvstore.manager import TierManager


def split_chunk(kv: torch.Tensor, block_size: int) -> list[torch.Tensor]:
    """[2, L, H, n, D] -> ceil(n / block_size) blocks [2, L, H, block_size, D], the last zero-padded."""
    n = kv.shape[3]
    blocks = []
    for start in range(0, n, block_size):
        part = kv[:, :, :, start:start + block_size]
        if part.shape[3] < block_size:
            padded = kv.new_zeros((*kv.shape[:3], block_size, kv.shape[4]))
            padded[:, :, :, :part.shape[3]] = part
            part = padded
        blocks.append(part)
    return blocks


def join_chunk(blocks: Sequence[torch.Tensor], num_tokens: int) -> torch.Tensor:
    return torch.cat(list(blocks), dim=3)[:, :, :, :num_tokens].contiguous()


def store_chunk(store: TierManager, key: bytes, kv: torch.Tensor, block_size: int, cost: float = 1.0) -> bool:
    """Keep a chunk's KV [2, L, H, n, D] in the store's fastest tier; False if not all of it fits."""
    blocks = split_chunk(kv, block_size)
    keys = chunk_block_keys(key, kv.shape[3], block_size)
    return all([store.offload(k, b, cost) for k, b in zip(keys, blocks)])


def load_chunk(store: TierManager, key: bytes, num_tokens: int, block_size: int) -> torch.Tensor | None:
    """The chunk's KV [2, L, H, num_tokens, D] from whichever tiers hold its entries, or None when
    any entry is missing or damaged."""
    values = store.load_all(chunk_block_keys(key, num_tokens, block_size))
    return None if values is None else join_chunk(values, num_tokens)
