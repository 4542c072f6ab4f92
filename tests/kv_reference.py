"""The reference KV of a prompt: a plain causal forward of the model that keeps each layer's keys and
values, with no paged cache and no engine (what chunk-cache tests compare the engine's KV with)."""
from __future__ import annotations

import torch


class KVCapture:
    """A plain causal attention backend (over the given tokens only) that keeps each layer's K/V."""

    def __init__(self, args) -> None:
        from worker.model import CausalAttention

        self.inner, self.k, self.v = CausalAttention(args), {}, {}

    def attend(self, layer, q, k, v):
        self.k[layer], self.v[layer] = k.clone(), v.clone()
        return self.inner.attend(layer, q, k, v)

    def fused_decode_applies(self, num_tokens: int) -> bool:
        return False  # every layer's attend is seen


@torch.no_grad()
def reference_kv(model, token_ids: list[int], start: int = 0) -> torch.Tensor:
    """The KV [2, n_layers, n_kv_heads, n, head_dim] of `token_ids` run alone at positions start..
    (keys rotated for those positions) by a plain causal forward: no paged cache, no engine."""
    capture = KVCapture(model.args)
    ids = torch.tensor(token_ids, device=model.device)
    positions = torch.arange(start, start + len(token_ids), device=model.device)
    model(ids, positions, capture)
    layers = range(model.args.n_layers)
    return torch.stack([torch.stack([capture.k[i] for i in layers]), torch.stack([capture.v[i] for i in layers])]
                       ).transpose(2, 3).float()
