"""CUDA graphs for decode-only steps, in batch-size buckets (vLLM's and SGLang's scheme).

A decode step of a small batch on a GPU is mostly kernel-launch overhead: hundreds of small kernels
whose launch from Python costs more than their run. Captured once per bucket, a step replays as one
graph launch. The graph reads its inputs from static buffers (token ids, positions, slot mapping,
block tables, context lengths) that each step fills; a batch is padded up to its bucket, and the
padding rows attend one token of a scratch block (never handed out by the block manager) and write
their K/V there, so they touch no request's cache. Mixed steps (prefill chunks, blend pieces) stay
eager, as their shapes change every step.

The decode kernel's grid is fixed at capture: it splits contexts as for the longest the engine
allows, and splits past a sequence's end return at once. The vocabulary projection and the sampler
stay outside the graph (the sampled rows and sampling parameters vary).

`GraphMode.EMULATE` runs the same static-buffer path without capturing (each replay is an eager
call on the buffers): the tests check the padding and buffer handling on the CPU that way.
"""
from __future__ import annotations

import enum
import logging
import os
from collections.abc import Callable

import torch

from worker.attention import AttentionMetadata, PagedAttention

logger = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)
"""Batch sizes captured (a batch runs in the smallest bucket that holds it)."""


class GraphMode(enum.Enum):
    OFF = "0"
    CAPTURE = "1"
    EMULATE = "emulate"


def graph_mode(device: torch.device) -> GraphMode:
    """KVWEAVE_CUDA_GRAPHS: 1 (default on CUDA), 0 (eager), emulate (the static-buffer path without
    capture, for tests on the CPU)."""
    value = os.environ.get("KVWEAVE_CUDA_GRAPHS", "1" if device.type == "cuda" else "0")
    try:
        mode = GraphMode(value)
    except ValueError:
        raise ValueError(f"KVWEAVE_CUDA_GRAPHS={value!r}: one of 0, 1, emulate") from None
    if mode is GraphMode.CAPTURE and device.type != "cuda":
        return GraphMode.OFF
    return mode


class DecodeGraphs:
    """Captured decode forwards of `model` over `kv_cache`, one per bucket, made on first use."""

    def __init__(self, model, kv_cache: torch.Tensor, block_size: int, scratch_block: int, max_model_len: int,
                 max_num_seqs: int, mode: GraphMode) -> None:
        self.model, self.kv_cache, self.block_size, self.mode = model, kv_cache, block_size, mode
        self.buckets = [b for b in BUCKETS if b < max_num_seqs] + [min(max_num_seqs, BUCKETS[-1])]
        self.max_len = max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        self.scratch_block = scratch_block
        dev, n = kv_cache.device, self.buckets[-1]
        self.token_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slot_mapping = torch.zeros(n, dtype=torch.long, device=dev)
        self.block_tables = torch.full((n, self.max_blocks), scratch_block, dtype=torch.long, device=dev)
        self.context_lens = torch.ones(n, dtype=torch.long, device=dev)
        self.graphs: dict[int, Callable[[], torch.Tensor]] = {}
        self.pool = None

    def bucket_for(self, batch: int) -> int | None:
        return next((b for b in self.buckets if b >= batch), None)

    def applies(self, num_tokens: int, meta: AttentionMetadata) -> bool:
        return (self.mode is not GraphMode.OFF and not meta.prefills and meta.num_decodes == num_tokens
                and meta.decode_block_tables is not None and self.bucket_for(num_tokens) is not None)

    def run(self, token_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The final hidden states of a decode-only batch, [B, dim]."""
        b = token_ids.shape[0]
        bucket = self.bucket_for(b)
        self.token_ids[:b].copy_(token_ids)
        self.positions[:b].copy_(positions)
        self.slot_mapping[:b].copy_(meta.slot_mapping)
        bt = meta.decode_block_tables
        self.block_tables[:b, :bt.shape[1]].copy_(bt)
        self.context_lens[:b].copy_(meta.decode_context_lens)
        # padding rows: one token of the scratch block
        self.token_ids[b:bucket].zero_()
        self.positions[b:bucket].zero_()
        self.slot_mapping[b:bucket].fill_(self.scratch_block * self.block_size)
        self.block_tables[b:bucket, 0].fill_(self.scratch_block)
        self.context_lens[b:bucket].fill_(1)
        graph = self.graphs.get(bucket)
        if graph is None:
            graph = self.graphs[bucket] = self._capture(bucket)
        return graph()[:b]

    def _forward(self, bucket: int) -> torch.Tensor:
        meta = AttentionMetadata(self.slot_mapping[:bucket], bucket, decode_block_tables=self.block_tables[:bucket],
                                 decode_context_lens=self.context_lens[:bucket], decode_max_len=self.max_len)
        backend = PagedAttention(self.kv_cache, meta, self.model.args.n_heads, self.block_size)
        return self.model(self.token_ids[:bucket], self.positions[:bucket], backend)

    def _capture(self, bucket: int) -> Callable[[], torch.Tensor]:
        if self.mode is GraphMode.EMULATE:
            return lambda: self._forward(bucket)
        stream = torch.cuda.Stream(self.kv_cache.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph (Triton compiles, cuBLAS picks kernels)
            for _ in range(2):
                self._forward(bucket)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._forward(bucket)
        self.pool = graph.pool()  # every bucket's graph shares one memory pool
        logger.info("captured the decode step of batch %d as a CUDA graph", bucket)

        def replay() -> torch.Tensor:
            graph.replay()
            return out
        return replay
