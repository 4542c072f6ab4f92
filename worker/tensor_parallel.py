"""Tensor parallelism applied to a plain model from outside, in the shape of gpt-fast's tp.py: the
checkpoint's weights are sharded before they are loaded, the model is built with each rank's head
and MLP counts, and the two all-reduces of a decoder layer (after the attention's output
projection and after the MLP's down projection) are forward hooks on the attention and MLP
modules. worker/model.py stays a single-device model.

Sharding (Megatron's): q, k and v by heads and gate and up by MLP columns (column-parallel: each
rank computes its own heads and columns, no communication), the output and down projections by
their input columns (row-parallel: each rank's product is a partial sum, all-reduced). Embedding,
norms and the vocabulary projection are replicated. The query heads must divide by the group's
size; the KV heads are split over the ranks when they divide by it, else (fewer KV heads than
ranks, the size a multiple of their count) each is replicated on the ranks whose query heads it
serves (`check_tp`).

A group is a torch.distributed process group built directly over a TCPStore, like the KV
transfer's pairs (kvstore/dist_group.py): gloo on the CPU, NCCL on GPUs; no global default group.
"""
from __future__ import annotations

import dataclasses
import datetime

import torch
import torch.distributed as dist

from worker.config import ModelArgs

STORE_PREFIX = "kvweave/tp/"


class TPConfigError(ValueError):
    """A model that cannot be split over the requested group size."""


def check_tp(args: ModelArgs, size: int) -> None:
    """TPConfigError unless `args` splits evenly over `size` ranks."""
    if size < 1:
        raise TPConfigError(f"tensor_parallel_size must be >= 1, got {size}")
    for what, n in (("query heads", args.n_heads), ("MLP columns", args.hidden_dim)):
        if n % size:
            raise TPConfigError(f"tensor_parallel_size {size} does not divide the model's {n} {what}; "
                                f"valid sizes divide {args.n_heads} and {args.hidden_dim}")
    if args.n_kv_heads % size and size % args.n_kv_heads:
        raise TPConfigError(f"tensor_parallel_size {size} and the model's {args.n_kv_heads} KV heads: one must "
                            f"divide the other (KV heads split over the ranks, or replicated on them)")


def rank_args(args: ModelArgs, size: int) -> ModelArgs:
    """The model shape one rank holds: 1/size of the heads and MLP columns, the same head size."""
    check_tp(args, size)
    return dataclasses.replace(args, n_heads=args.n_heads // size, n_kv_heads=max(1, args.n_kv_heads // size),
                               hidden_dim=args.hidden_dim // size, head_dim=args.head_dim)


def first_kv_head(rank: int, size: int, n_kv_heads: int) -> int:
    """The first of the model's KV heads rank `rank` holds (split or replicated alike)."""
    return rank * n_kv_heads // size


def _rows(w: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    n = w.shape[0] // size
    return w[rank * n:(rank + 1) * n]


def _kv_rows(w: torch.Tensor, rank: int, size: int, n_kv_heads: int) -> torch.Tensor:
    """Rank `rank`'s KV heads' rows of a k or v projection (its one head, where replicated)."""
    if n_kv_heads % size == 0:
        return _rows(w, rank, size)
    per_head = w.shape[0] // n_kv_heads
    head = first_kv_head(rank, size, n_kv_heads)
    return w[head * per_head:(head + 1) * per_head]


def _cols(w: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    n = w.shape[1] // size
    return w[:, rank * n:(rank + 1) * n]


def shard_weights(weights: dict[str, torch.Tensor], args: ModelArgs, rank: int, size: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s part of Hugging Face Llama-named weights (views where possible; the model's
    `load_weights` copies them). q and k rows are split by whole heads (a head's rows are
    contiguous in HF's layout, its RoPE halves included)."""
    check_tp(args, size)
    if size == 1:
        return weights
    out = {}
    for name, w in weights.items():
        key = name.removeprefix("model.")
        if key.endswith("self_attn.q_proj.weight") or key.endswith("self_attn.q_proj.bias"):
            out[name] = _rows(w, rank, size)
        elif any(key.endswith(f"self_attn.{p}_proj.weight") or key.endswith(f"self_attn.{p}_proj.bias") for p in "kv"):
            out[name] = _kv_rows(w, rank, size, args.n_kv_heads)
        elif key.endswith("mlp.gate_proj.weight") or key.endswith("mlp.up_proj.weight"):
            out[name] = _rows(w, rank, size)
        elif key.endswith("self_attn.o_proj.weight") or key.endswith("mlp.down_proj.weight"):
            out[name] = _cols(w, rank, size)
        else:
            out[name] = w
    return out


def new_group(store: dist.Store, rank: int, size: int, device: torch.device, host: str = "127.0.0.1",
              timeout_s: float = 300.0) -> dist.ProcessGroup:
    """The group of one worker's ranks over `store` (blocks until every rank joined)."""
    prefixed = dist.PrefixStore(STORE_PREFIX, store)
    timeout = datetime.timedelta(seconds=timeout_s)
    if device.type == "cuda":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, size, options)
    options = dist.ProcessGroupGloo._Options()
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    options._timeout = timeout
    return dist.ProcessGroupGloo(prefixed, rank, size, options)


def all_reduce(t: torch.Tensor, group: dist.ProcessGroup):
    """Start a sum all-reduce of `t` in place over the group; `.wait()` the returned Work."""
    return group.allreduce([t])


def install_all_reduce(model, group: dist.ProcessGroup) -> None:
    """Hook a blocking sum all-reduce onto the output of every layer's attention and MLP: the
    model's own forward then runs tensor-parallel. Calling a module's `.forward` directly skips
    the hook (worker/token_split.py reduces those outputs itself, asynchronously)."""
    def reduce(_module, _inputs, output: torch.Tensor) -> torch.Tensor:
        all_reduce(output, group).wait()
        return output

    for layer in model.layers:
        layer.self_attn.register_forward_hook(reduce)
        layer.mlp.register_forward_hook(reduce)
