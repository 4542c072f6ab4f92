"""Tensor parallelism inside a worker (worker/tensor_parallel.py, tp_executor.py, token_split.py):
the sharding arithmetic, the token split, and real rank processes over gloo. TP=2 on a tiny model
with an even number of heads and TP=3 on the default model (9 query and 3 KV heads) give the same
greedy tokens as one rank, with log-probabilities and logits within float32 summation-order
tolerance, with and without the token-split overlap, all-reducing through shared memory or gloo;
a rank that dies fails the step with TPGroupError instead of hanging."""
from __future__ import annotations

import time

import pytest
import torch

from kvstore.ipc_share import SHM_DIR
from kvweave.sampling_params import SamplingParams
from worker.config import ConfigError, ModelArgs
from worker.engine import EngineConfig, LLMEngine
from worker.tensor_parallel import TPConfigError, check_tp, rank_args, shard_weights
from worker.token_split import split_items
from worker.tp_executor import TPGroupError

from engine_reference import random_prompts, run_to_end

LOGPROB_TOL = 1e-4
"""As the engine's reference tests: the ranks' all-reduce sums partial products in another order."""
LOGIT_TOL = 1e-3
"""Largest difference of a prompt logit of the default model (logits of magnitude ~10-30) in float32."""


def _args(**kw) -> ModelArgs:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, hidden_dim=96, norm_eps=1e-5,
                rope_theta=10000.0, max_seq_len=128)
    return ModelArgs(**(base | kw))


def test_check_tp_names_what_does_not_divide():
    check_tp(_args(), 2)
    with pytest.raises(TPConfigError, match="does not divide the model's 9 query heads"):
        check_tp(_args(n_heads=9, n_kv_heads=3, dim=72), 2)
    with pytest.raises(TPConfigError, match="3 KV heads: one must divide the other"):
        check_tp(_args(n_heads=6, n_kv_heads=3, dim=96), 2)
    with pytest.raises(TPConfigError, match=">= 1"):
        check_tp(_args(), 0)
    r = rank_args(_args(), 2)
    assert (r.n_heads, r.n_kv_heads, r.hidden_dim, r.head_dim, r.dim) == (2, 1, 48, 16, 64)
    replicated = rank_args(_args(), 4)  # 2 KV heads over 4 ranks: each rank holds one, two ranks per head
    assert (replicated.n_heads, replicated.n_kv_heads) == (1, 1)


def test_shards_put_back_together_are_the_checkpoint():
    args = _args()
    g = torch.Generator().manual_seed(0)
    hd = args.head_dim
    w = {"model.layers.0.self_attn.q_proj.weight": torch.randn(4 * hd, 64, generator=g),
         "model.layers.0.self_attn.k_proj.weight": torch.randn(2 * hd, 64, generator=g),
         "model.layers.0.self_attn.v_proj.bias": torch.randn(2 * hd, generator=g),
         "model.layers.0.self_attn.o_proj.weight": torch.randn(64, 4 * hd, generator=g),
         "model.layers.0.mlp.gate_proj.weight": torch.randn(96, 64, generator=g),
         "model.layers.0.mlp.down_proj.weight": torch.randn(64, 96, generator=g),
         "model.norm.weight": torch.randn(64, generator=g)}
    shards = [shard_weights(w, args, r, 2) for r in range(2)]
    for name, full in w.items():
        parts = [s[name] for s in shards]
        if "o_proj" in name or "down_proj" in name:  # row-parallel: split by input columns
            assert torch.equal(torch.cat(parts, dim=1), full) and parts[0].shape[1] == full.shape[1] // 2
        elif "norm" in name:  # replicated
            assert all(p is full for p in parts)
        else:  # column-parallel: whole heads (q, k, v) and MLP columns per rank
            assert torch.equal(torch.cat(parts, dim=0), full) and parts[0].shape[0] == full.shape[0] // 2
    assert torch.equal(shards[1]["model.layers.0.self_attn.q_proj.weight"],
                       w["model.layers.0.self_attn.q_proj.weight"][2 * hd:])  # rank 1 holds heads 2 and 3
    k = w["model.layers.0.self_attn.k_proj.weight"]
    four = [shard_weights(w, args, r, 4)["model.layers.0.self_attn.k_proj.weight"] for r in range(4)]
    assert [torch.equal(part, k[head * hd:(head + 1) * hd]) for part, head in zip(four, (0, 0, 1, 1))] == [True] * 4


@pytest.mark.parametrize("items, first, second, cut", [
    ([("a", 10, None)], [("a", 5, None)], [("a", 5, None)], ("a", 5)),
    ([("d1", 1, None), ("d2", 1, None), ("p", 8, None)], [("d1", 1, None), ("d2", 1, None), ("p", 3, None)],
     [("p", 5, None)], ("p", 3)),
    ([("a", 4, None), ("b", 4, None)], [("a", 4, None)], [("b", 4, None)], None),
    ([("d1", 1, None), ("d2", 1, None), ("d3", 1, None)], [("d1", 1, None)], [("d2", 1, None), ("d3", 1, None)], None),
])
def test_split_items_cuts_at_half_the_tokens(items, first, second, cut):
    assert split_items(items) == (first, second, cut)


