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
    logprobs: list[tuple[float, dict[int, float]] | None] | None
    """Per row: (sampled token's logprob, {top token id: logprob}) where asked for."""


@dataclass(slots=True)
class SamplingTensors:
    """The batch's sampling parameters as per-row tensors on the logits' device."""

    temperature: torch.Tensor
    """[B] float32; 0 for greedy rows."""
    top_k: torch.Tensor
    """[B] int64; <= 0 when off."""
    top_p: torch.Tensor
    """[B] float32; 1 when off."""
    all_greedy: bool
    any_filter: bool
    """Some row uses top-k or top-p."""

    @classmethod
    def from_params(cls, params: list[SamplingParams], device: torch.device | str = "cpu") -> "SamplingTensors":
        temps = [0.0 if p.greedy else float(p.temperature) for p in params]
        top_k = [p.top_k for p in params]
        top_p = [float(p.top_p) for p in params]
        return cls(torch.tensor(temps, dtype=torch.float32, device=device),
                   torch.tensor(top_k, dtype=torch.long, device=device),
                   torch.tensor(top_p, dtype=torch.float32, device=device),
                   all(t == 0.0 for t in temps),
                   any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p))


def _filter_top_k_top_p(logits: torch.Tensor, top_k, top_p) -> torch.Tensor:
    """Mask (to -inf) what top-k, then top-p, removes; logits [..., V], top_k / top_p scalars or
    per-row tensors (top_k <= 0 or >= V: off; top_p = 1: off). Top-p keeps the smallest set of
    tokens reaching p (the token that crosses it included)."""
    vocab = logits.shape[-1]
    k = torch.as_tensor(top_k, device=logits.device)
    k = torch.where((k <= 0) | (k > vocab), vocab, k)
    p = torch.as_tensor(top_p, dtype=torch.float32, device=logits.device)
    sorted_logits, idx = logits.sort(-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)
    sorted_logits = sorted_logits.masked_fill(ranks >= k[..., None], float("-inf"))
    probs = sorted_logits.softmax(-1)
    remove = probs.cumsum(-1) - probs >= p[..., None]  # keep the token that crosses top_p
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, idx, sorted_logits)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           tensors: SamplingTensors | None = None) -> SampleResult:
    """Sample one token per row of `logits` [B, vocab] (float32) on the logits' device, with one host
    transfer of the results. Random rows use the exponential race (argmax of p / E with E ~ Exp(1),
    which draws from p); a seeded row draws its noise from its own generator (on the logits'
    device), so its tokens do not depend on the rest of the batch."""
    t = tensors or SamplingTensors.from_params(params, logits.device)
    token_ids = logits.argmax(-1)
    if not t.all_greedy:
        temp = torch.where(t.temperature > 0, t.temperature, 1.0)
        scaled = logits / temp[:, None]
        if t.any_filter:
            scaled = _filter_top_k_top_p(scaled, t.top_k, t.top_p)
        probs = scaled.softmax(-1)
        noise = torch.empty_like(probs).exponential_()
        for i, g in enumerate(generators):
            if g is not None and not params[i].greedy:
                noise[i].exponential_(generator=g)
        token_ids = torch.where(t.temperature > 0, (probs / noise).argmax(-1), token_ids)
    ids = token_ids.tolist()
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
            logprobs.append((float(lp[i, ids[i]]), alts))
    return SampleResult(ids, logprobs)
