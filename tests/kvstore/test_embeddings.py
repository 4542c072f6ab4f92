"""Image embeddings stored as entries of the block layout: exact round trips through DRAM and SSD,
keys apart from block and chunk keys and from other images', a missing entry meaning a miss."""
from __future__ import annotations

import pytest
import torch

from kvstore.codec import KVLayout
from kvstore.embeddings import embedding_keys, load_embedding, pack_embedding, store_embedding, unpack_embedding
from kvstore.keys import chunk_block_keys, chunk_hash, embedding_entry_keys, embedding_key, hash_block
from kvstore.manager import StoreConfig, TierManager

LAYOUT = KVLayout(torch.float32, (2, 3, 2, 4, 8))  # 384 values per entry


def embeds(tokens: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn((tokens, dim), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def store(tmp_path):
    entry_gb = LAYOUT.nbytes / 2**30
    s = TierManager(LAYOUT, StoreConfig(dram_cache_gb=4 * entry_gb, ssd_cache_gb=64 * entry_gb,
                                        ssd_cache_dir=str(tmp_path)))
    yield s
    s.close()


def test_pack_pads_the_last_entry_and_unpacks_exactly():
    e = embeds(20, 40, 1)  # 800 values: 3 entries, the last with 32 values and zeros
    packed = pack_embedding(e, LAYOUT)
    assert len(packed) == 3 and all(p.shape == LAYOUT.shape for p in packed)
    assert torch.count_nonzero(packed[2].reshape(-1)[32:]) == 0
    assert torch.equal(unpack_embedding(packed, (20, 40)), e)
    assert torch.equal(unpack_embedding(torch.stack(packed), (20, 40)), e)


def test_round_trip_through_dram_and_ssd(store):
    a, b = embeds(20, 40, 1), embeds(6, 64, 2)  # 3 entries and 1
    ka, kb = embedding_key(b"\x01" * 32, b"m"), embedding_key(b"\x02" * 32, b"m")
    assert store_embedding(store, ka, a) and store_embedding(store, kb, b)
    assert [store.where(k) for k in embedding_keys(ka, (20, 40), LAYOUT)] == ["dram", "dram", "dram"]
    assert torch.equal(load_embedding(store, ka, (20, 40)), a)
    assert torch.equal(load_embedding(store, kb, (6, 64)), b)
    store.tiers[0].remove(embedding_keys(ka, (20, 40), LAYOUT)[1])
    assert load_embedding(store, ka, (20, 40)) is None  # one entry gone: a miss, never a partial embedding


def test_keys_are_apart_from_blocks_chunks_and_other_images():
    image, extra = b"\x07" * 32, b"model\x1fns"
    key = embedding_key(image, extra)
    assert key != embedding_key(image, b"model\x1fother") != embedding_key(b"\x08" + image[1:], extra)
    assert key != chunk_hash(list(image), extra) and key != hash_block(None, list(image), extra)
    entries = embedding_entry_keys(key, 800, 384)
    assert len(entries) == 3 and entries == chunk_block_keys(key, 800, 384)
    assert not set(entries) & set(chunk_block_keys(chunk_hash(list(image), extra), 800, 384))
