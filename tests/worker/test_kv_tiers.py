"""The engine over the tiered store: evicted blocks are offloaded (device -> DRAM -> SSD) and
onboarded again instead of recomputed; the output always equals a cold run."""
from __future__ import annotations

import random

import pytest
import torch

from kvstore.codec import HEADER_BYTES
from kvstore.keys import encode_extra_keys, hash_blocks
from worker.config import ConfigError
from kvweave.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
BS = 16


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 250) for _ in range(length)] for _ in range(n)]


def gb(engine_factory, entries: int) -> float:
    probe = engine_factory(num_blocks=8)
    return entries * probe.connector.layout.nbytes / 2**30


def run(engine, prompt):
    return engine.generate([prompt], GREEDY)[0]


def flood(engine, n: int = 6, seed: int = 99) -> None:
    """Unrelated prompts that take every device block, evicting what was cached."""
    for p in prompts(n, 100, seed):
        run(engine, p)


@pytest.fixture
def cold(tiny_engine_factory):
    engine = tiny_engine_factory()
    return lambda prompt: run(engine, prompt).token_ids


def test_dram_tier_serves_evicted_blocks(tiny_engine_factory, cold):
    engine = tiny_engine_factory(num_blocks=12, dram_cache_gb=gb(tiny_engine_factory, 64))
    (prompt,) = prompts(1, 100, seed=1)  # 6 full blocks (the 7th is partial)
    first = run(engine, prompt)
    flood(engine)
    head = hash_blocks(prompt, BS, encode_extra_keys((engine.model_name, "")))
    assert not any(engine.connector.device.contains(h) for h in head)
    assert all(engine.store.where(h) == "dram" for h in head)
    again = run(engine, prompt)
    assert again.token_ids == first.token_ids == cold(prompt)
    assert again.num_cached_tokens == 96
    stats = engine.connector.stats
    assert stats.hit_tokens["dram"] >= 96 and stats.hit_tokens["ssd"] == 0
    events = engine.take_kv_events()
    assert any(ev.medium == "dram" and type(ev).__name__ == "BlockStored" for ev in events)


def test_blocks_demoted_to_ssd_come_back(tiny_engine_factory, cold, tmp_path):
    engine = tiny_engine_factory(num_blocks=12, dram_cache_gb=gb(tiny_engine_factory, 4),
                                 ssd_cache_gb=gb(tiny_engine_factory, 256), ssd_cache_dir=str(tmp_path))
    (prompt,) = prompts(1, 100, seed=2)
    run(engine, prompt)
    flood(engine)  # DRAM holds 4 entries: the prompt's blocks went on to SSD
    again = run(engine, prompt)
    assert again.token_ids == cold(prompt) and again.num_cached_tokens == 96
    assert engine.connector.stats.hit_tokens["ssd"] > 0
    engine.close()


def test_ssd_cache_survives_a_restart_and_damage_is_recomputed(tiny_engine_factory, cold, tmp_path):
    cfg = dict(num_blocks=12, ssd_cache_gb=gb(tiny_engine_factory, 256), ssd_cache_dir=str(tmp_path))
    a, b = prompts(2, 100, seed=3)
    engine = tiny_engine_factory(**cfg)
    run(engine, a)
    run(engine, b)
    flood(engine)
    engine.close()

    restarted = tiny_engine_factory(**cfg)
    assert len(restarted.store.tier("ssd")) >= 12
    out = run(restarted, a)
    assert out.token_ids == cold(a) and out.num_cached_tokens == 96
    assert restarted.connector.stats.hit_tokens["ssd"] == 96
    restarted.close()

    # Flip payload bytes of every entry on disk: nothing damaged may be used, b is recomputed.
    (slab,) = tmp_path.glob("*.bin")
    data = bytearray(slab.read_bytes())
    probe = tiny_engine_factory(**cfg)
    slot_bytes, tier_keys = probe.store.tier("ssd").slot_bytes, probe.store.tier("ssd").keys()
    probe.close()
    for off in range(0, len(data) - slot_bytes + 1, slot_bytes):
        data[off + HEADER_BYTES + 7] ^= 0xFF
    slab.write_bytes(bytes(data))
    damaged = tiny_engine_factory(**cfg)
    out = run(damaged, b)
    assert out.token_ids == cold(b)
    assert out.num_cached_tokens == 0 and damaged.connector.stats.hit_tokens["ssd"] == 0
    assert damaged.store.tier("ssd").stats.corrupt == 6  # b's blocks, read in one batch: all caught
    damaged.close()
    # ... and dropped: the recomputed blocks were written through in their place, intact.
    again = tiny_engine_factory(**cfg)
    assert len(again.store.tier("ssd")) == len(tier_keys)
    out = run(again, b)
    assert out.token_ids == cold(b) and out.num_cached_tokens == 96
    assert again.store.tier("ssd").stats.corrupt == 0
    again.close()


