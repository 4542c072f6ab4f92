"""The sampler (greedy, temperature, top-k, top-p, per-request seeds); its parameters are
`kvweave.sampling_params.SamplingParams`.

Containment: one row can never fail the others. Each row's parameters are validated on their own
(a request built around the validation at the edges is caught here), a row whose logits or
probabilities are not finite (NaN, +inf) is reported instead of sampled, and a batch that raises is
sampled again row by row, so only the row that raises fails. Failed rows come back in
`SampleResult.failed` with a short reason (no tensor shapes or internals) and token id -1.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from kvweave.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[tuple[float, dict[int, float]] | None] | None
    """Per row: (sampled token's logprob, {top token id: logprob}) where asked for."""
    failed: dict[int, str] = field(default_factory=dict)
    """Rows that could not be sampled: row -> a short reason for the request's client."""


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


def row_problem(params: SamplingParams, vocab_size: int) -> str | None:
    """Why this row's parameters cannot be sampled (None: they can)."""
    try:
        params.validate()
    except Exception as e:  # a value of the wrong type fails validation in odd ways too
        return f"invalid sampling parameters ({e})"[:200] if isinstance(e, ValueError) else \
            "invalid sampling parameters"
    if params.logprobs is not None and params.logprobs > vocab_size:
        return f"logprobs asks for more alternatives than the vocabulary has ({vocab_size})"
    return None


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           tensors: SamplingTensors | None = None, checked: bool = False) -> SampleResult:
    """Sample one token per row of `logits` [B, vocab] (float32) on the logits' device, with one host
    transfer of the results. Random rows invert their CDF at a uniform number (`_draw`); a seeded
    row draws it from its own generator (on the logits' device), so its tokens do not depend on the
    rest of the batch. Rows that cannot be sampled are
    in `failed` (see the module doc); the others are sampled as if they were alone. `checked`: the
    caller ran `row_problem` on every row already (the model runner does, once per request)."""
    problems = {} if checked else \
        {i: why for i, p in enumerate(params) if (why := row_problem(p, logits.shape[-1])) is not None}
    if not problems:
        return _sample_contained(logits, params, generators, tensors)
    good = [i for i in range(len(params)) if i not in problems]
    result = SampleResult([-1] * len(params), None, problems)
    if good:
        part = _sample_contained(logits[good], [params[i] for i in good], [generators[i] for i in good])
        merge_rows(result, good, part)
    return result


def _sample_contained(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                      tensors: SamplingTensors | None = None) -> SampleResult:
    """`_sample` of the batch; if it raises, each row alone (only the rows that raise fail), its
    seeded generators first put back as they were (so a row's tokens stay those it gets alone)."""
    states = [g.get_state() if isinstance(g, torch.Generator) else None for g in generators]
    try:
        return _sample(logits, params, generators, tensors)
    except Exception:  # one row's numerics or parameters must not fail the batch
        if len(params) == 1:
            logger.exception("sampling a row failed")
            return SampleResult([-1], None, {0: "sampling failed"})
        for g, state in zip(generators, states):
            if state is not None:
                g.set_state(state)
    result = SampleResult([-1] * len(params), None)
    for i in range(len(params)):
        merge_rows(result, [i], _sample_contained(logits[i:i + 1], params[i:i + 1], generators[i:i + 1]))
    return result


def merge_rows(result: SampleResult, rows: list[int], part: SampleResult) -> None:
    """Put `part`, the sample of some `rows` of a batch, into `result`, the batch's."""
    if part.logprobs is not None and result.logprobs is None:
        result.logprobs = [None] * len(result.token_ids)
    for j, i in enumerate(rows):
        result.token_ids[i] = part.token_ids[j]
        if part.logprobs is not None:
            result.logprobs[i] = part.logprobs[j]
        if j in part.failed:
            result.failed[i] = part.failed[j]


def _draw(probs: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of `probs` [B, V], drawn by inverting the row's CDF at a uniform number
    (a seeded row's from its own generator), and each row's total (not finite where the row is
    not). One random number per row: drawing V exponentials per row for the exponential race cost
    ~30 ms a step at 32 rows of a 49k vocabulary here, the cumulative sum ~1 ms."""
    u = torch.rand(probs.shape[0], device=probs.device)
    for i, g in enumerate(generators):
        if g is not None and not params[i].greedy:
            u[i] = torch.rand((), generator=g, device=probs.device)
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    # below the total even where u * total rounds up to it, so a token of zero probability (a flat
    # step of the CDF) is never the one found
    x = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    ids = torch.searchsorted(cdf, x, right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)
    return ids, total.squeeze(1)


def _sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
            tensors: SamplingTensors | None = None) -> SampleResult:
    t = tensors or SamplingTensors.from_params(params, logits.device)
    token_ids = logits.argmax(-1)
    top = logits.amax(-1)  # NaN where a row has one (max propagates NaN), +inf where it has +inf
    bad = torch.isnan(top) | torch.isposinf(top)
    if not t.all_greedy:
        temp = torch.where(t.temperature > 0, t.temperature, 1.0)
        scaled = logits / temp[:, None]
        if t.any_filter:
            scaled = _filter_top_k_top_p(scaled, t.top_k, t.top_p)
        random_rows = t.temperature > 0
        drawn, total = _draw(scaled.softmax(-1), params, generators)
        token_ids = torch.where(random_rows, drawn, token_ids)
        bad |= random_rows & ~torch.isfinite(total)
    ids, bad_rows = torch.stack([token_ids, bad.long()]).tolist()  # the one host transfer
    failed = {i: "sampling produced non-finite probabilities" for i, b in enumerate(bad_rows) if b}
    logprobs = None
    if any(p.logprobs is not None for p in params):
        logprobs = []
        lp = logits.log_softmax(-1)
        for i, p in enumerate(params):
            if p.logprobs is None or i in failed:
                logprobs.append(None)
                continue
            top = torch.topk(lp[i], p.logprobs) if p.logprobs else None
            alts = dict(zip(top.indices.tolist(), top.values.tolist())) if top is not None else {}
            logprobs.append((float(lp[i, ids[i]]), alts))
    for i in failed:
        ids[i] = -1
    return SampleResult(ids, logprobs, failed)
