"""Fidelity of chunk-cache reuse through the serving engine, on the real default model and real
MuSiQue questions: at the engine's default settings, teacher-forced on full prefill's greedy answer,
the reused prompt stays within a stated absolute bound of full prefill, and clearly closer than
reusing the caches as they are. (`kvweave bench rag` measures the same path on more questions.)"""
from __future__ import annotations

import json
import os

import pytest

from benchmarks.rag import DEFAULT_DATASET, Question, build_standalone, copy_chunks, kl_and_agreement, serve

QUESTIONS = (50,)
"""A question the defaults were not chosen on (one: each costs ~20 s of the suite on a 2-core CPU)."""
DOCS = 3
ANSWER_TOKENS = 16
MIN_AGREEMENT = 0.85
MAX_KL = 0.08
"""Bounds with all 3 passages reused. Measured: questions 50 and 51 together on AMD EPYC, bf16:
agreement 0.91, KL 0.063-0.066, and reusing the caches uncorrected and without recomputation 0.84
and 0.096, which fails them. Question 50 alone on AMD EPYC Zen 3, fp32: 0.94 and 0.027, uncorrected
0.81 and 0.072 (question 51: 0.94 / 0.057 against 0.94 / 0.062; 52: 0.94 / 0.013 against 0.94 / 0.063)."""


@pytest.mark.slow
def test_default_reuse_stays_close_to_full_prefill(default_model_path, tiny_engine_factory):
    if not os.path.isfile(DEFAULT_DATASET):
        pytest.skip(f"{DEFAULT_DATASET} is absent (it lives next to the repository, in ../shared/data)")
    with open(DEFAULT_DATASET) as f:
        items = json.load(f)
    # The engine's default dtype: bf16 where the CPU computes it natively, else fp32 (bf16 emulated
    # on an AVX2-only CPU made this test take 7 minutes).
    make = lambda **c: tiny_engine_factory(default_model_path, dtype="auto", num_blocks=512,  # noqa: E731
                                           num_threads=None, max_num_batched_tokens=4096, dram_cache_gb=0.25, **c)
    engine, naive = make(), make(chunk_recompute_ratio=0.0, chunk_correction=False)
    kvweave, plain = [0.0, 0.0], [0.0, 0.0]
    for qi in QUESTIONS:
        q = Question(items[qi], engine.tokenizer, DOCS)
        _, out = serve(engine, q.tokens, f"full-{qi}", max_tokens=ANSWER_TOKENS)
        forced = q.tokens + list(out.token_ids)[:-1]
        _, out = serve(engine, forced, f"full-{qi}", prompt_logits=ANSWER_TOKENS)
        full = out.prompt_logits
        build_standalone(engine, q, f"q{qi}")
        copy_chunks(engine, naive, q, f"q{qi}")  # the same chunk-caches, as a peer would hand them over
        for eng, sums in ((engine, kvweave), (naive, plain)):
            _, out = serve(eng, forced, f"q{qi}", q.spans, prompt_logits=ANSWER_TOKENS)
            assert out.num_chunk_reused_tokens > 0  # the chunks really were reused
            agree, kl = kl_and_agreement(full, out.prompt_logits)
            sums[0] += agree / len(QUESTIONS)
            sums[1] += kl / len(QUESTIONS)
    assert kvweave[0] >= MIN_AGREEMENT and kvweave[1] <= MAX_KL, (kvweave, plain)
    assert kvweave[1] < plain[1], (kvweave, plain)
