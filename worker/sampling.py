"""The sampler (greedy, temperature, top-k, top-p, per-request seeds); its parameters are
`kvweave.sampling_params.SamplingParams`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kvweave.sampling_params import SamplingParams


@dataclass(slots=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[tuple[float, dict[int, float]]] | None
    """Per row: (sampled token's logprob, {top token id: logprob}) where asked for."""


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, idx, sorted_logits)
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> SampleResult:
    """Sample one token per row of `logits` [B, vocab] (float32)."""
    token_ids = logits.argmax(-1).tolist()
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = _filter_top_k_top_p(logits[i] / p.temperature, p.top_k, p.top_p)
        token_ids[i] = int(torch.multinomial(row.softmax(-1), 1, generator=generators[i]))
    logprobs = None
    if any(p.logprobs is not None for p in params):
        logprobs = []
        lp = logits.log_softmax(-1)
        for i, p in enumerate(params):
            if p.logprobs is None:
                logprobs.append(None)
                continue
            top = torch.topk(lp[i], p.logprobs) if p.logprobs else None
            alts = dict(zip(top.indices.tolist(), top.values.tolist())) if top is not None else {}
            logprobs.append((float(lp[i, token_ids[i]]), alts))
    return SampleResult(token_ids, logprobs)
