"""Token-split overlap of compute and all-reduce for tensor-parallel steps (TokenWeave, MLSys'26).

A step's tokens are cut into two halves of about equal size (a prefill chunk may be cut in the
middle: the second half then attends to the first half's KV as cached context, which the first
half wrote into the paged cache one layer earlier in the same loop). The layer loop runs the
halves in turn: while one half's all-reduce (after its attention, after its MLP) is in flight,
the other half computes; the fused add+RMSNorm that follows each all-reduce runs on the half whose
sum has arrived. Every rank splits the same way (the split depends only on the step's inputs), so
the collectives are posted in the same order everywhere.

`split_items` decides the halves; `forward_overlapped` runs them. The model runner
(worker/model_runner.py) prepares each half's inputs and attention metadata and samples from the
joined hidden states.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.tensor_parallel import all_reduce


def split_items(items: list[tuple[str, int, object]]) -> tuple[list, list, tuple[str, int] | None] | None:
    """(first half, second half, (request cut in two, tokens in its first part) or None) of a step's
    items (request, tokens, blend piece), cut at half of the step's tokens; None when the step
    cannot be split (a blend piece: its positions are sparse; fewer than two tokens)."""
    total = sum(n for _, n, _ in items)
    if total < 2 or any(piece is not None for _, _, piece in items):
        return None
    target, seen = total // 2, 0
    for i, (req_id, n, piece) in enumerate(items):
        if seen + n < target:
            seen += n
            continue
        k = target - seen
        if k == 0:
            return items[:i], items[i:], None
        if k == n:
            return items[:i + 1], items[i + 1:], None
        return items[:i] + [(req_id, k, None)], [(req_id, n - k, None)] + items[i + 1:], (req_id, k)
    return None


@dataclass
class _Half:
    x: torch.Tensor
    residual: torch.Tensor | None
    cos: torch.Tensor
    sin: torch.Tensor
    backend: object
    work: object = None


def forward_overlapped(model, halves: list[tuple[torch.Tensor, torch.Tensor, object]], group) -> list[torch.Tensor]:
    """Each half's final normed hidden states, for halves given as (token ids, positions, attention
    backend), the model's layers run alternately so that one half's all-reduce overlaps the other's
    compute. The modules' `.forward` is called directly: their all-reduce hooks
    (worker/tensor_parallel.py) do not run, the reduces here are asynchronous."""
    states = [_Half(model.embed_tokens(ids), None, model.rope_cos[pos], model.rope_sin[pos], backend)
              for ids, pos, backend in halves]
    for layer in model.layers:
        for s in states:
            if s.work is not None:
                s.work.wait()
            if s.residual is None:
                x, s.residual = layer.input_layernorm(s.x), s.x
            else:
                x, s.residual = layer.input_layernorm(s.x, s.residual)
            s.x = layer.self_attn.forward(x, s.cos, s.sin, s.backend)
            s.work = all_reduce(s.x, group)
        for s in states:
            s.work.wait()
            x, s.residual = layer.post_attention_layernorm(s.x, s.residual)
            s.x = layer.mlp.forward(x)
            s.work = all_reduce(s.x, group)
    out = []
    for s in states:
        s.work.wait()
        out.append(model.norm(s.x, s.residual)[0])
    return out
