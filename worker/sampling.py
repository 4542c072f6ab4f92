"""Sampling parameters and the sampler (greedy, temperature, top-k, top-p, per-request seeds)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


class InvalidRequestError(ValueError):
    """A request's input or parameters are invalid; the message names the problem."""


@dataclass
class SamplingParams:
    max_tokens: int = 16
    """Maximum number of tokens to generate."""
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = -1
    """-1 (or 0) disables top-k."""
    seed: int | None = None
    """Makes random sampling reproducible for this request, whatever else is in the batch."""
    stop: list[str] = field(default_factory=list)
    """Strings that end generation; they are not included in the text."""
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    """Return the sampled token's logprob and this many top alternatives."""
    min_tokens: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens <= 0:
            raise InvalidRequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise InvalidRequestError(f"top_k must be -1 (disabled) or a positive integer, got {self.top_k!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise InvalidRequestError(f"seed must be an integer, got {self.seed!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidRequestError("stop must be a non-empty string or a list of non-empty strings")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            raise InvalidRequestError("stop_token_ids must be non-negative integers")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            raise InvalidRequestError(f"logprobs must be an integer in [0, 20], got {self.logprobs!r}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise InvalidRequestError(f"min_tokens must be >= 0, got {self.min_tokens!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


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