def test_split_items_leaves_steps_it_cannot_cut():
    assert split_items([("a", 1, None)]) is None
    assert split_items([("a", 6, object())]) is None  # a blend piece's positions are sparse


def _engine(model, tp: int, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model), dtype="float32", tensor_parallel_size=tp, **kw))


def _generate(engine: LLMEngine, prompts, max_tokens: int):
    outs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                                   logprobs=1))
    return [o.token_ids for o in outs], [[lp for lp, _ in o.logprobs] for o in outs]


@pytest.fixture(scope="module")
def tiny_gqa(tiny_model_variant):
    return tiny_model_variant("gqa")  # 4 query heads, 2 KV heads


@pytest.fixture(scope="module")
def one_rank(tiny_gqa):
    prompts = random_prompts([3, 17, 40, 150, 9], 250, seed=5)
    engine = _engine(tiny_gqa, 1, block_size=4, num_blocks=256, max_num_batched_tokens=64)
    try:
        return prompts, _generate(engine, prompts, 12)
    finally:
        engine.close()


@pytest.mark.parametrize("overlap", [dict(tp_overlap=False), dict(tp_overlap_min_tokens=2),
                                     dict(tp_overlap_min_tokens=2, tp_allreduce="gloo")],
                         ids=["sequential-shm", "token-split-every-step-shm", "token-split-every-step-gloo"])
def test_two_ranks_generate_what_one_does(tiny_gqa, one_rank, overlap):
    """Chunked prefill (a 64-token budget: chunks after cached context, cut in two by the split)
    with decodes in the same steps."""
    prompts, (want_tokens, want_lps) = one_rank
    before = set(SHM_DIR.glob("kvweave-tp-*"))
    engine = _engine(tiny_gqa, 2, block_size=4, num_blocks=256, max_num_batched_tokens=64, **overlap)
    try:
        # The shared cache (and all-reduce region) files are unlinked once both ranks mapped them.
        assert set(SHM_DIR.glob("kvweave-tp-*")) <= before
        assert engine.runner.attn_cache.shape[2] == 1 and engine.runner.kv_cache.shape[2] == 2
        tokens, lps = _generate(engine, prompts, 12)
        assert tokens == want_tokens
        for got, want in zip(lps, want_lps):
            assert got == pytest.approx(want, abs=LOGPROB_TOL)
        # A prefix hit: the second time the KV of every rank's heads is found in the shared cache.
        again, _ = _generate(engine, prompts[3:4], 12)
        assert again == want_tokens[3:4]
    finally:
        engine.close()


def test_four_ranks_replicating_the_kv_heads_generate_what_one_does(tiny_gqa, one_rank):
    """2 KV heads over 4 ranks: ranks 0 and 1 share KV head 0, ranks 2 and 3 KV head 1."""
    prompts, (want_tokens, want_lps) = one_rank
    engine = _engine(tiny_gqa, 4, block_size=4, num_blocks=256, max_num_batched_tokens=64, num_threads=1)
    try:
        tokens, lps = _generate(engine, prompts, 12)
        assert tokens == want_tokens
        for got, want in zip(lps, want_lps):
            assert got == pytest.approx(want, abs=LOGPROB_TOL)
    finally:
        engine.close()


def test_a_model_that_does_not_split_is_refused(tiny_gqa):
    with pytest.raises(ConfigError, match="does not divide the model's 4 query heads"):
        _engine(tiny_gqa, 3, num_blocks=64)
    with pytest.raises(ConfigError, match="unknown tp_allreduce 'mpi'"):
        EngineConfig(model=str(tiny_gqa), tp_allreduce="mpi")


def test_a_dead_rank_fails_the_step_instead_of_hanging(tiny_gqa):
    engine = _engine(tiny_gqa, 2, block_size=4, num_blocks=64)
    try:
        proc = engine.tp.procs[0]
        proc.kill()
        proc.wait()
        engine.add_request([5, 6, 7, 8, 9], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
        t = time.monotonic()
        with pytest.raises(TPGroupError, match=r"rank 1 \(exit -9\)"):
            run_to_end(engine)
        assert time.monotonic() - t < 60  # failed, not hung until gloo's join timeout
        with pytest.raises(TPGroupError, match="closed"):
            engine.step()
    finally:
        engine.close()


@pytest.mark.slow
def test_three_ranks_of_the_default_model_match_one(default_model_path):
    """9 query heads and 3 KV heads: one KV head and three query heads per rank."""
    prompts = random_prompts([7, 90, 300], 49152, seed=11)
    kw = dict(block_size=16, num_blocks=128, max_num_batched_tokens=256)
    results = []
    for tp in (1, 3):
        engine = _engine("smollm2-135m", tp, **kw)
        try:
            tokens, _ = _generate(engine, prompts, 8)
            engine.submit(engine.make_request(prompts[2], SamplingParams(temperature=0.0, max_tokens=1), prompt_logits=300))
            logits = next(o.prompt_logits for o in run_to_end(engine) if o.finished)
            results.append((tokens, logits))
        finally:
            engine.close()
    (tokens1, logits1), (tokens3, logits3) = results
    assert tokens3 == tokens1
    assert (logits3 - logits1).abs().max().item() < LOGIT_TOL
