"""Chunk-cache reuse inside the engine (worker/chunk_blend.py) on real engines with a DRAM tier.

A request with reusable chunks stores their caches; a later request carrying the same chunks in
another order, after other text, blends them in. Recomputing every token of them
(`chunk_recompute_ratio=1.0`) must give exactly a full prefill's output, whatever the batching,
piece splitting and preemption; a small ratio reuses most tokens, and its correction must move
the first token's distribution toward the full prefill (checked on SmolLM2: on the tiny random
model a chunk's deviation has almost no shared part for the correction to recover).
"""
from __future__ import annotations

import asyncio
import math
import random

import pytest
import torch
import torch.nn.functional as F

from kvstore.keys import chunk_block_keys, chunk_hash
from worker.chunk_blend import CHUNK_START_TOKENS
from kvweave.sampling_params import SamplingParams

BS = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=5)


def toks(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 250) for _ in range(n)]


A, B, C = toks(48, 1), toks(40, 2), toks(35, 7)
"""Reusable chunks (documents)."""
I1, I2, I3 = toks(20, 3), toks(13, 4), toks(37, 8)
Q1, Q2 = toks(9, 5), toks(11, 6)


def build(*parts) -> tuple[list[int], list[tuple[int, int]]]:
    """A prompt from text (a list) and chunks (a 1-tuple holding the chunk's tokens): (tokens, spans)."""
    prompt, spans = [], []
    for part in parts:
        if isinstance(part, tuple):
            spans.append((len(prompt), len(part[0])))
            prompt += part[0]
        else:
            prompt += part
    return prompt, spans


def serve(engine, prompts: list[tuple[list[int], list[tuple[int, int]]]], params=GREEDY, on_step=None):
    """Run the prompts together to completion: [(final RequestOutput, Request)] in order."""
    reqs = [engine.make_request(p, params, chunk_spans=spans) for p, spans in prompts]
    for req in reqs:
        engine.submit(req)
    final = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                final[out.req_id] = out
        if on_step is not None:
            on_step(reqs)
    return [(final[r.req_id], r) for r in reqs]


def serve_one(engine, prompt, spans=(), params=GREEDY):
    return serve(engine, [(prompt, list(spans))], params)[0][0]


@pytest.fixture(scope="module")
def model(tiny_model_variant):
    """A tiny model whose next token depends on the context (a wrong KV shows in the output)."""
    return tiny_model_variant("gqa")


@pytest.fixture
def make(tiny_engine_factory, model):
    """`make(dram_entries=0, **config)`: an engine on the lively tiny model, with a DRAM tier of
    `dram_entries` block entries when given."""
    entry_bytes = tiny_engine_factory(model, num_blocks=4).connector.layout.nbytes

    def make_engine(dram_entries: int = 0, **config):
        if dram_entries:
            config["dram_cache_gb"] = dram_entries * entry_bytes / 2**30
        return tiny_engine_factory(model, **config)

    return make_engine


def assert_same_output(out, ref) -> None:
    assert out.token_ids == ref.token_ids
    for (lp, top), (ref_lp, ref_top) in zip(out.logprobs, ref.logprobs, strict=True):
        assert lp == pytest.approx(ref_lp, abs=1e-4)
        assert top.keys() == ref_top.keys()
        assert list(top.values()) == pytest.approx(list(ref_top.values()), abs=1e-4)


@pytest.mark.parametrize("selection", ["kvweave", "chunk_start", "deviation"])
def test_full_recompute_of_reused_chunks_equals_full_prefill(make, selection):
    engine = make(256, chunk_recompute_ratio=1.0, chunk_selection=selection)
    first = serve_one(engine, *build(I1, (A,), (B,), Q1))
    assert first.num_chunk_reused_tokens == 0 and engine.blender.num_stored == 2
    prompt, spans = build(I2, (B,), (A,), Q2)  # other order, after another instruction
    out = serve_one(engine, prompt, spans)
    assert_same_output(out, serve_one(make(), prompt))
    assert out.num_chunk_reused_tokens == len(A) + len(B) == out.num_recomputed_tokens
    assert out.num_cached_tokens == 0