@pytest.mark.parametrize("bad, message", [
    ({"dram_cache_gb": 0}, "dram-cache-gb must be positive"),
    ({"dram_cache_gb": -1.0}, "dram-cache-gb must be positive"),
    ({"ssd_cache_gb": 1.0}, "needs ssd-cache-dir"),
    ({"ssd_cache_dir": "/tmp"}, "ssd-cache-gb is not"),
    ({"kv_eviction_policy": "mru"}, "unknown eviction policy"),
])
def test_bad_store_config(tiny_engine_factory, bad, message):
    with pytest.raises(ConfigError, match=message):
        tiny_engine_factory(**bad)


def test_unwritable_ssd_dir_is_a_config_error(tiny_engine_factory, tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(ConfigError, match=str(not_a_dir)):
        tiny_engine_factory(ssd_cache_gb=0.01, ssd_cache_dir=str(not_a_dir / "sub"))


@pytest.mark.asyncio
async def test_async_engine_stages_ssd_blocks_before_admission(tiny_engine_factory, cold, tmp_path):
    """Through the AsyncEngine with its prefetcher: SSD blocks are read while the request waits
    (staged on it), then copied in at admission."""
    from worker.async_engine import AsyncEngine
    from worker.kv_prefetch import KVPrefetcher

    engine = tiny_engine_factory(num_blocks=12, ssd_cache_gb=gb(tiny_engine_factory, 64), ssd_cache_dir=str(tmp_path))
    (prompt,) = prompts(1, 100, seed=4)
    run(engine, prompt)
    flood(engine)
    prefetcher = KVPrefetcher(engine)
    async_engine = AsyncEngine(engine)
    async_engine.prefetch = prefetcher
    try:
        outs = [out async for out in async_engine.generate(prompt, GREEDY)]
    finally:
        async_engine.shutdown()
    assert outs[-1].token_ids == cold(prompt) and outs[-1].num_cached_tokens == 96
    assert prefetcher.stats.ssd_blocks == 6 and engine.connector.stats.hit_tokens["ssd"] == 96


def test_export_takes_the_leading_run_from_every_tier(tiny_engine_factory):
    from kvstore.transfer_source import layer_major

    engine = tiny_engine_factory(num_blocks=12, dram_cache_gb=gb(tiny_engine_factory, 64))
    a, b = prompts(2, 100, seed=5)
    extra = encode_extra_keys((engine.model_name, ""))
    run(engine, a)
    flood(engine)  # a's blocks now live in DRAM only
    run(engine, b)  # b's on the device
    ha, hb = hash_blocks(a, BS, extra), hash_blocks(b, BS, extra)
    assert all(engine.store.where(h) == "dram" for h in ha) and all(engine.connector.device.contains(h) for h in hb)
    expected = [engine.store.tier("dram").get(h) for h in ha[:3]] + [engine.connector.device.get(h) for h in hb[:2]]
    out = engine.connector.export(ha[:3] + hb[:2] + [b"\x00" * 16] + ha[3:])
    assert out.shape == (5, *engine.connector.layout.shape) and layer_major(out) is not None
    assert all(torch.equal(o, e) for o, e in zip(out, expected))
    assert engine.connector.export([b"\x00" * 16] + ha) is None


def test_device_hits_are_reported_as_touched(tiny_engine_factory):
    engine = tiny_engine_factory()
    (prompt,) = prompts(1, 100, seed=6)
    run(engine, prompt)
    engine.take_kv_events()
    assert run(engine, prompt).num_cached_tokens == 96
    touched = [ev for ev in engine.take_kv_events() if type(ev).__name__ == "BlockTouched"]
    head = hash_blocks(prompt, BS, encode_extra_keys((engine.model_name, "")))
    assert [(ev.block_hashes, ev.medium) for ev in touched] == [(head, "device")]
