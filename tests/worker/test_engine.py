"""LLMEngine end to end: its greedy output must equal a plain greedy loop over the reference forward.

The reference (`Transformer.forward_reference`) runs the whole growing sequence through a causal
forward with no KV cache, paging, batching or chunking, so any bug in those shows up as a
different token or logprob. The tiny checkpoints are "lively" (see `write_lively_checkpoint`):
their greedy output depends on the context, so a wrong KV block or position changes the tokens.

Logprob tolerance: tests/worker/engine_reference.py.
"""
from __future__ import annotations

import math

import pytest
import torch

from worker.engine import EngineConfig, LLMEngine, Prompt
from worker.output import RequestOutput
from worker.request import Request
from kvweave.errors import InvalidRequestError
from kvweave.sampling_params import SamplingParams

from engine_reference import (LOGPROB_TOL, assert_matches_reference, greedy, random_prompts, reference_greedy,
                              run_to_end)

ENGINE_CASES = [
    ("gqa", 4), ("gqa", 16), ("mha", 16), ("mqa", 4), ("qwen2-bias", 16), ("untied", 4), ("llama3-rope", 16),
]
"""(tiny architecture from conftest.TINY_VARIANTS, block size)."""


def serve(engine: LLMEngine, arrivals: list[tuple[int, Prompt, SamplingParams]],
          ) -> tuple[list[RequestOutput], list[Request], dict[str, int]]:
    """Add each request at its step and run to completion.

    Returns the final outputs and the Request objects (in arrival-list order), and the step at
    which each request got its first token.
    """
    order = sorted(range(len(arrivals)), key=lambda i: arrivals[i][0])
    ids: list[str] = [""] * len(arrivals)
    reqs: list[Request | None] = [None] * len(arrivals)
    final: dict[str, RequestOutput] = {}
    first_token_step: dict[str, int] = {}
    step = 0
    while order or engine.has_unfinished():
        while order and arrivals[order[0]][0] <= step:
            i = order.pop(0)
            ids[i] = engine.add_request(arrivals[i][1], arrivals[i][2])
            reqs[i] = engine.scheduler.requests[ids[i]]
        for out in engine.step():
            first_token_step.setdefault(out.req_id, step)
            if out.finished:
                final[out.req_id] = out
        step += 1
        assert step < 2000, "the engine made no progress"
    return [final[i] for i in ids], reqs, {ids[i]: first_token_step[ids[i]] for i in range(len(ids))}


@pytest.fixture(params=ENGINE_CASES, ids=[f"{name}-bs{bs}" for name, bs in ENGINE_CASES])
def engine_case(request, tiny_model_variant, tiny_engine_factory):
    """`make(**config)` -> engine on the case's architecture and block size."""
    name, block_size = request.param

    def make(**config) -> LLMEngine:
        return tiny_engine_factory(tiny_model_variant(name), block_size=block_size, **config)

    return make


def test_batch_of_different_lengths(engine_case) -> None:
    engine = engine_case()
    lengths, max_tokens = [1, 5, 13, 30, 47], [8, 3, 12, 6, 10]
    prompts = random_prompts(lengths, engine.args.vocab_size, seed=1)
    outs = engine.generate(prompts, [greedy(n) for n in max_tokens])
    for prompt, out, n in zip(prompts, outs, max_tokens):
        assert out.prompt_token_ids == prompt and out.num_prompt_tokens == len(prompt)
        assert_matches_reference(engine, prompt, out, n)


def test_chunked_prefill_mixed_with_decodes(engine_case) -> None:
    engine = engine_case(max_num_batched_tokens=8)
    lengths = [30, 3, 17, 9, 41]
    prompts = random_prompts(lengths, engine.args.vocab_size, seed=2)
    arrivals = [(0, prompts[0], greedy(6)), (0, prompts[1], greedy(12)), (2, prompts[2], greedy(7)),
                (5, prompts[3], greedy(9)), (6, prompts[4], greedy(5))]
    outs, _, first_step = serve(engine, arrivals)
    for (added, prompt, params), out in zip(arrivals, outs):
        assert_matches_reference(engine, prompt, out, params.max_tokens)
        # Sanity of the scenario: a prompt needs at least ceil(len / 8) steps before its first token.
        assert first_step[out.req_id] - added + 1 >= math.ceil(len(prompt) / 8)


