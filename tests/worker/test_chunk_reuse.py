"""The chunk-reuse mechanism on a tiny model: RoPE re-rotation is exact, recomputing every token of
the reused chunks reproduces a full prefill, and reuse without recomputation measurably does not."""
from __future__ import annotations

import random

import pytest
import torch

from worker.chunk_reuse import ChunkCache, blended_prefill_logits, compute_chunk_cache, rotate_keys_
from worker.model import rope_inv_freq


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 250) for _ in range(n)]


@pytest.fixture
def engine(tiny_engine_factory):
    return tiny_engine_factory()


def test_rotated_keys_equal_keys_computed_at_the_new_position(engine):
    chunk, prefix = tokens(40, 1), tokens(77, 2)
    at_zero = compute_chunk_cache(engine, chunk)
    in_place = compute_chunk_cache(engine, chunk, prefix=prefix)  # the same tokens at 77..116
    keys = at_zero.kv[0].clone()
    rotate_keys_(keys, len(prefix), rope_inv_freq(engine.args))
    # Layer 0's keys depend on the token and its position only: re-rotation must give them exactly.
    torch.testing.assert_close(keys[0], in_place.kv[0, 0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(at_zero.kv[0, 0], in_place.kv[0, 0], atol=1e-3)  # the rotation mattered
    # Deeper layers see the context: there a chunk-cache is only an approximation.
    assert not torch.allclose(keys[-1], in_place.kv[0, -1], atol=1e-3)
    # Rotating back recovers the original.
    rotate_keys_(keys, -len(prefix), rope_inv_freq(engine.args))
    torch.testing.assert_close(keys, at_zero.kv[0], atol=1e-5, rtol=1e-5)


def _prompt(engine):
    instruction, a, b, question = tokens(20, 3), tokens(48, 4), tokens(37, 5), tokens(12, 6)
    caches = [compute_chunk_cache(engine, a), compute_chunk_cache(engine, b)]
    full = blended_prefill_logits(engine, [instruction + a + b + question], lambda pos, c: ())
    return instruction, caches, question, full


def test_recomputing_every_token_reproduces_full_prefill(engine):
    instruction, caches, question, full = _prompt(engine)
    blended = blended_prefill_logits(engine, [instruction, *caches, question],
                                     lambda pos, c: range(len(c.token_ids)))
    torch.testing.assert_close(blended, full, atol=1e-4, rtol=1e-4)


def test_reuse_without_recomputation_is_measurably_off(engine):
    instruction, caches, question, full = _prompt(engine)
    naive = blended_prefill_logits(engine, [instruction, *caches, question], lambda pos, c: ())
    kl = torch.nn.functional.kl_div(naive.log_softmax(-1), full.log_softmax(-1), log_target=True, reduction="sum")
    assert kl > 1e-4
    # Recomputing the first tokens of each chunk moves the result toward the full prefill.
    partial = blended_prefill_logits(engine, [instruction, *caches, question], lambda pos, c: range(8))
    kl_partial = torch.nn.functional.kl_div(partial.log_softmax(-1), full.log_softmax(-1), log_target=True,
                                            reduction="sum")
    assert kl_partial < kl


def test_a_prompt_must_end_with_text(engine):
    cache = ChunkCache([5, 6], torch.zeros(1))
    with pytest.raises(ValueError, match="end with text"):
        blended_prefill_logits(engine, [[1, 2], cache], lambda pos, c: ())


def _kl(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.kl_div(a.log_softmax(-1), b.log_softmax(-1), log_target=True, reduction="sum"))


def test_deviation_selection(engine):
    instruction, caches, question, full = _prompt(engine)
    pieces = [instruction, *caches, question]
    # Everything selected: exact again, now through the layer-1 pass and the selection.
    everything = blended_prefill_logits(engine, pieces, deviation_ratio=1.0)
    torch.testing.assert_close(everything, full, atol=1e-4, rtol=1e-4)
    naive = blended_prefill_logits(engine, pieces, lambda pos, c: ())
    blended = blended_prefill_logits(engine, pieces, deviation_ratio=0.3)
    assert _kl(blended, full) < _kl(naive, full)
    with pytest.raises(ValueError, match="exactly one"):
        blended_prefill_logits(engine, pieces)


def test_deviation_select_picks_the_most_deviant_tokens(engine):
    from worker.chunk_reuse import _Sequence, deviation_select, place_chunk_cache

    instruction, caches, question, _ = _prompt(engine)
    seq = _Sequence(engine, len(instruction) + 85 + len(question), "probe")
    try:
        seq.forward(instruction, torch.arange(len(instruction)))
        pos = len(instruction)
        positions, toks = [], []
        for cache in caches:
            place_chunk_cache(engine, seq, cache, pos)
            positions += range(pos, pos + len(cache.token_ids))
            toks += cache.token_ids
            pos += len(cache.token_ids)
        cached_v = seq.runner.kv_cache[1, 1][:, seq.slots(torch.tensor(positions))].float().clone()
        chosen = deviation_select(seq, positions, toks, ratio=0.25)
        fresh_v = seq.runner.kv_cache[1, 1][:, seq.slots(torch.tensor(positions))].float()
        deviation = (fresh_v - cached_v).pow(2).sum(dim=(0, 2))
        expected = sorted(positions[i] for i in torch.topk(deviation, round(0.25 * len(positions))).indices.tolist())
        assert chosen == expected and len(chosen) == 21
        # A chunk computed on its own has its first token deviate most (it lost the context before it).
        assert positions[0] in chosen
    finally:
        seq.free()
