"""Image embeddings in the tiered store: an encoder output packed into entries of the block layout.

An image's encoder output [tiles * image_seq_len, dim] (the model's dtype, the same as its KV) is
flattened and cut into ceil(values / entry values) entries of the tiers' layout, the last one
zero-padded, so the same slots, eviction, KV events, index and transfer servers serve blocks,
chunk-caches and embeddings alike. Entry i has the key BLAKE2b(embedding key, i), where the
embedding key (`kvstore.keys.embedding_key`, torch-free so the router computes it) commits to the
image's content hash, the model, the namespace and the cluster salt under a seed of its own. The
shape is known to whoever asks (it follows from the image header and the model config), so
nothing else is stored.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from kvstore.codec import KVLayout
from kvstore.keys import embedding_entry_keys
from kvstore.manager import TierManager


def entry_values(layout: KVLayout) -> int:
    return layout.nbytes // layout.dtype.itemsize


def embedding_keys(key: bytes, shape: tuple[int, int], layout: KVLayout) -> list[bytes]:
    """Keys of the entries that hold an embedding of `shape` [tokens, dim]."""
    return embedding_entry_keys(key, shape[0] * shape[1], entry_values(layout))


def pack_embedding(embeds: torch.Tensor, layout: KVLayout) -> list[torch.Tensor]:
    """[tokens, dim] -> entries of `layout` (the last zero-padded)."""
    assert embeds.dtype == layout.dtype, f"embeddings of {embeds.dtype} in entries of {layout.dtype}"
    flat, per = embeds.reshape(-1), entry_values(layout)
    n = -(-flat.numel() // per)
    packed = flat.new_zeros(n * per)
    packed[:flat.numel()] = flat
    return list(packed.view(n, *layout.shape))


def unpack_embedding(entries: Sequence[torch.Tensor] | torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Entries (a list, or a tensor [n, *entry shape]) -> the [tokens, dim] embedding they hold."""
    flat = torch.cat([e.reshape(-1) for e in entries])
    return flat[:shape[0] * shape[1]].view(shape).clone()


def store_embedding(store: TierManager, key: bytes, embeds: torch.Tensor, cost: float = 1.0) -> bool:
    """Keep an embedding [tokens, dim] in the store's fastest tier; False if not all of it fits."""
    entries = pack_embedding(embeds.cpu(), store.layout)
    keys = embedding_keys(key, tuple(embeds.shape), store.layout)
    return store.offload_many(keys, entries, [cost] * len(keys)) == len(keys)


def load_embedding(store: TierManager, key: bytes, shape: tuple[int, int]) -> torch.Tensor | None:
    """The embedding [tokens, dim] from whichever tiers hold its entries, or None when any is missing."""
    values = store.load_all(embedding_keys(key, shape, store.layout))
    return None if values is None else unpack_embedding(values, shape)