def test_short_prompts_overtake_long_ones_with_the_same_tokens(engine_case) -> None:
    """With a long-prefill threshold the long prompts prefill 8 tokens a step, one at a time, and
    the short ones that arrive behind them get their first token first; every output is still the
    reference's."""
    engine = engine_case(max_num_batched_tokens=64, long_prefill_token_threshold=8)
    prompts = random_prompts([30, 41, 5, 3], engine.args.vocab_size, seed=12)
    arrivals = [(0, prompts[0], greedy(4)), (0, prompts[1], greedy(4)), (0, prompts[2], greedy(6)),
                (1, prompts[3], greedy(6))]
    outs, _, first_step = serve(engine, arrivals)
    for (_, prompt, params), out in zip(arrivals, outs):
        assert_matches_reference(engine, prompt, out, params.max_tokens)
    steps = [first_step[o.req_id] for o in outs]
    assert steps[2] == 0 and steps[3] == 1  # the short ones at once
    assert steps[0] == 3 and steps[1] == 3 + 5  # 30 = 8+8+8+6; 41 starts when 6 are left of the first


def test_prioritized_short_prompts_shorten_the_long_ones_chunks(engine_case) -> None:
    """With prioritize_short_prefills the long prompt's chunk shrinks by the short prompts' prefill
    tokens in its step (the engine flag reaches the scheduler), and the outputs are the reference's."""
    engine = engine_case(max_num_batched_tokens=64, long_prefill_token_threshold=8, prioritize_short_prefills=True)
    prompts = random_prompts([30, 41, 5, 4], engine.args.vocab_size, seed=12)
    arrivals = [(0, p, greedy(4)) for p in prompts]
    outs, _, first_step = serve(engine, arrivals)
    for (_, prompt, params), out in zip(arrivals, outs):
        assert_matches_reference(engine, prompt, out, params.max_tokens)
    # The 30: 1 token at step 0 (the short ones prefill 9, more than 8), then 8, 8, 8, its last 5
    # (short) at step 4. The 41: 8 - 5 at step 4, then 8 a step, its last 6 at step 9.
    assert [first_step[o.req_id] for o in outs] == [4, 9, 0, 0]


def test_preemption_when_blocks_run_out(engine_case) -> None:
    probe = engine_case()
    block_size = probe.config.block_size
    lengths, max_tokens = [10, 14, 7, 12], 10
    # Room for the largest request alone plus one block, but not for all of them at once.
    need = [math.ceil((n + max_tokens) / block_size) for n in lengths]
    num_blocks = max(need) + 1
    assert sum(need) > num_blocks
    engine = engine_case(num_blocks=num_blocks)
    prompts = random_prompts(lengths, engine.args.vocab_size, seed=3)
    outs, reqs, _ = serve(engine, [(0, p, greedy(max_tokens)) for p in prompts])
    assert sum(r.num_preemptions for r in reqs) > 0
    for prompt, out in zip(prompts, outs):
        assert_matches_reference(engine, prompt, out, max_tokens)
    assert engine.block_manager.num_free_blocks == num_blocks


def test_prompt_logits_are_the_reference_logits_of_the_last_positions(engine_case) -> None:
    """Teacher forcing through the serving path (what `kvweave bench rag` measures with): the logits
    of a prompt's last positions, computed in several prefill chunks, equal a full causal forward's."""
    engine = engine_case(max_num_batched_tokens=8)
    prompt = random_prompts([29], engine.args.vocab_size, seed=11)[0]
    rid = engine.submit(engine.make_request(prompt, greedy(2), prompt_logits=12))
    final = None
    while engine.has_unfinished():
        final = next((o for o in engine.step() if o.req_id == rid and o.finished), final)
    reference = engine.model.forward_reference(torch.tensor(prompt))
    assert final.prompt_logits.shape == (12, engine.args.vocab_size)
    torch.testing.assert_close(final.prompt_logits, reference[-12:], atol=1e-4, rtol=1e-4)  # float32 engines
    assert final.prompt_logits[-1].argmax().item() == final.token_ids[0]
    with pytest.raises(InvalidRequestError, match="prompt_logits"):
        engine.make_request(prompt, greedy(2), prompt_logits=30)


def test_prefix_cache_hits(engine_case) -> None:
    engine = engine_case()
    bs = engine.config.block_size
    prefix, tail_a, tail_b = random_prompts([37, 5, 3], engine.args.vocab_size, seed=4)
    first = prefix + tail_a
    (out1,) = engine.generate([first], greedy(8))
    assert out1.num_cached_tokens == 0
    assert_matches_reference(engine, first, out1, 8)
    continuation = first + out1.token_ids  # a next turn: its cached blocks include generated tokens
    prompts = [prefix + tail_b, first, continuation]
    outs = engine.generate(prompts, greedy(6))
    assert [o.num_cached_tokens for o in outs] == [
        37 // bs * bs,                        # the shared prefix's full blocks
        (len(first) - 1) // bs * bs,          # the same prompt: all but the block of its last token
        (len(continuation) - 1) // bs * bs,   # prompt + output of the first request
    ]
    for prompt, out in zip(prompts, outs):
        assert_matches_reference(engine, prompt, out, 6)