def test_small_ratio_reuses_most_tokens(make):
    engine = make(256, chunk_recompute_ratio=0.1)
    serve_one(engine, *build(I1, (A,), (B,), Q1))
    prompt, spans = build(I2, (B,), (A,), Q2)
    out = serve_one(engine, prompt, spans)
    # Caches computed in another context really differ from this one's (what makes ratio 1.0's
    # exactness above a test): most of them reused as they are, the first token's logprob moves.
    ref = serve_one(make(), prompt)
    assert abs(out.logprobs[0][0] - ref.logprobs[0][0]) > 1e-3 or out.token_ids[0] != ref.token_ids[0]
    assert out.num_chunk_reused_tokens == len(A) + len(B)
    # Each chunk: its first tokens, or ratio x its length when more.
    expected = sum(max(CHUNK_START_TOKENS, math.ceil(0.1 * n)) for n in (len(A), len(B)))
    assert out.num_recomputed_tokens == expected
    assert 0.1 * out.num_chunk_reused_tokens <= out.num_recomputed_tokens < 0.15 * out.num_chunk_reused_tokens
    assert len(out.token_ids) == GREEDY.max_tokens


def test_deviation_selection_recomputes_the_tokens_that_moved_most(make):
    """CacheBlend's selection: a scoring pass over every reused token (layers 0..1), then the share
    whose layer-1 values moved most is recomputed through every layer."""
    from worker.chunk_blend import BlendPlan, PlacedChunk

    plan = BlendPlan([50, 51], 0, 50, [PlacedChunk(0, 0, 10, []), PlacedChunk(1, 10, 40, [])], score_ratio=0.08)
    scores = [0.0] * 50
    scores[3], scores[12], scores[30], scores[49] = 5.0, 9.0, 7.0, 8.0
    plan.apply_scores(scores)
    assert [p.selected for p in plan.placed] == [[3], [2, 20, 39]]  # the 4 (8% of 50) that moved most
    assert plan.positions == [3, 12, 30, 49, 50, 51] and plan.score_ratio is None
    engine = make(256, chunk_recompute_ratio=0.2, chunk_selection="deviation")
    serve_one(engine, *build(I1, (A,), (B,), Q1))
    out = serve_one(engine, *build(I2, (B,), (A,), Q2))
    assert out.num_chunk_reused_tokens == len(A) + len(B)
    assert out.num_recomputed_tokens == round(0.2 * (len(A) + len(B)))


@pytest.mark.parametrize("tail", [[Q2], []], ids=["question-after", "ends-in-chunk"])
def test_zero_ratio_blend_at_the_start_of_the_prompt(make, tail):
    """Nothing recomputed and the prompt starts with its chunks: the engine must still serve it."""
    engine = make(256, chunk_recompute_ratio=0.0)
    serve_one(engine, *build(I1, (A,), (B,), Q1))
    out = serve_one(engine, *build((B,), (A,), *tail))
    assert out.num_chunk_reused_tokens == len(A) + len(B) and len(out.token_ids) == GREEDY.max_tokens


