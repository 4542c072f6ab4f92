"""Chunk-caches stored as block-sized entries in the tiers: exact round trips through DRAM and SSD,
keys that separate contexts, and a missing piece meaning a miss."""
from __future__ import annotations

import pytest
import torch

from kvstore.chunks import load_chunk, store_chunk
from kvstore.keys import chunk_block_keys, chunk_hash
from kvstore.codec import KVLayout
from kvstore.manager import StoreConfig, TierManager

BS = 4
LAYOUT = KVLayout(torch.float32, (2, 3, 2, BS, 8))


def chunk_kv(n: int, seed: int) -> torch.Tensor:
    return torch.randn((2, 3, 2, n, 8), generator=torch.Generator().manual_seed(seed))


def entries(k: int) -> float:
    return k * LAYOUT.nbytes / 2**30


@pytest.fixture
def store(tmp_path):
    s = TierManager(LAYOUT, StoreConfig(dram_cache_gb=entries(4), ssd_cache_gb=entries(64) * 1.2,
                                        ssd_cache_dir=str(tmp_path)))
    yield s
    s.close()


def test_round_trip_exact_through_dram_and_ssd(store):
    a, b = chunk_kv(11, 1), chunk_kv(8, 2)  # 3 entries (the last padded) and 2
    ka, kb = chunk_hash(range(11), b"m"), chunk_hash(range(100, 108), b"m")
    assert store_chunk(store, ka, a, BS) and store_chunk(store, kb, b, BS)
    # DRAM holds 4 entries: a's first entry went on to SSD.
    assert [store.where(k) for k in chunk_block_keys(ka, 11, BS)] == ["ssd", "dram", "dram"]
    assert torch.equal(load_chunk(store, ka, 11, BS), a)
    assert torch.equal(load_chunk(store, kb, 8, BS), b)


def test_keys_separate_models_contexts_and_lengths():
    tokens = list(range(20))
    standalone = chunk_hash(tokens, b"model-a")
    assert standalone != chunk_hash(tokens, b"model-b")
    assert standalone != chunk_hash(tokens, b"model-a", context=[1, 2, 3])
    assert chunk_hash(tokens, b"model-a", context=[1, 2, 3]) != chunk_hash(tokens, b"model-a", context=[1, 2, 4])
    assert len(chunk_block_keys(standalone, 20, BS)) == 5 and len(set(chunk_block_keys(standalone, 20, BS))) == 5


def test_a_missing_piece_is_a_miss(store):
    kv = chunk_kv(9, 3)
    key = chunk_hash(range(9), b"m")
    store_chunk(store, key, kv, BS)
    assert load_chunk(store, key, 9, BS) is not None
    assert load_chunk(store, chunk_hash(range(1, 10), b"m"), 9, BS) is None
    middle = chunk_block_keys(key, 9, BS)[1]
    for tier in store.tiers:
        tier.remove(middle)
    assert load_chunk(store, key, 9, BS) is None


def test_a_damaged_piece_on_ssd_is_a_miss(store):
    from kvstore.codec import HEADER_BYTES

    a, b = chunk_kv(11, 4), chunk_kv(8, 5)
    ka, kb = chunk_hash(range(11), b"m"), chunk_hash(range(100, 108), b"m")
    store_chunk(store, ka, a, BS)
    store_chunk(store, kb, b, BS)
    first = chunk_block_keys(ka, 11, BS)[0]
    ssd = store.tier("ssd")
    assert store.where(first) == "ssd"
    with open(ssd.path, "r+b") as f:
        f.seek(ssd._slots[first] * ssd.slot_bytes + HEADER_BYTES + 5)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert load_chunk(store, ka, 11, BS) is None
    assert ssd.stats.corrupt == 1 and not store.contains(first)
    assert torch.equal(load_chunk(store, kb, 8, BS), b)