def test_a_prefix_shared_within_one_step_is_computed_once(engine_case) -> None:
    """Prompts that share a prefix, submitted together: the first computes the prefix and the
    others attend to its blocks in the same forward, computing only their own tails."""
    engine = engine_case()
    bs = engine.config.block_size
    prefix, *tails = random_prompts([37, 5, 9, 3], engine.args.vocab_size, seed=6)
    prompts = [prefix + tail for tail in tails]
    ids = [engine.add_request(p, greedy(6)) for p in prompts]
    first = {o.req_id: o for o in engine.step()}
    assert [len(first[i].token_ids) for i in ids] == [1, 1, 1]  # all three prefilled in one step
    final = {o.req_id: o for o in run_to_end(engine) if o.finished}
    outs = [final[i] for i in ids]
    assert [o.num_cached_tokens for o in outs] == [0] + [37 // bs * bs] * 2
    for prompt, out in zip(prompts, outs):
        assert_matches_reference(engine, prompt, out, 6)


def test_prefix_cache_is_per_namespace_and_can_be_disabled(tiny_model_variant, tiny_engine_factory) -> None:
    model = tiny_model_variant("gqa")
    engine = tiny_engine_factory(model, block_size=4)
    prompt = random_prompts([21], engine.args.vocab_size, seed=5)[0]
    engine.add_request(prompt, greedy(3), cache_namespace="tenant-a")
    while engine.has_unfinished():
        engine.step()
    for namespace, expected in [("tenant-b", 0), ("tenant-a", 20)]:
        engine.add_request(prompt, greedy(3), req_id=namespace, cache_namespace=namespace)
        (out,) = [o for o in run_to_end(engine) if o.finished]
        assert out.num_cached_tokens == expected, namespace
    off = tiny_engine_factory(model, block_size=4, enable_prefix_caching=False)
    assert [o.num_cached_tokens for o in off.generate([prompt, prompt], greedy(3))] == [0, 0]
    (again,) = off.generate([prompt], greedy(3))
    assert again.num_cached_tokens == 0
    assert_matches_reference(off, prompt, again, 3)


def test_preemption_without_prefix_caching(tiny_model_variant, tiny_engine_factory) -> None:
    engine = tiny_engine_factory(tiny_model_variant("gqa"), block_size=4, num_blocks=7,
                                 enable_prefix_caching=False)
    prompts = random_prompts([10, 14, 7], engine.args.vocab_size, seed=6)
    outs, reqs, _ = serve(engine, [(0, p, greedy(10)) for p in prompts])
    assert sum(r.num_preemptions for r in reqs) > 0
    for prompt, out in zip(prompts, outs):
        assert_matches_reference(engine, prompt, out, 10)


def test_the_references_guess_gives_the_plain_loops_result(tiny_model_variant, tiny_engine_factory) -> None:
    """reference_greedy checking a guess in one forward gives what its token-by-token loop gives, for a
    right guess, one wrong from its fourth token on, and a short one."""
    engine = tiny_engine_factory(tiny_model_variant("gqa"))
    prompt = random_prompts([13], engine.args.vocab_size, seed=11)[0]
    plain_tokens, plain_rows = reference_greedy(engine, prompt, 8)
    wrong = plain_tokens[:3] + [(t + 1) % engine.args.vocab_size for t in plain_tokens[3:]]
    for guess in (plain_tokens, wrong, plain_tokens[:5]):
        tokens, rows = reference_greedy(engine, prompt, 8, guess)
        assert tokens == plain_tokens
        torch.testing.assert_close(torch.stack(rows), torch.stack(plain_rows), atol=LOGPROB_TOL, rtol=0)


def test_logprobs_with_alternatives(tiny_model_variant, tiny_engine_factory) -> None:
    engine = tiny_engine_factory(tiny_model_variant("untied"), block_size=4)
    prompts = random_prompts([9, 22], engine.args.vocab_size, seed=7)
    outs = engine.generate(prompts, greedy(6, logprobs=3))
    for prompt, out in zip(prompts, outs):
        ref_tokens, ref_rows = reference_greedy(engine, prompt, 6)
        assert out.token_ids == ref_tokens
        assert len(out.logprobs) == 6
        for (lp, alts), tok, row in zip(out.logprobs, ref_tokens, ref_rows):
            top = row.topk(3)
            assert lp == pytest.approx(float(row[tok]), abs=LOGPROB_TOL)
            assert list(alts) == top.indices.tolist()
            assert list(alts.values()) == pytest.approx(top.values.tolist(), abs=LOGPROB_TOL)
    (plain,) = engine.generate([prompts[0]], SamplingParams(max_tokens=2, temperature=0))
    assert plain.logprobs is None


def test_context_length_ends_generation(tiny_model_variant, tiny_engine_factory) -> None:
    engine = tiny_engine_factory(tiny_model_variant("gqa"), block_size=4, max_model_len=40)
    prompt = random_prompts([35], engine.args.vocab_size, seed=8)[0]
    (out,) = engine.generate([prompt], greedy(20))
    ref_tokens, _ = reference_greedy(engine, prompt, 5)
    assert (out.token_ids, out.finish_reason) == (ref_tokens, "length")


def test_seeded_sampling_is_independent_of_the_batch(tiny_model_variant, tiny_engine_factory) -> None:
    model = tiny_model_variant("gqa")
    prompt = random_prompts([12], 500, seed=9)[0]
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=42, ignore_eos=True)
    (alone,) = tiny_engine_factory(model).generate([prompt], params)
    others = random_prompts([5, 30], 500, seed=10)
    batch = tiny_engine_factory(model).generate(
        [others[0], prompt, others[1]],
        [SamplingParams(max_tokens=7, temperature=0.8, seed=1), params, SamplingParams(max_tokens=12)])
    assert batch[1].token_ids == alone.token_ids
    (other_seed,) = tiny_engine_factory(model).generate(
        [prompt], SamplingParams(max_tokens=12, temperature=1.0, seed=43, ignore_eos=True))
    assert other_seed.token_ids != alone.token_ids