def first_token_logits(engine, prompt, spans=()) -> tuple[torch.Tensor, object]:
    """The logits the engine samples the request's first token from (all of the vocabulary)."""
    seen = []
    compute = engine.model.compute_logits
    engine.model.compute_logits = lambda hidden: seen.append(compute(hidden)) or seen[-1]
    try:
        out = serve_one(engine, prompt, spans, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    finally:
        del engine.model.compute_logits
    return seen[0][0], out


def kl(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """KL(reference || logits) of the two next-token distributions."""
    return float(F.kl_div(logits.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="sum"))


@pytest.mark.slow
def test_correction_moves_first_token_toward_full_prefill(tiny_engine_factory, default_model_path):
    """On SmolLM2-135M with real documents: a 10% recompute with the correction is closer to the
    full prefill than the same recompute without it, and than reusing the caches as they are."""
    reference = tiny_engine_factory(default_model_path, num_blocks=128)
    tok, dram_gb = reference.tokenizer, 128 * reference.connector.layout.nbytes / 2**30
    enc = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    doc_a = enc(" The Amazon rainforest covers much of the Amazon basin of South America. This basin encompasses "
                "seven million square kilometres, of which five and a half million square kilometres are covered "
                "by the rainforest. The majority of the forest, 60%, is in Brazil, followed by Peru with 13%.")
    doc_b = enc(" The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is "
                "named after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to "
                "1889, as the centrepiece of the 1889 World's Fair.")
    first = build(enc("Read the documents and answer briefly.\n"), (doc_a,), (doc_b,),
                  enc("\nQuestion: how large is the rainforest?\nAnswer:"))
    prompt, spans = build(enc("You are a helpful assistant. Use the context below.\n"), (doc_b,), (doc_a,),
                          enc("\nQuestion: who designed the Eiffel Tower?\nAnswer:"))
    full, _ = first_token_logits(reference, prompt)
    divergence = {}
    for ratio, correct in [(0.0, True), (0.1, False), (0.1, True)]:
        engine = tiny_engine_factory(default_model_path, num_blocks=128, dram_cache_gb=dram_gb,
                                     chunk_recompute_ratio=ratio, chunk_correction=correct)
        serve_one(engine, *first, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
        logits, out = first_token_logits(engine, prompt, spans)
        assert out.num_chunk_reused_tokens == len(doc_a) + len(doc_b)
        divergence[(ratio, correct)] = kl(logits, full)
    assert divergence[(0.0, True)] > 1e-3  # reusing the caches as they are is measurably off
    assert divergence[(0.1, True)] < divergence[(0.1, False)]
    assert divergence[(0.1, True)] < divergence[(0.0, True)]


def test_first_request_stores_its_chunks_for_its_engine_only(make):
    engine = make(256)
    prompt, spans = build(I1, (A,), (B,), Q1)
    serve_one(engine, prompt, spans)
    assert engine.blender.num_stored == 2
    keys = [chunk_block_keys(chunk_hash(c, engine.make_request(prompt).cache_extra), len(c), BS) for c in (A, B)]
    assert [len(k) for k in keys] == [3, 3]
    assert all(engine.store.contains(k) for chunk in keys for k in chunk)
    # Serving the same chunks again stores nothing new.
    serve_one(engine, *build(I2, (A,), Q2))
    assert engine.blender.num_stored == 2
    other = make(256)  # another engine (its own device cache and DRAM tier) does not see them
    assert not any(other.store.contains(k) for chunk in keys for k in chunk)
    out = serve_one(other, *build(I2, (B,), (A,), Q2))
    assert out.num_chunk_reused_tokens == 0 and out.num_recomputed_tokens == 0
    assert other.blender.num_stored == 2  # it computed (and now keeps) its own


def test_partly_cached_chunks_are_exact_at_full_recompute(make):
    engine = make(256, chunk_recompute_ratio=1.0)
    serve_one(engine, *build(I1, (A,), Q1))
    prompt, spans = build(I2, (C,), Q1, (A,), Q2)  # C is new, A was seen; text between them
    out = serve_one(engine, prompt, spans)
    assert_same_output(out, serve_one(make(), prompt))
    assert out.num_chunk_reused_tokens == len(A) == out.num_recomputed_tokens
    assert engine.blender.num_stored == 2  # C is stored now
    again = serve_one(engine, *build(I1, (C,), Q2))
    assert again.num_chunk_reused_tokens == len(C)


def test_blend_in_pieces_and_under_preemption_is_exact(make):
    engine = make(512, chunk_recompute_ratio=1.0, max_num_batched_tokens=32, num_blocks=16)
    serve_one(engine, *build(I1, (A,), (B,), Q1))
    serve_one(engine, *build(I1, (C,), Q2))
    prompts = [build(I2, (B,), (A,), Q2), build(I3, (C,), Q1, (A,), Q1)]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=5)
    pieces = {}

    def watch(reqs):
        for r in reqs:
            if r.blend is not None:  # pieces so far, plus one more while positions are left
                pieces[r.req_id] = max(pieces.get(r.req_id, 0), r.blend.num_pieces + (not r.blend.done))

    results = serve(engine, prompts, params, on_step=watch)
    assert pieces and max(pieces.values()) >= 2  # a blend ran in several pieces
    assert sum(req.num_preemptions for _, req in results) > 0
    reference = make()
    for (out, req), (prompt, _) in zip(results, prompts):
        assert_same_output(out, serve_one(reference, prompt, params=params))
        assert out.num_chunk_reused_tokens == sum(n for _, n in req.chunk_spans)


def test_blended_blocks_do_not_enter_the_prefix_cache(make):
    engine = make(256, chunk_recompute_ratio=0.1)
    serve_one(engine, *build(I1, (A,), (B,), Q1))
    prompt, spans = build(I3, (B,), (A,), Q2)  # the first chunk starts at 37, inside block 2
    blended = serve_one(engine, prompt, spans)
    assert blended.num_chunk_reused_tokens == len(A) + len(B)
    plain = serve_one(engine, prompt)
    assert plain.num_cached_tokens == (len(I3) // BS) * BS == 32
    assert_same_output(plain, serve_one(make(), prompt))


@pytest.mark.asyncio
async def test_prefetcher_stages_local_chunks_before_admission(make):
    from worker.async_engine import AsyncEngine
    from worker.kv_prefetch import KVPrefetcher

    engine = make(256, chunk_recompute_ratio=1.0)
    prefetcher = KVPrefetcher(engine)
    async_engine = AsyncEngine(engine)
    async_engine.prefetch = prefetcher
    try:
        prompt, spans = build(I1, (A,), (B,), Q1)
        [_ async for _ in async_engine.generate(prompt, GREEDY, chunk_spans=spans)]
        assert prefetcher.stats.chunk_local == 0
        while not async_engine.idle:  # the engine stores the new chunks' caches after the request
            await asyncio.sleep(0.01)
        prompt, spans = build(I2, (B,), (A,), Q2)
        outs = [out async for out in async_engine.generate(prompt, GREEDY, chunk_spans=spans)]
    finally:
        async_engine.shutdown()
    assert prefetcher.stats.chunk_local == 2 and prefetcher.stats.chunk_peer == 0
    assert outs[-1].num_chunk_reused_tokens == len(A) + len(B)
    assert_same_output(outs[-1], serve_one(make(), prompt))


@pytest.mark.parametrize("mode", ["standalone", "in_context"])
def test_what_a_first_seen_chunk_stores(make, mode):
    """standalone: the chunk computed alone after the prompt's leading text (by an engine-made
    request no caller sees); in_context: its KV in the prompt it came in. Both re-based to 0."""
    from tests.kv_reference import reference_kv
    from kvstore.chunks import load_chunk
    from kvstore.keys import encode_extra_keys
    from worker.chunk_kv import rotate_keys_
    from worker.model import rope_inv_freq

    engine = make(256, chunk_cache_mode=mode)
    prompt, spans = build(I1, (A,), (B,), Q1)
    req = engine.make_request(prompt, GREEDY, chunk_spans=spans)
    engine.submit(req)
    seen = set()
    while engine.has_unfinished():
        seen.update(out.req_id for out in engine.step())
    assert seen == {req.req_id}  # the engine's own chunk requests stream nothing
    assert engine.blender.num_stored == 2 and not engine.blender.pending
    extra = encode_extra_keys((engine.model_name, ""))
    stored = load_chunk(engine.store, chunk_hash(B, extra), len(B), BS)
    before = I1 if mode == "standalone" else I1 + A  # in context, B came after I1 and A
    expected = reference_kv(engine.model, before + B)[:, :, :, len(before):]
    rotate_keys_(expected[0], -len(before), rope_inv_freq(engine.args))
    torch.testing.assert_close(stored, expected, atol=1e-4, rtol=1e-4)  # float32 engines
    assert engine.blender.correct == (mode == "standalone")  # in-context caches are reused uncorrected
