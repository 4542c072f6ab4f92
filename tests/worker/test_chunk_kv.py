"""Chunk-caches as tensors (worker/chunk_kv.py) against a plain causal forward of the tiny model:
RoPE re-rotation is exact where it should be, placing a cache writes it at its new position, and a
re-based chunk is the chunk computed at position 0."""
from __future__ import annotations

import random

import torch

from tests.kv_reference import reference_kv
from worker.attention import slot_mapping
from worker.chunk_kv import place_chunk_, rebased_chunk, rotate_keys_
from worker.model import rope_inv_freq


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 250) for _ in range(n)]


def test_rotated_keys_equal_keys_computed_at_the_new_position(tiny_engine_factory):
    engine = tiny_engine_factory(dtype="float32")
    chunk, prefix = tokens(40, 1), tokens(77, 2)
    at_zero = reference_kv(engine.model, chunk)
    shifted = reference_kv(engine.model, chunk, start=len(prefix))  # the same tokens alone at 77..116
    in_context = reference_kv(engine.model, prefix + chunk)[:, :, :, len(prefix):]  # after the prefix
    inv = rope_inv_freq(engine.args)
    keys = at_zero[0].clone()
    rotate_keys_(keys, len(prefix), inv)
    # Alone, a chunk's keys depend on positions only through RoPE: re-rotation gives them exactly.
    torch.testing.assert_close(keys, shifted[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(keys[0], in_context[0, 0], atol=1e-4, rtol=1e-4)  # layer 0 sees no context
    assert not torch.allclose(at_zero[0, 0], in_context[0, 0], atol=1e-3)  # the rotation mattered
    assert not torch.allclose(keys[-1], in_context[0, -1], atol=1e-3)  # deeper layers see the context
    rotate_keys_(keys, -len(prefix), inv)  # rotating back recovers the original
    torch.testing.assert_close(keys, at_zero[0], atol=1e-4, rtol=1e-4)


def test_place_then_rebase_round_trips_through_the_paged_cache(tiny_engine_factory):
    engine = tiny_engine_factory(dtype="float32", num_blocks=16)
    bs, inv = engine.config.block_size, rope_inv_freq(engine.args)
    chunk = tokens(37, 3)
    cache = reference_kv(engine.model, chunk)
    table = torch.tensor([9, 3, 14, 0, 7, 11])  # scattered blocks
    start = 21
    slots = slot_mapping(table, torch.arange(start, start + len(chunk)), bs)
    place_chunk_(engine.runner.kv_cache, cache, slots, start, inv)
    expected = cache.clone()
    rotate_keys_(expected[0], start, inv)
    torch.testing.assert_close(engine.runner.kv_cache[:, :, :, slots].float(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rebased_chunk(engine.runner.kv_cache, slots, start, inv), cache, atol=1e-4, rtol=1e-4)