def test_encode_prompt_forms(tiny_engine_factory) -> None:
    engine = tiny_engine_factory()
    ids = engine.tokenizer.encode("Hello world", add_special_tokens=True)
    assert engine.encode_prompt("Hello world") == ids
    assert engine.encode_prompt({"prompt": "Hello world"}) == ids
    assert engine.encode_prompt([5, 6, 7]) == [5, 6, 7]
    assert engine.encode_prompt({"prompt_token_ids": [5, 6]}) == [5, 6]
    messages = [{"role": "user", "content": "hi"}]
    assert engine.encode_prompt({"messages": messages}) == engine.tokenizer.encode_chat(messages)


# ---------------------------------------------------------------------------------------------
# Invalid and aborted requests do not disturb the others
# ---------------------------------------------------------------------------------------------


def invalid_requests(engine: LLMEngine) -> list[tuple[Prompt, SamplingParams | None, str]]:
    bad_params = SamplingParams()
    bad_params.max_tokens = 0  # changed after construction; add_request validates again
    vocab, ctx = engine.args.vocab_size, engine.max_model_len
    return [
        ("", None, "empty"),
        ([], None, "empty"),
        ([5] * ctx, None, "context length"),
        ([5, 6], bad_params, "max_tokens"),
        ([5, vocab], None, "token ids"),
        ([-1, 5], None, "token ids"),
        ([5, "6"], None, "prompt must be"),
        ([True, 5], None, "prompt must be"),
        (3.5, None, "prompt must be"),
        ({"text": "hi"}, None, "prompt"),
    ]


def test_invalid_requests_are_rejected_and_the_others_still_served(lively_engine) -> None:
    engine = lively_engine
    prompts = random_prompts([7, 19], engine.args.vocab_size, seed=11)
    a = engine.add_request(prompts[0], greedy(6), req_id="a")
    for prompt, params, match in invalid_requests(engine):
        with pytest.raises(InvalidRequestError, match=match):
            engine.add_request(prompt, params)
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request(prompts[1], greedy(6), req_id="a")
    assert list(engine.scheduler.requests) == [a]
    engine.step()
    b = engine.add_request(prompts[1], greedy(6), req_id="b")
    with pytest.raises(InvalidRequestError):
        engine.add_request([5] * engine.max_model_len, greedy(2))
    final = {o.req_id: o for o in run_to_end(engine) if o.finished}
    assert sorted(final) == [a, b]
    assert_matches_reference(engine, prompts[0], final[a], 6)
    assert_matches_reference(engine, prompts[1], final[b], 6)
    # The longest valid prompt leaves room for one token.
    (last,) = engine.generate([[5] * (engine.max_model_len - 1)], greedy(4))
    assert (len(last.token_ids), last.finish_reason) == (1, "length")


