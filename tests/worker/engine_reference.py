"""The reference the engine tests compare against: a plain greedy loop over the model's
`forward_reference` (the whole growing sequence through a causal forward, with no KV cache,
paging, batching or chunking), and the helpers those tests share.

Logprob tolerance: 1e-4 (absolute) in float32. The engine attends over gathered paged KV in
batches of other requests' tokens, the reference over one contiguous sequence; the two sum in
different orders, which moves these 2-layer models' log-probabilities by ~1e-6. 1e-4 leaves a
wide margin for that, while a KV-cache bug (wrong block, slot, position or mask) moves them by
more than 1e-2.
"""
from __future__ import annotations

import pytest
import torch

from worker.engine import LLMEngine
from worker.output import RequestOutput
from kvweave.sampling_params import SamplingParams

LOGPROB_TOL = 1e-4
def greedy(max_tokens: int, logprobs: int = 0) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=logprobs)


def random_prompts(lengths: list[int], vocab_size: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=gen).tolist() for n in lengths]  # 0-2 are special


def reference_greedy(engine: LLMEngine, prompt_ids: list[int], max_tokens: int,
                     guess: list[int] = ()) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and the log-softmax row each was taken from, by full forwards of the growing sequence.

    `guess` (the engine's own output) is checked first by one forward of the prompt and the guess: a
    causal forward's row at a position depends only on the tokens before it, so each guessed token
    that is that row's argmax (and every one before it was too) is the greedy token, found without a
    forward of its own. From the first wrong guess on, the loop goes on as without one."""
    seq, tokens, rows = list(prompt_ids), [], []
    guess = list(guess)[:max_tokens]
    if guess:
        forced = engine.model.forward_reference(torch.tensor(seq + guess[:-1]))[len(seq) - 1:]
        for token, logits in zip(guess, forced):
            tokens.append(int(logits.argmax()))
            rows.append(logits.log_softmax(-1))
            if tokens[-1] != token:
                break
        seq += tokens
    while len(tokens) < max_tokens:
        logits = engine.model.forward_reference(torch.tensor(seq))[-1]
        tokens.append(int(logits.argmax()))
        rows.append(logits.log_softmax(-1))
        seq.append(tokens[-1])
    return tokens, rows


def assert_matches_reference(engine: LLMEngine, prompt_ids: list[int], out: RequestOutput, max_tokens: int) -> None:
    ref_tokens, ref_rows = reference_greedy(engine, prompt_ids, max_tokens, out.token_ids)
    assert out.finish_reason == "length"
    assert out.token_ids == ref_tokens, f"prompt of {len(prompt_ids)} tokens"
    ref_lps = [float(row[t]) for row, t in zip(ref_rows, ref_tokens)]
    assert [lp for lp, _ in out.logprobs] == pytest.approx(ref_lps, abs=LOGPROB_TOL)


def run_to_end(engine: LLMEngine) -> list[RequestOutput]:
    """Step until nothing is left; every output of every step."""
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    return outs