def test_invalid_messages_raise_invalid_request_error(lively_engine) -> None:
    """add_request promises InvalidRequestError for any bad input, chat messages included."""
    for messages in ([{"role": "user"}], "hi", [{"role": "", "content": "x"}]):
        with pytest.raises(InvalidRequestError):
            lively_engine.add_request({"messages": messages}, greedy(2))
    assert not lively_engine.has_unfinished()


def test_abort_mid_generation(lively_engine) -> None:
    engine = lively_engine
    prompts = random_prompts([7, 19, 11], engine.args.vocab_size, seed=12)
    ids = [engine.add_request(p, greedy(10)) for p in prompts]
    seen: dict[str, list[RequestOutput]] = {i: [] for i in ids}
    for _ in range(3):
        for o in engine.step():
            seen[o.req_id].append(o)
    aborted = engine.abort_request(ids[1])
    assert aborted.finished and aborted.finish_reason == "abort"
    assert aborted.token_ids == [t for o in seen[ids[1]] for t in o.new_token_ids]
    assert len(aborted.token_ids) == 3
    assert engine.abort_request(ids[1]) is None
    assert engine.abort_request("no-such-request") is None
    assert engine.block_manager.get_block_table(ids[1]) == []
    for o in run_to_end(engine):
        assert o.req_id != ids[1]
        seen[o.req_id].append(o)
    for i in (0, 2):
        assert_matches_reference(engine, prompts[i], seen[ids[i]][-1], 10)
    assert engine.abort_request(ids[0]) is None  # already finished
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_abort_of_a_waiting_request(tiny_model_variant, tiny_engine_factory) -> None:
    engine = tiny_engine_factory(tiny_model_variant("gqa"), block_size=4, max_num_seqs=1)
    prompts = random_prompts([6, 8], engine.args.vocab_size, seed=13)
    a = engine.add_request(prompts[0], greedy(4))
    b = engine.add_request(prompts[1], greedy(4))
    engine.step()
    aborted = engine.abort_request(b)
    assert (aborted.token_ids, aborted.text, aborted.finish_reason) == ([], "", "abort")
    final = [o for o in run_to_end(engine) if o.finished]
    assert [o.req_id for o in final] == [a]
    assert_matches_reference(engine, prompts[0], final[0], 4)


def test_a_request_larger_than_the_kv_cache_does_not_hang(tiny_model_variant, tiny_engine_factory) -> None:
    """2 blocks of 4 tokens hold 8 tokens: the engine's context is effectively 8 tokens."""
    engine = tiny_engine_factory(tiny_model_variant("gqa"), block_size=4, num_blocks=2)
    with pytest.raises(InvalidRequestError):
        engine.add_request(list(range(3, 13)), greedy(2))  # 10 prompt tokens can never be scheduled
    engine.add_request(list(range(3, 9)), greedy(10))  # 6 prompt tokens: it may grow to 8
    for _ in range(50):
        if not engine.has_unfinished():
            break
        outs = engine.step()
    assert not engine.has_unfinished(), "the request can never get the blocks it waits for"
    assert outs[-1].finish_reason == "length" and len(outs[-1].token_ids) == 2


# ---------------------------------------------------------------------------------------------
# The real default model
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_greedy_matches_reference(default_model_path) -> None:
    engine = LLMEngine(EngineConfig(model="smollm2-135m", dtype="float32", num_blocks=64, block_size=16,
                                   num_threads=1))
    prompts = ["The capital of France is", "def fibonacci(n):",
               {"messages": [{"role": "user", "content": "What is 2+2?"}]}]
    outs = engine.generate(prompts, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=0))
    for prompt, out in zip(prompts, outs):
        prompt_ids = engine.encode_prompt(prompt)
        ref_tokens, ref_rows = reference_greedy(engine, prompt_ids, 16, out.token_ids)
        assert out.token_ids == ref_tokens
        # 30 layers: summation-order differences reach ~2e-5 here, hence 1e-3.
        assert [lp for lp, _ in out.logprobs] == pytest.approx(
            [float(row[t]) for row, t in zip(ref_rows, ref_tokens)], abs=1e-3)
    assert "Paris" in outs[0].text  # a trained model, loaded correctly
